#!/usr/bin/env bash
# Idle-load benchmark: N idle connections held open while one client sends
# M messages; prints that client's latency with and without the idle load
# and Portcullis's RSS per idle session.   benches/idle.sh [N] [M]
# Needs smtp-sink (Debian package postfix) and python3. Loopback only.
# The gate runs the shipped default checks, against the benchmark's own
# DNS server (examples/bench_dns.rs): without one every lookup would wait
# for its timeout and the latencies would measure that.
set -euo pipefail
N=${1:-5000}; M=${2:-100}
cd "$(dirname "$0")/.."
SINK_PORT=${SINK_PORT:-12625}; GATE_PORT=${GATE_PORT:-12626}; DNS=127.0.0.1:${DNS_PORT:-15354}
TMP=$(mktemp -d); trap 'kill $(cat $TMP/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf $TMP' EXIT
ulimit -n $(( N + 1000 < $(ulimit -Hn) ? N + 1000 : $(ulimit -Hn) ))
cargo build --release --ignore-rust-version -q --bin portcullis --example bench_dns
(./target/release/examples/bench_dns $DNS >$TMP/dns.log 2>&1 & echo $! >$TMP/dns.pid)
(smtp-sink -u nobody 127.0.0.1:$SINK_PORT 1000 >$TMP/sink.log 2>&1 & echo $! >$TMP/sink.pid)
cat >$TMP/gate.yaml <<YAML
hostname: gate.bench
listen: [{addr: "127.0.0.1:$GATE_PORT", backlog: 4096}]
upstream: {addr: "127.0.0.1:$SINK_PORT", client_identity: none}
limits: {max_connections: $((N + 100)), max_connections_per_ip: $((N + 100)), max_connections_per_network: $((N + 100))}
dns: {nameservers: ["$DNS"]}
log: {format: json, level: warn}
YAML
(./target/release/portcullis run --config $TMP/gate.yaml >$TMP/gate.log 2>&1 & echo $! >$TMP/gate.pid)
for p in $SINK_PORT $GATE_PORT; do
  for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
python3 benches/idle.py $GATE_PORT "$(cat $TMP/gate.pid)" "$N" "$M"
