#!/usr/bin/env bash
# Builds the Debian package: target/debian/portcullis_<version>-1_<arch>.deb.
# Needs cargo-deb (`cargo install cargo-deb --locked`).
#
# The installed config is the reference portcullis.yaml with the state file
# switched on (/var/lib/portcullis, the unit's StateDirectory); man pages and
# completions come from the CLI definition of the binary just built.
#
# PROFILE=dev packages the debug build that the tests use instead of a
# release build (.ci/run does: the package test checks what is installed
# and that it runs, not its speed; cargo-deb warns that it is meant for
# releases). Default: release.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
case $profile in dev) bin=target/debug/portcullis ;; *) bin=target/$profile/portcullis ;; esac

cargo build --profile "$profile" --ignore-rust-version --bin portcullis
out=target/package
rm -rf "$out"; mkdir -p "$out/man" "$out/completions"
$bin generate man "$out/man" >/dev/null
for shell in bash zsh fish; do
  $bin generate completions "$shell" >"$out/completions/portcullis.$shell"
done

# The installed README: links to files of the source tree point to what the
# package installs, and a note says which paths are the source tree's only.
{
  cat <<'NOTE'
> Installed by the Debian package as /usr/share/doc/portcullis/README.md.
> Installed beside it: [rules.md](rules.md) (writing rules),
> [portcullis.yaml.reference](portcullis.yaml.reference) (every key) and
> grafana-dashboard.json. Your config is /etc/portcullis/portcullis.yaml,
> your rules /etc/portcullis/rules/; the unit is
> /lib/systemd/system/portcullis.service; `man portcullis`. Paths below
> under src/, tests/, benches/, fuzz/, packaging/ and contrib/ are in the
> source tree, not installed.

NOTE
  sed -e 's|](rules/README.md)|](rules.md)|g' \
      -e 's|](portcullis.yaml)|](portcullis.yaml.reference)|g' \
      -e 's|`contrib/portcullis.service`|`/lib/systemd/system/portcullis.service`|g' \
      -e 's|`contrib/grafana/portcullis.json`|`/usr/share/doc/portcullis/grafana-dashboard.json`|g' \
      README.md
} >"$out/README.md"

want='  file: /var/lib/portcullis/state.jsonl'
sed "s|^  # file: /var/lib/portcullis/state.jsonl|$want|" portcullis.yaml >"$out/portcullis.yaml"
grep -qxF "$want" "$out/portcullis.yaml" || { echo "state.file line not found in portcullis.yaml" >&2; exit 1; }
# The reference config must pass; the installed one (its state file's
# directory exists only once installed) is checked by tests/it/package.rs.
$bin check --no-probe --config portcullis.yaml >/dev/null

# --strip: the release profile keeps line tables for profiling; the package need not.
cargo deb --no-build --strip --profile "$profile" "$@"
