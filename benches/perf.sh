# Sourced by load.sh and milter.sh for PERF=<target>: instead of the
# rounds, record that target's process with perf (DWARF call graphs: the
# release build has no frame pointers) for PERF_SECONDS (default 15)
# while smtp-source drives it, fold and draw a flame graph with inferno
# (`cargo install inferno`) into PERF_OUT (default target/perf/<target>.svg),
# and print the process's CPU per message over that time (perf's own
# overhead included, so higher than the rounds give).
#   profile_target NAME PORT MESSAGES_PER_RUN [smtp-source options...]
# NAME names the process (its pid file in $TMP), PORT is where smtp-source
# sends (for milter.sh, Postfix's port for that milter).
profile_target() {
  local name=$1 port=$2 per=$3; shift 3
  local tool
  for tool in perf inferno-collapse-perf inferno-flamegraph; do
    command -v $tool >/dev/null || { echo "PERF: $tool is not installed" >&2; return 1; }
  done
  [ -f "$TMP/$name.pid" ] || { echo "PERF=$name: no process of that name was started" >&2; return 1; }
  local pid out rec n=0 s0 s1
  pid=$(cat "$TMP/$name.pid")
  out=${PERF_OUT:-target/perf/$name.svg}
  mkdir -p "$(dirname "$out")"
  perf record -F 2999 --call-graph dwarf,16384 -p "$pid" -o "$TMP/perf.data" \
    -- sleep "${PERF_SECONDS:-15}" >"$TMP/perf.log" 2>&1 &
  rec=$!
  sleep 0.5  # perf attaches
  s0=$(awk '{print $14 + $15}' /proc/$pid/stat)
  while kill -0 $rec 2>/dev/null; do
    smtp-source "$@" -m "$per" -f a@example.test -t b@example.test 127.0.0.1:$port
    n=$((n + per))
  done
  s1=$(awk '{print $14 + $15}' /proc/$pid/stat)
  wait $rec || { cat "$TMP/perf.log" >&2; return 1; }
  perf script -i "$TMP/perf.data" 2>/dev/null | inferno-collapse-perf >"${out%.svg}.folded"
  inferno-flamegraph --minwidth 0.05 --title "$name: ${PERF_TITLE:-smtp-source $*}" \
    <"${out%.svg}.folded" >"$out"
  awk -v a=$s0 -v b=$s1 -v n=$n -v t=$(getconf CLK_TCK) -v o="$out" -v name=$name \
    'BEGIN {printf "%s: %d messages, %.0f us CPU per message under perf; flame graph %s\n", name, n, (b - a) / t / n * 1e6, o}'
}
