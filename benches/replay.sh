#!/usr/bin/env bash
# Replay throughput: `portcullis replay --no-dns` over an mbox of N
# generated messages (about 2 KB each, a tenth with an attachment, with
# the Received and envelope fields an MTA writes), with the shipped rules.
# Prints messages per second and peak RSS for N and for 10 x N, to show
# that memory does not grow with the mbox (it is streamed).
#   benches/replay.sh [MESSAGES]
set -euo pipefail
N=${1:-10000}
cd "$(dirname "$0")/.."
TMP=$(mktemp -d); trap 'rm -rf $TMP' EXIT
cargo build --release --ignore-rust-version -q --bin portcullis
cat >$TMP/replay.yaml <<YAML
hostname: gate.bench
listen: [{addr: "127.0.0.1:25"}]
upstream: {addr: "127.0.0.1:2525"}
rules_dir: $PWD/rules
YAML
mbox() { # messages -> file
  awk -v n=$1 'BEGIN {
    body = ""; for (i = 0; i < 25; i++) body = body "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"
    att = ""; for (i = 0; i < 10; i++) att = att "TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
    for (m = 1; m <= n; m++) {
      printf "From sender%d@example.net Sat Dec  5 06:00:00 2026\n", m % 97
      printf "Return-Path: <sender%d@example.net>\nDelivered-To: user%d@example.org\n", m % 97, m % 13
      printf "Received: from mx%d.example.net (mx%d.example.net [192.0.2.%d])\n\tby mx.example.org (Postfix) with ESMTPS id Q%08d\n\tfor <user%d@example.org>; Sat, 5 Dec 2026 06:00:00 +0000\n", m % 50, m % 50, m % 250 + 1, m, m % 13
      printf "Message-ID: <%d@example.net>\nFrom: Sender <sender%d@example.net>\nTo: user%d@example.org\nSubject: Report %d\nDate: Sat, 5 Dec 2026 06:00:00 +0000\nMIME-Version: 1.0\n", m, m % 97, m % 13, m
      if (m % 10 == 0) {
        printf "Content-Type: multipart/mixed; boundary=\"b\"\n\n--b\nContent-Type: text/plain\n\n%s\n--b\nContent-Type: application/octet-stream; name=\"report%d.exe\"\nContent-Transfer-Encoding: base64\n\n%s--b--\n\n", body, m, att
      } else {
        printf "Content-Type: text/plain\n\n%s>From the archive\n\n", body
      }
    }
  }' >$2
}
run() { # mbox -> "msg/s rss_kib"
  local t0 t1 rss
  t0=$(date +%s.%N)
  rss=$( { /usr/bin/time -f '%M' ./target/release/portcullis replay --no-dns --config $TMP/replay.yaml $1 >$TMP/out.txt; } 2>&1 | tail -1)
  t1=$(date +%s.%N)
  echo "$(awk -v a=$t0 -v b=$t1 -v n=$2 'BEGIN{printf "%.0f", n/(b-a)}') $rss"
}
mbox $N $TMP/small.mbox
mbox $((N * 10)) $TMP/big.mbox
for r in 1 2 3; do
  s=$(run $TMP/small.mbox $N); b=$(run $TMP/big.mbox $((N * 10)))
  echo "round $r: $N messages ($(du -h $TMP/small.mbox | cut -f1)): ${s% *} msg/s, peak RSS ${s#* } KiB; $((N * 10)) messages ($(du -h $TMP/big.mbox | cut -f1)): ${b% *} msg/s, peak RSS ${b#* } KiB"
done
tail -8 $TMP/out.txt
