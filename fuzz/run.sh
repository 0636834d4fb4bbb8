#!/usr/bin/env bash
# Builds and runs one cargo-fuzz target (libFuzzer + ASan) on a stable
# toolchain: cargo-fuzz itself cannot pass --ignore-rust-version (see the
# README), so this does its build step by hand with the same flags.
#   fuzz/run.sh command_parser|data_reader|milter_codec [SECONDS]
set -euo pipefail
T=${1:?target}; SECS=${2:-600}
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1 ASAN_OPTIONS="detect_odr_violation=0"
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address \
-Cllvm-args=-sanitizer-coverage-stack-depth -Cdebug-assertions -Ccodegen-units=1" \
  cargo build --ignore-rust-version --release --target x86_64-unknown-linux-gnu \
  --config 'profile.release.debug="line-tables-only"' --bin "$T" --target-dir target
mkdir -p "corpus/$T"
exec "./target/x86_64-unknown-linux-gnu/release/$T" "corpus/$T" -max_total_time="$SECS" -max_len=4096
