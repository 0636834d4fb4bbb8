#!/usr/bin/env bash
# Load benchmark: smtp-source -> Portcullis -> smtp-sink against
# smtp-source -> smtp-sink directly, alternating in one run (machines are
# noisy: compare within a run, quote medians and the ratio).
#   benches/load.sh [ROUNDS] [MESSAGES] [SESSIONS] [BODY_BYTES]
# Needs smtp-source and smtp-sink (Debian package postfix). Everything on loopback.
set -euo pipefail
ROUNDS=${1:-5}; MSGS=${2:-20000}; SESS=${3:-20}; BYTES=${4:-2000}
cd "$(dirname "$0")/.."
SINK_PORT=${SINK_PORT:-12525}; GATE_PORT=${GATE_PORT:-12526}
TMP=$(mktemp -d); trap 'kill $(cat $TMP/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf $TMP' EXIT

cargo build --release --ignore-rust-version -q
(smtp-sink -u nobody 127.0.0.1:$SINK_PORT 1000 >$TMP/sink.log 2>&1 & echo $! >$TMP/sink.pid)
cat >$TMP/gate.yaml <<YAML
hostname: gate.bench
listen: [{addr: "127.0.0.1:$GATE_PORT"}]
upstream: {addr: "127.0.0.1:$SINK_PORT", client_identity: none}
limits: {max_connections: 5000, max_connections_per_ip: 5000}
log: {format: json, level: "${GATE_LOG_LEVEL:-warn}"}
YAML
(./target/release/portcullis run --config $TMP/gate.yaml >$TMP/gate.log 2>&1 & echo $! >$TMP/gate.pid)
for p in $SINK_PORT $GATE_PORT; do
  for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

rate() { # port -> msg/s
  local t0 t1
  t0=$(date +%s.%N)
  smtp-source -s $SESS -m $MSGS -l $BYTES -f a@example.test -t b@example.test 127.0.0.1:$1
  t1=$(date +%s.%N)
  echo "$MSGS / ($t1 - $t0)" | bc -l
}
direct=(); gate=()
for r in $(seq $ROUNDS); do
  d=$(rate $SINK_PORT); g=$(rate $GATE_PORT)
  direct+=("$d"); gate+=("$g")
  printf 'round %d: direct %.0f msg/s, via portcullis %.0f msg/s, ratio %.2f\n' "$r" "$d" "$g" "$(echo "$g/$d" | bc -l)"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
md=$(median "${direct[@]}"); mg=$(median "${gate[@]}")
printf 'median: direct %.0f msg/s, via portcullis %.0f msg/s, ratio %.2f (%d msgs x %d rounds, %d sessions, %d-byte bodies)\n' \
  "$md" "$mg" "$(echo "$mg/$md" | bc -l)" "$MSGS" "$ROUNDS" "$SESS" "$BYTES"
