#!/usr/bin/env bash
# Runs all of hearth's tests: the workspace's tests once per supported
# nats-server version, Debian's (the oldest supported, 2.9 on Debian 12) and
# the latest release (from PyPI, in .tools/venv), then the doc tests.
# Runs scripts/setup.sh first if a nats-server is missing.
#
# Usage: scripts/test.sh [ARGS...]
#   ARGS go to each per-server run, `cargo nextest run --workspace` (or
#   `cargo test --workspace --all-targets` without cargo-nextest), e.g.
#   `-p hearth-gateway` (which replaces --workspace).
#   The doc tests always run for the whole workspace.
# Exits non-zero if any run fails; all runs are made regardless.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

case "${1:-}" in
-h | --help)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac

say() { echo "test.sh: $*"; }

debian_nats() {
    local path
    path=$(dpkg -L nats-server 2>/dev/null | grep '/bin/nats-server$' || true)
    path=${path%%$'\n'*}
    echo "${path:-/usr/sbin/nats-server}"
}
latest_nats="$repo/.tools/venv/bin/nats-server"

if [ ! -x "$(debian_nats)" ] || [ ! -x "$latest_nats" ]; then
    say "a nats-server is missing; running scripts/setup.sh"
    scripts/setup.sh
fi

servers=()
[ -x "$(debian_nats)" ] && servers+=("$(debian_nats)")
if [ -x "$latest_nats" ]; then
    servers+=("$latest_nats")
elif [ "${CI:-}" = true ]; then
    say "error: no latest nats-server at $latest_nats" >&2
    exit 1
else
    say "warning: no latest nats-server at $latest_nats; testing with Debian's only" >&2
fi
[ "${#servers[@]}" -gt 0 ] || {
    say "error: no nats-server to test with" >&2
    exit 1
}

# The whole workspace, unless ARGS pick packages (cargo ignores -p with
# --workspace).
scope=(--workspace)
for arg in "$@"; do
    case "$arg" in
    --) break ;;
    -p | -p* | --package | --package=*) scope=() ;;
    esac
done
if cargo nextest --version >/dev/null 2>&1; then
    # Not --all-targets: nextest would list the `harness = false` benches
    # with `--list`, which they do not understand.
    runner=(cargo nextest run ${scope[@]+"${scope[@]}"})
else
    say "cargo-nextest not found; using cargo test"
    runner=(cargo test ${scope[@]+"${scope[@]}"} --all-targets)
fi
# In CI, report every failure rather than the first.
[ "${CI:-}" = true ] && runner+=(--no-fail-fast)

version_of() { "$1" --version 2>/dev/null | sed 's/^nats-server: //' || echo unknown; }

failed=()
for server in "${servers[@]}"; do
    version=$(version_of "$server")
    say "=== tests with nats-server $version ($server)"
    start=$SECONDS
    if HEARTH_NATS_SERVER="$server" "${runner[@]}" "$@"; then
        say "=== nats-server $version: passed in $((SECONDS - start))s"
    else
        say "=== nats-server $version: FAILED"
        failed+=("tests with nats-server $version")
    fi
done

# nextest does not run doc tests. They use the last (newest) server.
say "=== doc tests"
if HEARTH_NATS_SERVER="${servers[-1]}" cargo test --workspace --doc; then
    say "=== doc tests: passed"
else
    say "=== doc tests: FAILED"
    failed+=("doc tests")
fi

if [ "${#failed[@]}" -gt 0 ]; then
    say "FAILED: $(printf '%s, ' "${failed[@]}" | sed 's/, $//')" >&2
    exit 1
fi
say "all passed (nats-server $(for s in "${servers[@]}"; do printf '%s ' "$(version_of "$s")"; done | sed 's/ $//'))"
