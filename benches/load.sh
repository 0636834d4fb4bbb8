#!/usr/bin/env bash
# Load benchmark: smtp-source -> Portcullis -> smtp-sink against
# smtp-source -> smtp-sink directly, alternating in one run (machines are
# noisy: compare within a run, quote medians and ratios).
#   benches/load.sh [ROUNDS] [MESSAGES] [SESSIONS] [BODY_BYTES]
# Four targets per round: direct; Portcullis with checks off; Portcullis
# with SPF, 2 DNSBL zones and the shipped rules on (DNS from
# examples/bench_dns, warmed first); "null", a relay that checks nothing
# (examples/null_relay.rs: the same reads and writes per message as
# Portcullis, upstream connections kept, one thread): the floor any proxy
# pays that keeps its client in step with the MTA. With Postfix installed and run as
# root, a fourth, "postfix": Postfix 3.x as a store-and-forward relay into
# the same smtp-sink (its rate is what smtpd accepts, each message fsynced
# to its queue, and its deliveries waited for, untimed, before the next
# target runs; its CPU is every Postfix process's, from master's own and
# its children's). NO_POSTFIX=1 leaves it out.
# GATE_LOG=1 adds a fourth: checks off with json info logging to a file
# (log.file), to compare against "off" (logging at warn: no per-message line).
# BASE_BIN=path/to/older/portcullis adds "base_off" and "base_on": the same
# two gates run by another build, so that a change is judged within one run.
# STATE=1 adds "state_emb" and "state_redis": checks off but greylisting on
# for an already-allowed client and two rate limits, on the embedded store
# and on a redis-server the script starts; and "state_exact", Redis with
# bursts of 150, small enough that every count is its own round trip (no leases).
# It then prints each store's round-trip latency (p50, p99) and calls.
# LINKS=1 adds "rules": checks off, the shipped rules on (attachments,
# archives); and "links": the same plus the URL blocklists (two zones, at
# most 20 domains a message, caches warm). "links" against "rules" is what
# the link checks cost. HTML=1 sends every target a ~100 KB HTML message
# with 50 distinct link domains (smtp-source -F) instead of BODY_BYTES of text.
# SCANNERS=1 adds "clamd" and "rspamd": checks off but ClamAV (a one-signature
# database) or rspamd (Debian's, stock rules, DNS from bench_dns) asked about
# every message; it prints the latency each adds per message.
# SPLIT=1 adds "spf", "dnsbl" and "rules_only": checks off but SPF, the
# two DNSBL zones, or the shipped rules alone, so that what "on" costs
# over "off" is split by check.
# POLICIES=1 adds "rules" (checks off, the shipped rules), "pol1" (the
# same plus one policy file, for the recipients' domain) and "pol200" (200
# policy files, one of them for that domain): what per-recipient policies
# cost, and whether it grows with their number.
# Every target is run with one message per connection (smtp-source's
# default) and, with REUSED=1, also with connections reused (-d), each
# mode with its own medians and ratios. POOL=1 adds "nopool": checks off
# with upstream connection reuse turned off (upstream.pool.max_idle 0).
# THREADS=N adds "off_tN" and "on_tN": the same two gates with N
# connection threads (`threads: N`; the others have the default, one per two CPUs).
# At the end: upstream connections each gate opened per 1,000 client
# sessions (from its metrics).
# PERF=<target> profiles one gate instead (benches/perf.sh: perf and
# inferno, a flame graph in target/perf/); PERF_D=1 with connections reused.
# Needs smtp-source and smtp-sink (Debian package postfix). Loopback only.
set -euo pipefail
ROUNDS=${1:-5}; MSGS=${2:-20000}; SESS=${3:-20}; BYTES=${4:-2000}
cd "$(dirname "$0")/.."
SINK=12525; OFF=12526; ON=12527; LOGGED=12528; BASE_OFF=12529; BASE_ON=12530; DNS=127.0.0.1:15353
STATE_EMB=12531; STATE_REDIS=12532; REDIS=12533; M_EMB=12534; M_REDIS=12535; STATE_EXACT=12536; M_EXACT=12537
LINKS_PORT=12538; RULES_PORT=12539; CLAMD_GATE=12540; RSPAMD_GATE=12541; CLAMD=12542; RSPAMD=12543
POL1=12544; POL200=12545; NOPOOL=12546; POSTFIX=12547; NULL_RELAY=12556; METRICS_BASE=12600
SPLIT_SPF=12548; SPLIT_DNSBL=12549; SPLIT_RULES=12550; OFF_T=12551; ON_T=12552
TMP=$(mktemp -d)
cleanup() {
  [ -d $TMP/postfix ] && { postfix -c $TMP/postfix/conf stop >/dev/null 2>&1 || true; }
  kill $(cat $TMP/*.pid $TMP/rspamd/run/rspamd.pid 2>/dev/null) 2>/dev/null || true
  sleep 0.5; rm -rf $TMP
}
trap cleanup EXIT

cargo build --release --ignore-rust-version -q --bin portcullis --example bench_dns --example null_relay
(smtp-sink -u nobody 127.0.0.1:$SINK 1000 >$TMP/sink.log 2>&1 & echo $! >$TMP/sink.pid)
(./target/release/examples/bench_dns $DNS >$TMP/dns.log 2>&1 & echo $! >$TMP/dns.pid)

gate() { # name port checks-yaml log-level stdout-file extra-log-yaml [binary] [upstream-extra-yaml]
  # Every gate serves metrics (port METRICS_BASE + its port's last two
  # digits) unless its checks bring their own.
  local metrics=""
  case "$3" in *"metrics:"*) ;; *) metrics="metrics: {listen: \"127.0.0.1:$((METRICS_BASE + $2 % 100))\"}";; esac
  cat >$TMP/$1.yaml <<YAML
hostname: gate.bench
listen: [{addr: "127.0.0.1:$2"}]
upstream: {addr: "127.0.0.1:$SINK", client_identity: none${8:-}}
$metrics
limits: {max_connections: 5000, max_connections_per_ip: 5000, max_connections_per_network: 5000}
dns: {nameservers: ["$DNS"], min_ttl: 300s}
log: {format: json, level: "$4"$6}
checks:
$3
YAML
  (${7:-./target/release/portcullis} run --config $TMP/$1.yaml >"$5" 2>&1 & echo $! >$TMP/$1.pid)
}
OFF_CHECKS="  spf: {mode: off}
  dkim: {mode: off}
  dmarc: {mode: off}
  arc: {mode: off}
  iprev: {mode: off}
  dnsbl: {mode: off}"
ON_CHECKS="  dkim: {mode: off}
  dmarc: {mode: off}
  arc: {mode: off}
  iprev: {mode: off}
  spf: {mode: enforce}
  dnsbl:
    mode: enforce
    zones: [{zone: bl1.test, action: reject}, {zone: bl2.test, score: 5}]
rules_dir: $PWD/rules"
gate off $OFF "$OFF_CHECKS" warn $TMP/off.log ""
gate on $ON "$ON_CHECKS" warn $TMP/on.log ""
(./target/release/examples/null_relay 127.0.0.1:$NULL_RELAY 127.0.0.1:$SINK >$TMP/null.log 2>&1 & echo $! >$TMP/null.pid)
TARGETS="direct:$SINK off:$OFF on:$ON null:$NULL_RELAY"
if [ -n "${GATE_LOG:-}" ]; then
  gate logged $LOGGED "$OFF_CHECKS" info $TMP/logged.out ", file: \"$TMP/logged.log\""
  TARGETS="$TARGETS logged:$LOGGED"
fi
state_checks() { # backend-yaml metrics-port [burst]
  cat <<YAML
$OFF_CHECKS
  greylist: {mode: enforce, delay: 1s, auto_allow_after: 1}
  rate_limits:
    - {name: per_client, key: client_address, count: transactions, rate: 1000000/1m, burst: ${3:-1000000}}
    - {name: per_sender, key: sender, count: recipients, rate: 1000000/1m, burst: ${3:-1000000}}
state: $1
metrics: {listen: "127.0.0.1:$2"}
YAML
}
if [ -n "${STATE:-}" ]; then
  (redis-server --port $REDIS --bind 127.0.0.1 --save "" --appendonly no >$TMP/redis.log 2>&1 & echo $! >$TMP/redis.pid)
  gate state_emb $STATE_EMB "$(state_checks "{backend: embedded}" $M_EMB)" warn $TMP/state_emb.log ""
  gate state_redis $STATE_REDIS "$(state_checks "{backend: redis, url: \"redis://127.0.0.1:$REDIS\"}" $M_REDIS)" warn $TMP/state_redis.log ""
  # The same with bursts of 150: leases of one unit, a round trip per count.
  gate state_exact $STATE_EXACT "$(state_checks "{backend: redis, url: \"redis://127.0.0.1:$REDIS\"}" $M_EXACT 150)" warn $TMP/state_exact.log ""
  TARGETS="$TARGETS state_emb:$STATE_EMB state_redis:$STATE_REDIS state_exact:$STATE_EXACT"
fi
MSGFILE=
if [ -n "${HTML:-}" ]; then
  MSGFILE=$TMP/links.eml
  awk 'BEGIN {
    printf "From: Shop <news@example-shop.com>\nTo: b@example.test\nSubject: Offers\nMIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n<html><body>\n"
    n = 0; size = 0
    while (size < 102400) {
      line = "<p>Dear customer, our quarterly offers are here. Compare the prices and choose what suits you.</p>"
      if (size > n * 2000 && n < 50) {
        line = line sprintf("<a href=\"https://click%d.shop%d.com/t?id=%d\">Offer %d</a>", n, n, n, n); n++
      }
      print line; size += length(line) + 1
    }
    print "</body></html>"
  }' >$MSGFILE
fi
if [ -n "${LINKS:-}" ]; then
  gate links $LINKS_PORT "$OFF_CHECKS
  uribl:
    mode: enforce
    zones: [{zone: uri1.test, action: reject}, {zone: uri2.test, returns: [\"&0.0.0.8\"], score: 5}]
rules_dir: $PWD/rules" warn $TMP/links.log ""
  gate rules $RULES_PORT "$OFF_CHECKS
rules_dir: $PWD/rules" warn $TMP/rules.log ""
  TARGETS="$TARGETS rules:$RULES_PORT links:$LINKS_PORT"
fi
if [ -n "${POLICIES:-}" ]; then
  for n in 1 200; do
    d=$TMP/rules$n; cp -r rules $d; mkdir -p $d/policies
    printf 'domains: [example.test]\nthresholds: {reject: 20, tag: 4}\nchecks: {greylist: {mode: off}}\n' >$d/policies/example.test.yaml
    for i in $(seq 2 $n); do
      printf 'domains: [d%d.test, "*.d%d.test"]\nthresholds: {reject: %d}\nallow: {senders: [partner%d.test]}\n' $i $i $((10 + i % 7)) $i >$d/policies/d$i.test.yaml
    done
  done
  if [ -z "${LINKS:-}" ]; then
    gate rules $RULES_PORT "$OFF_CHECKS
rules_dir: $PWD/rules" warn $TMP/rules.log ""
    TARGETS="$TARGETS rules:$RULES_PORT"
  fi
  gate pol1 $POL1 "$OFF_CHECKS
rules_dir: $TMP/rules1" warn $TMP/pol1.log ""
  gate pol200 $POL200 "$OFF_CHECKS
rules_dir: $TMP/rules200" warn $TMP/pol200.log ""
  TARGETS="$TARGETS pol1:$POL1 pol200:$POL200"
fi
if [ -n "${SCANNERS:-}" ]; then
  mkdir -p $TMP/clamd/db
  echo "44d88612fea8a8f36de82e1278abb02f:68:Bench.Test.UNOFFICIAL" >$TMP/clamd/db/bench.hdb
  printf 'Foreground yes\nTCPSocket %s\nTCPAddr 127.0.0.1\nDatabaseDirectory %s\nLogFile %s\n' \
    $CLAMD $TMP/clamd/db $TMP/clamd/clamd.log >$TMP/clamd/clamd.conf
  chmod -R a+rX $TMP/clamd
  (/usr/sbin/clamd -c $TMP/clamd/clamd.conf >/dev/null 2>&1 & echo $! >$TMP/clamd_daemon.pid)
  . benches/rspamd.sh
  start_rspamd $TMP/rspamd $DNS normal "bind_socket = \"127.0.0.1:$RSPAMD\";
count = 1;"
  # A link: rspamd may rewrite its pid file after it has forked.
  ln -s $TMP/rspamd/run/rspamd.pid $TMP/rspamd_daemon.pid
  gate clamd $CLAMD_GATE "$OFF_CHECKS
  antivirus: {mode: enforce, clamd: \"127.0.0.1:$CLAMD\", connections: 32}" warn $TMP/clamd_gate.log ""
  gate rspamd $RSPAMD_GATE "$OFF_CHECKS
  scanner: {mode: enforce, kind: rspamd, address: \"127.0.0.1:$RSPAMD\", connections: 32}" warn $TMP/rspamd_gate.log ""
  # clamd loads its database before it listens.
  for i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$CLAMD) 2>/dev/null && break; sleep 0.1; done
  for i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$RSPAMD) 2>/dev/null && break; sleep 0.1; done
  TARGETS="$TARGETS clamd:$CLAMD_GATE rspamd:$RSPAMD_GATE"
fi
if [ -n "${SPLIT:-}" ]; then
  gate spf $SPLIT_SPF "$(grep -v 'spf:' <<<"$OFF_CHECKS")
  spf: {mode: enforce}" warn $TMP/spf.log ""
  gate dnsbl $SPLIT_DNSBL "$(grep -v 'dnsbl:' <<<"$OFF_CHECKS")
  dnsbl:
    mode: enforce
    zones: [{zone: bl1.test, action: reject}, {zone: bl2.test, score: 5}]" warn $TMP/dnsbl.log ""
  gate rules_only $SPLIT_RULES "$OFF_CHECKS
rules_dir: $PWD/rules" warn $TMP/rules_only.log ""
  TARGETS="$TARGETS spf:$SPLIT_SPF dnsbl:$SPLIT_DNSBL rules_only:$SPLIT_RULES"
fi
if [ -n "${THREADS:-}" ]; then
  gate off_t$THREADS $OFF_T "$OFF_CHECKS
threads: $THREADS" warn $TMP/off_t.log ""
  gate on_t$THREADS $ON_T "$ON_CHECKS
threads: $THREADS" warn $TMP/on_t.log ""
  TARGETS="$TARGETS off_t$THREADS:$OFF_T on_t$THREADS:$ON_T"
fi
if [ -n "${POOL:-}" ]; then
  gate nopool $NOPOOL "$OFF_CHECKS" warn $TMP/nopool.log "" "" ", pool: {max_idle: 0}"
  TARGETS="$TARGETS nopool:$NOPOOL"
fi
if [ -z "${NO_POSTFIX:-}" ] && command -v postfix >/dev/null && [ "$(id -u)" = 0 ]; then
  # Postfix as the relay an administrator might put here instead; its
  # queue under TMP (readable by Postfix's own users).
  P=$TMP/postfix; mkdir -p $P/conf $P/run/queue $P/run/data; chmod 755 $TMP $P
  chown postfix $P/run/data
  sed -e "s|@RUN@|$P/run|g" tests/peers/postfix/main.cf | grep -v '^virtual_' >$P/conf/main.cf
  cat >>$P/conf/main.cf <<CF
relay_domains = example.test
transport_maps = inline:{example.test=smtp:[127.0.0.1]:$SINK}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
CF
  sed -e "s|@PORT@|$POSTFIX|; /@PROXY_PORT@/,\$d" tests/peers/postfix/master.cf >$P/conf/master.cf
  postfix -c $P/conf check
  postfix -c $P/conf start
  for i in $(seq 100); do [ -s $P/run/queue/pid/master.pid ] && break; sleep 0.1; done
  awk '{print $1}' $P/run/queue/pid/master.pid >$TMP/postfix.pid
  TARGETS="$TARGETS postfix:$POSTFIX"
fi
if [ -n "${BASE_BIN:-}" ]; then
  gate base_off $BASE_OFF "$OFF_CHECKS" warn $TMP/base_off.log "" "$BASE_BIN"
  gate base_on $BASE_ON "$ON_CHECKS" warn $TMP/base_on.log "" "$BASE_BIN"
  TARGETS="$TARGETS base_off:$BASE_OFF base_on:$BASE_ON"
fi
for t in $TARGETS; do
  p=${t#*:}
  for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
# Warm the checks-on gates' caches (and Postfix's processes).
smtp-source -s 1 -m 5 -l 100 -f a@example.test -t b@example.test 127.0.0.1:$ON
if [[ "$TARGETS" == *postfix:* ]]; then
  smtp-source -s 2 -m 20 -l 100 -f a@example.test -t b@example.test 127.0.0.1:$POSTFIX
fi
if [ -n "${LINKS:-}" ]; then
  smtp-source -s 1 -m 5 $(if [ -n "$MSGFILE" ]; then echo "-F $MSGFILE"; else echo "-l $BYTES"; fi) \
    -f a@example.test -t b@example.test 127.0.0.1:$LINKS_PORT
fi
if [ -n "${STATE:-}" ]; then
  # Greylisted, then passed after the delay: the client is allowed from now on.
  for p in $STATE_EMB $STATE_REDIS $STATE_EXACT; do
    smtp-source -s 1 -m 2 -l 100 -f a@example.test -t b@example.test 127.0.0.1:$p 2>/dev/null || true
  done
  sleep 1.2
  for p in $STATE_EMB $STATE_REDIS $STATE_EXACT; do
    smtp-source -s 1 -m 2 -l 100 -f a@example.test -t b@example.test 127.0.0.1:$p
  done
fi
if [ -n "${BASE_BIN:-}" ]; then
  smtp-source -s 1 -m 5 -l 100 -f a@example.test -t b@example.test 127.0.0.1:$BASE_ON
fi
if [ -n "${SPLIT:-}" ]; then
  for p in $SPLIT_SPF $SPLIT_DNSBL $SPLIT_RULES; do
    smtp-source -s 1 -m 5 -l 100 -f a@example.test -t b@example.test 127.0.0.1:$p
  done
fi

# PERF=<target> (with PERF_D=1: connections reused): profile that gate
# instead of the rounds (benches/perf.sh).
if [ -n "${PERF:-}" ]; then
  . benches/perf.sh
  port=""; for t in $TARGETS; do [ "${t%%:*}" = "$PERF" ] && port=${t#*:}; done
  [ -n "$port" ] || { echo "PERF=$PERF: not a target of this run ($TARGETS)" >&2; exit 1; }
  profile_target "$PERF" "$port" 2000 ${PERF_D:+-d} -s $SESS -l $BYTES
  exit 0
fi
MODES="single"
[ -n "${REUSED:-}" ] && MODES="single reused"
rate() { # port mode -> msg/s
  local t0 t1 reuse=""
  [ "$2" = reused ] && reuse=-d
  t0=$(date +%s.%N)
  smtp-source $reuse -s $SESS -m $MSGS $(if [ -n "$MSGFILE" ]; then echo "-F $MSGFILE"; else echo "-l $BYTES"; fi) -f a@example.test -t b@example.test 127.0.0.1:$1
  t1=$(date +%s.%N)
  awk -v m=$MSGS -v a=$t0 -v b=$t1 'BEGIN{printf "%.1f", m/(b-a)}'
}
# Postfix delivers what it queued after smtp-source is done: wait for
# that (its CPU counted, its time not) before the next target runs.
drained() {
  local t0; t0=$(date +%s)
  until postqueue -c $TMP/postfix/conf -p 2>/dev/null | grep -q 'Mail queue is empty'; do
    [ $(( $(date +%s) - t0 )) -ge 120 ] && { echo "postfix: queue not empty after 120 s" >&2; break; }
    sleep 0.2
  done
}
declare -A all
# CPU ticks of each gate per mode, and their user part: read before and
# after each run. Most of a relay's CPU is the kernel's, the same for
# every relay that makes the same system calls.
declare -A cpu ucpu
ticks() { # gate -> "total user"
  local pid; pid=$(cat $TMP/$1.pid)
  if [ $1 = postfix ]; then
    # master's own, its children's that exited (reaped: cutime, cstime),
    # and those alive.
    { awk '{print $14 + $15 + $16 + $17, $14 + $16}' /proc/$pid/stat
      for c in $(pgrep -P $pid || true); do awk '{print $14 + $15, $14}' /proc/$c/stat 2>/dev/null || true; done
    } | awk '{s += $1; u += $2} END {print s, u}'
  else
    awk '{print $14 + $15, $14}' /proc/$pid/stat
  fi
}
# Each round starts one target further on: a fixed order measured later
# targets about 8% faster (an A/A run, the same binary as BASE_BIN).
rotated() { local -a a=($TARGETS); local k=$(( $1 % ${#a[@]} )); echo "${a[@]:k} ${a[@]:0:k}"; }
for r in $(seq $ROUNDS); do
  for mode in $MODES; do
    line="round $r ($mode):"
    for t in $(rotated $r); do
      n=${t%%:*}
      [ $n != direct ] && read -r before ubefore < <(ticks $n)
      v=$(rate ${t#*:} $mode); all[$n.$mode]+="$v "
      [ $n = postfix ] && drained
      if [ $n != direct ]; then
        read -r after uafter < <(ticks $n)
        cpu[$n.$mode]=$(( ${cpu[$n.$mode]:-0} + after - before ))
        ucpu[$n.$mode]=$(( ${ucpu[$n.$mode]:-0} + uafter - ubefore ))
      fi
      line="$line $n $v"
    done
    echo "$line msg/s"
  done
done
median() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END{print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
what="$BYTES-byte bodies"
[ -n "$MSGFILE" ] && what="a $(wc -c <$MSGFILE)-byte HTML message with 50 link domains"
tick=$(getconf CLK_TCK)
for mode in $MODES; do
  d=$(median "${all[direct.$mode]}")
  printf 'median msg/s (%s): direct %.0f' "$mode" "$d"
  for t in $TARGETS; do
    n=${t%%:*}; [ $n = direct ] && continue
    m=$(median "${all[$n.$mode]}")
    printf ', %s %.0f (ratio %.2f)' "$n" "$m" "$(awk -v a=$m -v b=$d 'BEGIN{print a/b}')"
  done
  printf '   [%d msgs x %d rounds, %d sessions, %s]\n' "$MSGS" "$ROUNDS" "$SESS" "$what"
  # CPU per message (user + system, from /proc): steadier than msg/s on a
  # shared machine, and it shows what a feature costs the gate itself.
  # Then the user part alone, in brackets.
  line="cpu per message ($mode):"
  for t in $TARGETS; do
    n=${t%%:*}; [ $n = direct ] && continue
    line="$line $n $(awk -v c=${cpu[$n.$mode]} -v u=${ucpu[$n.$mode]} -v t=$tick -v m=$((ROUNDS * MSGS)) 'BEGIN{printf "%.0f us (user %.0f)", c / t / m * 1e6, u / t / m * 1e6}')"
  done
  echo "$line"
done
if [ -n "${STATE:-}" ]; then
  echo "redis-server: $(awk -v t=$tick -v m=$((ROUNDS * MSGS * $(echo $MODES | wc -w))) '{printf "%.0f", ($14 + $15) / t / m * 1e6}' /proc/$(cat $TMP/redis.pid)/stat) us CPU per message"
fi
# Upstream connections opened per 1,000 client sessions, from each gate's
# metrics (the gates with their own metrics port are skipped).
line="upstream connections per 1,000 client sessions:"
for t in $TARGETS; do
  n=${t%%:*}; p=${t#*:}; [ $n = direct ] && continue
  grep -qs "127.0.0.1:$((METRICS_BASE + p % 100))" $TMP/$n.yaml || continue
  metrics=$( (exec 3<>/dev/tcp/127.0.0.1/$((METRICS_BASE + p % 100)); printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3; cat <&3) 2>/dev/null || true)
  sessions=$(echo "$metrics" | awk '$1 == "portcullis_connections_total" {print $2}')
  opened=$(echo "$metrics" | awk 'index($1, "portcullis_upstream_connections_total{") == 1 && index($1, "kind=\"opened\"") {print $2}')
  # (a build from before the metric: n/a)
  line="$line $n $(awk -v o="$opened" -v s=${sessions:-0} 'BEGIN{ if (s > 0 && o != "") printf "%.1f", o / s * 1000; else printf "n/a" }')"
done
echo "$line"
if [ -n "${SCANNERS:-}" ]; then
  # With SESS sessions in flight, a message takes SESS/rate seconds.
  o=$(median "${all[off.single]}")
  for n in clamd rspamd; do
    m=$(median "${all[$n.single]}")
    main=$(cat $TMP/${n}_daemon.pid)
    # The daemon and its workers (rspamd scans in a child process).
    # (a helper process may be gone by the time it is read)
    cpu=$(for p in $main $(pgrep -P $main || true); do cat /proc/$p/stat 2>/dev/null || true; done |
      awk -v t=$tick -v m=$((ROUNDS * MSGS * $(echo $MODES | wc -w) + 5)) '{s += $14 + $15} END {printf "%.0f", s / t / m * 1e6}')
    echo "$n adds $(awk -v s=$SESS -v a=$m -v b=$o 'BEGIN{printf "%.2f", (s/a - s/b) * 1000}') ms per message (median, $SESS sessions); $n itself: $cpu us CPU per message"
  done
fi
if [ -n "${GATE_LOG:-}" ]; then echo "log lines written: $(grep -c '"transaction"' $TMP/logged.log)"; fi
if [ -n "${STATE:-}" ]; then
  for m in embedded:$M_EMB redis:$M_REDIS redis_exact:$M_EXACT; do
    exec 3<>/dev/tcp/127.0.0.1/${m#*:}
    printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
    metrics=$(cat <&3); exec 3<&-
    b=${m%%:*}; b=${b%_exact}
    # The bucket bound (le) under which a share $1 of the calls fell.
    q() { echo "$metrics" | awk -v b="$b" -v q="$1" '
      index($1, "portcullis_state_seconds_bucket{") == 1 && index($1, "backend=\"" b "\"") {
        match($1, /le="[^"]*"/); le = substr($1, RSTART + 4, RLENGTH - 5); n[++k] = $2; l[k] = le }
      END { for (i = 1; i <= k; i++) if (n[i] >= q * n[k]) { if (l[i] == "+Inf") print "over 100000"; else printf "%.0f", l[i] * 1e6; exit } }'; }
    calls=$(echo "$metrics" | awk -v b="$b" 'index($1, "portcullis_state_seconds_count{") == 1 && index($1, "backend=\"" b "\"") {print $2}')
    errors=$(echo "$metrics" | awk -v b="$b" 'index($1, "portcullis_state_errors_total{") == 1 && index($1, "backend=\"" b "\"") {print $2}')
    echo "state store ${m%%:*}: round trip p50 <= $(q 0.5) us, p99 <= $(q 0.99) us (bucket bounds) over ${calls:-0} calls, ${errors:-0} errors"
  done
fi
