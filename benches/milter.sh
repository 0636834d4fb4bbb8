#!/usr/bin/env bash
# Milter benchmark: smtp-source into a real Postfix three ways, alternating
# in one run (quote medians and ratios; machines are noisy):
#   plain      no milter
#   milter_off Portcullis as a milter with every check off
#   milter_on  Portcullis as a milter with SPF, 2 DNSBL zones and the
#              shipped rules (DNS from examples/bench_dns, warmed first)
#   null       a milter that checks nothing (examples/null_milter.rs: the
#              same steps agreed as Portcullis, a thread per connection):
#              the floor any milter pays through Postfix
#   null_tokio the same on one thread with a current-thread tokio runtime,
#              a task per connection, as Portcullis serves them: the floor
#              for a milter built as Portcullis is
#   opendkim   Debian's OpenDKIM as a verify-only milter, for comparison
#              (when /usr/sbin/opendkim is installed; .ci/run does not need it)
#   rspamd     Debian's rspamd as a milter (its proxy worker in milter mode,
#              scanning itself, two processes, Debian's stock modules, DNS
#              from bench_dns; a minimal config the script writes), when
#              /usr/bin/rspamd is installed (NO_RSPAMD=1 leaves it out)
# BASE_BIN=path/to/older/portcullis adds "base_off" and "base_on": the same two
# milters run by another build, so that a change is judged within one run.
# Postfix discards what it accepts (transport discard:), so the figures are
# smtpd + cleanup + queue, without delivery.
# PERF=<milter> profiles one milter instead (benches/perf.sh: perf and
# inferno, a flame graph in target/perf/).
#   benches/milter.sh [ROUNDS] [MESSAGES] [SESSIONS] [BODY_BYTES]
# Needs Postfix (smtp-source, postfix) and root (Postfix's own users).
set -euo pipefail
ROUNDS=${1:-5}; MSGS=${2:-5000}; SESS=${3:-20}; BYTES=${4:-2000}
cd "$(dirname "$0")/.."
PLAIN=12540; OFF=12541; ON=12542; M_OFF=12543; M_ON=12544; DNS=127.0.0.1:15354
DKIM=12545; M_DKIM=12546; B_OFF=12547; B_ON=12548; MB_OFF=12549; MB_ON=12550
RSPAMD=12551; M_RSPAMD=12552; NULL=12554; M_NULL=12553; NULLT=12557; M_NULLT=12558
TMP=$(mktemp -d); chmod 755 $TMP  # Postfix's own users read its queue under it
cleanup() {
  postfix -c $TMP/conf stop >/dev/null 2>&1 || true
  kill $(cat $TMP/*.pid $TMP/rspamd/run/rspamd.pid 2>/dev/null) 2>/dev/null || true
  rm -rf $TMP
}
trap cleanup EXIT

cargo build --release --ignore-rust-version -q --bin portcullis --example bench_dns --example null_milter
(./target/release/examples/bench_dns $DNS >$TMP/dns.log 2>&1 & echo $! >$TMP/dns.pid)

# UNIX=1: the milters listen on Unix sockets instead of loopback TCP.
where() { # name port -> the milter's address, as Portcullis and Postfix write it
  if [ -n "${UNIX:-}" ]; then echo "unix:$TMP/$1.sock"; else echo "inet:127.0.0.1:$2"; fi
}
gate() { # name milter-port checks-yaml [binary]
  local at; at=$(where $1 $2); at=${at#inet:}
  cat >$TMP/$1.yaml <<YAML
hostname: gate.bench
listen: []
milter: {listen: ["$at"]}
dns: {nameservers: ["$DNS"], min_ttl: 300s}
log: {format: json, level: warn}
checks:
$3
YAML
  (${4:-./target/release/portcullis} run --config $TMP/$1.yaml >$TMP/$1.log 2>&1 & echo $! >$TMP/$1.pid)
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
gate off $M_OFF "$OFF_CHECKS"
gate on $M_ON "$ON_CHECKS"
if [ -n "${BASE_BIN:-}" ]; then
  gate base_off $MB_OFF "$OFF_CHECKS" "$BASE_BIN"
  gate base_on $MB_ON "$ON_CHECKS" "$BASE_BIN"
fi

mkdir -p $TMP/conf $TMP/run/queue $TMP/run/data
chown postfix $TMP/run/data
sed -e "s|@RUN@|$TMP/run|g" tests/peers/postfix/main.cf |
  grep -v '^virtual_' >$TMP/conf/main.cf
cat >>$TMP/conf/main.cf <<CF
relay_domains = example.test
transport_maps = inline:{example.test=discard:}
milter_protocol = 6
milter_default_action = tempfail
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
CF
sed -e "s|@PORT@|$PLAIN|; /@PROXY_PORT@/,\$d" tests/peers/postfix/master.cf >$TMP/conf/master.cf
cat >>$TMP/conf/master.cf <<CF
127.0.0.1:$OFF inet n - n - - smtpd
  -o smtpd_milters=$(where off $M_OFF)
127.0.0.1:$ON inet n - n - - smtpd
  -o smtpd_milters=$(where on $M_ON)
CF
TARGETS="plain:$PLAIN milter_off:$OFF milter_on:$ON"
if [ -z "${UNIX:-}" ]; then
  (./target/release/examples/null_milter 127.0.0.1:$M_NULL >$TMP/null.log 2>&1 & echo $! >$TMP/null.pid)
  (./target/release/examples/null_milter 127.0.0.1:$M_NULLT --tokio >$TMP/null_tokio.log 2>&1 & echo $! >$TMP/null_tokio.pid)
  cat >>$TMP/conf/master.cf <<CF
127.0.0.1:$NULL inet n - n - - smtpd
  -o smtpd_milters=inet:127.0.0.1:$M_NULL
127.0.0.1:$NULLT inet n - n - - smtpd
  -o smtpd_milters=inet:127.0.0.1:$M_NULLT
CF
  TARGETS="$TARGETS null:$NULL null_tokio:$NULLT"
fi
if [ -n "${BASE_BIN:-}" ]; then
  cat >>$TMP/conf/master.cf <<CF
127.0.0.1:$B_OFF inet n - n - - smtpd
  -o smtpd_milters=$(where base_off $MB_OFF)
127.0.0.1:$B_ON inet n - n - - smtpd
  -o smtpd_milters=$(where base_on $MB_ON)
CF
  TARGETS="$TARGETS base_off:$B_OFF base_on:$B_ON"
fi
if [ -x /usr/sbin/opendkim ]; then
  cat >$TMP/opendkim.conf <<CF
Mode v
Socket $(where dkim $M_DKIM | sed 's/^inet:\(.*\):\(.*\)$/inet:\2@\1/')
Syslog no
PidFile $TMP/opendkim.file.pid
CF
  (/usr/sbin/opendkim -f -x $TMP/opendkim.conf >$TMP/opendkim.log 2>&1 & echo $! >$TMP/opendkim.pid)
  cat >>$TMP/conf/master.cf <<CF
127.0.0.1:$DKIM inet n - n - - smtpd
  -o smtpd_milters=$(where dkim $M_DKIM)
CF
  TARGETS="$TARGETS opendkim:$DKIM"
fi
if [ -x /usr/bin/rspamd ] && [ -z "${NO_RSPAMD:-}" ]; then
  if [ -n "${UNIX:-}" ]; then at="$TMP/rspamd.sock mode=0666"; else at="127.0.0.1:$M_RSPAMD"; fi
  . benches/rspamd.sh
  start_rspamd $TMP/rspamd $DNS proxy "bind_socket = \"$at\";
milter = yes;
timeout = 120s;
count = 2;
upstream \"local\" {
  default = yes;
  self_scan = yes;
}"
  rspamd_at=$(where rspamd $M_RSPAMD)
  cat >>$TMP/conf/master.cf <<CF
127.0.0.1:$RSPAMD inet n - n - - smtpd
  -o smtpd_milters=$rspamd_at
CF
  TARGETS="$TARGETS rspamd:$RSPAMD"
  if [ -z "${UNIX:-}" ]; then
    for i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$M_RSPAMD) 2>/dev/null && break; sleep 0.1; done
  fi
fi
sleep 1  # the milters bind
[ -n "${UNIX:-}" ] && chmod 666 $TMP/*.sock  # Postfix runs as postfix
postfix -c $TMP/conf check
postfix -c $TMP/conf start
for t in $TARGETS; do
  p=${t#*:}
  for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
# Warm the DNS cache of the checks-on gate, and Postfix's processes.
for t in $TARGETS; do
  p=${t#*:}
  smtp-source -s 2 -m 20 -l 100 -f a@example.test -t b@example.test 127.0.0.1:$p
done

# PERF=<milter> (off, on, null, null_tokio, base_off, base_on): profile
# that milter through its Postfix instead of the rounds (benches/perf.sh).
if [ -n "${PERF:-}" ]; then
  . benches/perf.sh
  port=""; for t in $TARGETS; do
    case ${t%%:*} in "$PERF"|"milter_$PERF") port=${t#*:};; esac
  done
  [ -n "$port" ] || { echo "PERF=$PERF: not a target of this run ($TARGETS)" >&2; exit 1; }
  profile_target "$PERF" "$port" 1000 -s $SESS -l $BYTES
  exit 0
fi
rate() { # port -> msg/s
  local t0 t1
  t0=$(date +%s.%N)
  smtp-source -s $SESS -m $MSGS -l $BYTES -f a@example.test -t b@example.test 127.0.0.1:$1
  t1=$(date +%s.%N)
  awk -v m=$MSGS -v a=$t0 -v b=$t1 'BEGIN{printf "%.1f", m/(b-a)}'
}
declare -A all
# Each round starts one target further on (a fixed order favours the
# later targets; see load.sh).
rotated() { local -a a=($TARGETS); local k=$(( $1 % ${#a[@]} )); echo "${a[@]:k} ${a[@]:0:k}"; }
for r in $(seq $ROUNDS); do
  line="round $r:"
  for t in $(rotated $r); do
    v=$(rate ${t#*:}); all[${t%%:*}]+="$v "
    line="$line ${t%%:*} $v"
  done
  echo "$line msg/s"
done
median() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END{print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
d=$(median "${all[plain]}")
printf 'median msg/s: plain %.0f' "$d"
for t in $TARGETS; do
  t=${t%%:*}; [ $t = plain ] && continue
  m=$(median "${all[$t]}")
  printf ', %s %.0f (ratio %.2f)' "$t" "$m" "$(awk -v a=$m -v b=$d 'BEGIN{print a/b}')"
done
printf '   [%d msgs x %d rounds, %d sessions, %d-byte bodies]\n' "$MSGS" "$ROUNDS" "$SESS" "$BYTES"
tick=$(getconf CLK_TCK)
for n in off on ${BASE_BIN:+base_off base_on} $([ -f $TMP/null.pid ] && echo null null_tokio); do
  # user and system apart: most of it is the kernel's (loopback TCP, wake-ups).
  case $n in null) what="null milter";; null_tokio) what="null milter (tokio)";; *) what="portcullis ($n)";; esac
  printf '%s cpu per message: %s, RSS %s MB\n' "$what" \
    "$(awk -v t=$tick -v m=$((ROUNDS * MSGS)) '{printf "%.0f us (user %.0f, system %.0f)", ($14 + $15) / t / m * 1e6, $14 / t / m * 1e6, $15 / t / m * 1e6}' /proc/$(cat $TMP/$n.pid)/stat)" \
    "$(awk '/VmRSS/ {printf "%.0f", $2 / 1024}' /proc/$(cat $TMP/$n.pid)/status)"
done
if [[ "$TARGETS" == *rspamd:* ]]; then
  main=$(cat $TMP/rspamd/run/rspamd.pid)
  # The main process and its workers (the proxy scans in its workers).
  cpu=$(for p in $main $(pgrep -P $main || true); do cat /proc/$p/stat 2>/dev/null || true; done |
    awk -v t=$tick -v m=$((ROUNDS * MSGS + 40)) '{s += $14 + $15} END {printf "%.0f", s / t / m * 1e6}')
  rss=$(for p in $main $(pgrep -P $main || true); do cat /proc/$p/status 2>/dev/null || true; done |
    awk '/VmRSS/ {s += $2} END {printf "%.0f", s / 1024}')
  echo "rspamd cpu per message: $cpu us, RSS $rss MB (all its processes)"
fi
