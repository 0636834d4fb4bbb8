#!/usr/bin/env bash
# Portcullis in front of a real Postfix (discard transport), the message
# by BDAT (upstream.chunking, the default) and by DATA, alternating in one
# run with Postfix alone (quote medians and ratios; machines are noisy).
#   benches/postfix_upstream.sh [ROUNDS] [MESSAGES] [SESSIONS] [BYTES] [smtp-source flags, e.g. -d]
# STRACE=1 counts each gate's system calls per message (strace -c).
# Needs Postfix (smtp-source, postfix) and root (Postfix's own users).
set -euo pipefail
ROUNDS=${1:-5}; MSGS=${2:-3000}; SESS=${3:-20}; BYTES=${4:-2000}; EXTRA=${5:-}
cd "$(dirname "$0")/.."
cargo build --release --ignore-rust-version -q --bin portcullis
PF=12560; G_ON=12561; G_OFF=12562
TMP=$(mktemp -d); chmod 755 $TMP
cleanup() { postfix -c $TMP/conf stop >/dev/null 2>&1 || true; kill $(cat $TMP/*.pid) 2>/dev/null || true; rm -rf $TMP; }
trap cleanup EXIT
mkdir -p $TMP/conf $TMP/run/queue $TMP/run/data; chown postfix $TMP/run/data
sed -e "s|@RUN@|$TMP/run|g" tests/peers/postfix/main.cf | grep -v '^virtual_' >$TMP/conf/main.cf
cat >>$TMP/conf/main.cf <<CF
relay_domains = example.test
transport_maps = inline:{example.test=discard:}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
CF
sed -e "s|@PORT@|$PF|; /@PROXY_PORT@/,\$d" tests/peers/postfix/master.cf >$TMP/conf/master.cf
postfix -c $TMP/conf check; postfix -c $TMP/conf start
gate() { # name port chunking
  cat >$TMP/$1.yaml <<Y
hostname: gate.bench
listen: [{addr: "127.0.0.1:$2"}]
upstream: {addr: "127.0.0.1:$PF", client_identity: none, chunking: $3}
limits: {max_connections: 5000, max_connections_per_ip: 5000, max_connections_per_network: 5000}
dns: {nameservers: ["127.0.0.1:15399"]}
log: {format: json, level: warn}
checks:
  spf: {mode: off}
  dkim: {mode: off}
  dmarc: {mode: off}
  arc: {mode: off}
  iprev: {mode: off}
  dnsbl: {mode: off}
Y
  (./target/release/portcullis run --config $TMP/$1.yaml >$TMP/$1.log 2>&1 & echo $! >$TMP/$1.pid)
}
gate bdat $G_ON true; gate data $G_OFF false
sleep 1
for p in $PF $G_ON $G_OFF; do for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done; smtp-source -s 2 -m 20 -l 100 $EXTRA -f a@example.test -t b@example.test 127.0.0.1:$p; done
declare -A all cpu
if [ -n "${STRACE:-}" ]; then for n in bdat data; do (strace -c -f -p $(cat $TMP/$n.pid) -o $TMP/st-$n.txt & echo $! > $TMP/st-$n.spid); done; sleep 1; fi
ticks() { awk '{print $14 + $15}' /proc/$(cat $TMP/$1.pid)/stat; }
rate() { local t0 t1; t0=$(date +%s.%N); smtp-source -s $SESS -m $MSGS -l $BYTES $EXTRA -f a@example.test -t b@example.test 127.0.0.1:$1; t1=$(date +%s.%N); awk -v m=$MSGS -v a=$t0 -v b=$t1 'BEGIN{printf "%.1f", m/(b-a)}'; }
TARGETS="postfix:$PF bdat:$G_ON data:$G_OFF"
rotated() { local -a a=($TARGETS); local k=$(( $1 % ${#a[@]} )); echo "${a[@]:k} ${a[@]:0:k}"; }
for r in $(seq $ROUNDS); do
  line="round $r:"
  for t in $(rotated $r); do n=${t%%:*}
    [ $n != postfix ] && b=$(ticks $n)
    v=$(rate ${t#*:}); all[$n]+="$v "
    [ $n != postfix ] && cpu[$n]=$(( ${cpu[$n]:-0} + $(ticks $n) - b ))
    line="$line $n $v"
  done; echo "$line"
done
if [ -n "${STRACE:-}" ]; then kill -INT $(cat $TMP/st-*.spid); sleep 2; fi
median() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END{print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
tick=$(getconf CLK_TCK); d=$(median "${all[postfix]}")
for n in bdat data; do m=$(median "${all[$n]}"); echo "$n: median $m msg/s (ratio to postfix $d: $(awk -v a=$m -v b=$d 'BEGIN{printf "%.2f", a/b}')), cpu $(awk -v c=${cpu[$n]} -v t=$tick -v m=$((ROUNDS*MSGS)) 'BEGIN{printf "%.0f", c/t/m*1e6}') us/msg"; done
if [ -n "${STRACE:-}" ]; then
  for n in bdat data; do
    printf '%s system calls per message:' $n
    awk -v m=$((ROUNDS * MSGS)) 'NR > 2 && $NF != "total" && $4 + 0 >= m / 10 {printf " %s %.2f", $NF, $4 / m}' $TMP/st-$n.txt
    echo
  done
fi
