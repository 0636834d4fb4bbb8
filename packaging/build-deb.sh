#!/usr/bin/env bash
# Builds the Debian package: target/debian/portcullis_<version>-1_<arch>.deb.
# Needs cargo-deb (`cargo install cargo-deb --locked`).
#
# The installed config is the reference portcullis.yaml with the state file
# switched on (/var/lib/portcullis, the unit's StateDirectory); man pages and
# completions come from the CLI definition of the binary just built.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --ignore-rust-version --bin portcullis
out=target/package
rm -rf "$out"; mkdir -p "$out/man" "$out/completions"
target/release/portcullis generate man "$out/man" >/dev/null
for shell in bash zsh fish; do
  target/release/portcullis generate completions "$shell" >"$out/completions/portcullis.$shell"
done

want='  file: /var/lib/portcullis/state.jsonl'
sed "s|^  # file: /var/lib/portcullis/state.jsonl|$want|" portcullis.yaml >"$out/portcullis.yaml"
grep -qxF "$want" "$out/portcullis.yaml" || { echo "state.file line not found in portcullis.yaml" >&2; exit 1; }
target/release/portcullis check --config "$out/portcullis.yaml" >/dev/null

# --strip: the release profile keeps line tables for profiling; the package need not.
cargo deb --no-build --strip "$@"
