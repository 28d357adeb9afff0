#!/usr/bin/env bash
# The project's single test command (CI runs it through .ci/run).
#   scripts/test.sh [extra args for `cargo test`]
# Installs nats-server (integration tests run against a real one), then runs
# the k8s manifest checks (scripts/validate-k8s.sh), rustfmt check, clippy with
# warnings denied, the whole workspace's tests, then
# the JS client's build and tests (scripts/test-js.sh; SWITCHYARD_SKIP_JS=1 skips them),
# then the Python SDK's type check and tests (scripts/test-python.sh; SWITCHYARD_SKIP_PY=1 skips them).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

# rustup's default location, in case this shell's PATH lacks it.
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

step "install nats-server (scripts/install-nats.sh)"
nats_bin="$(bash scripts/install-nats.sh | tail -n 1)"
[[ -x "$nats_bin" ]] || { echo "test.sh: install-nats.sh did not print a usable binary path (got '$nats_bin')" >&2; exit 1; }
export SWITCHYARD_NATS_SERVER="$nats_bin"
echo "SWITCHYARD_NATS_SERVER=$SWITCHYARD_NATS_SERVER"

step "k8s manifests: schemas, fleet rules, alerts (scripts/validate-k8s.sh)"; bash scripts/validate-k8s.sh

for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        echo "test.sh: 'cargo $tool' is not available; install it (rustup component add ${tool/fmt/rustfmt})" >&2
        exit 1
    fi
done

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace${*:+ $*}"
cargo test --workspace "$@"

# A plain `cargo test --workspace` (no extra arguments) has built both binaries.
bins_built=$([[ $# -eq 0 ]] && echo 1 || echo 0)
[[ "${SWITCHYARD_SKIP_JS:-}" == 1 ]] || SWITCHYARD_BINS_BUILT=$bins_built bash scripts/test-js.sh  # JS client, demo page in Chromium, examples
[[ "${SWITCHYARD_SKIP_PY:-}" == 1 ]] || bash scripts/test-python.sh  # Python SDK: mypy --strict, unit tests, tests against a real fleet
