#!/usr/bin/env bash
# The Python SDK's checks (clients/python): installs the package with its test
# extras into a venv, runs mypy --strict on the package and its tests, then
# pytest: unit tests, and integration tests against a real nats-server, router
# and edge (publishing, rpc, the authorization hook, the application API).
#   scripts/test-python.sh [extra pytest args]
# Env: SWITCHYARD_NATS_SERVER (default: scripts/install-nats.sh installs it),
# SWITCHYARD_BIN_DIR (router and edge binaries; default $CARGO_TARGET_DIR/debug
# or target/debug, which must be built already), SWITCHYARD_PY_VENV (default
# clients/python/.venv, git-ignored), SWITCHYARD_REQUIRE_API (default 1: the
# application API tests fail, rather than skip, when the binaries do not answer
# sy.api.*; 0 to run against binaries from before the API).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
step() { printf '\n==> %s\n' "$*"; }
die() { echo "test-python.sh: $*" >&2; exit 1; }

if [[ -z "${SWITCHYARD_NATS_SERVER:-}" || ! -x "${SWITCHYARD_NATS_SERVER}" ]]; then
    step "install nats-server (scripts/install-nats.sh)"
    SWITCHYARD_NATS_SERVER="$(bash scripts/install-nats.sh | tail -n 1)"
fi
export SWITCHYARD_NATS_SERVER

if [[ -z "${SWITCHYARD_BIN_DIR:-}" ]]; then
    target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
    [[ "$target_dir" = /* ]] || target_dir="$ROOT/$target_dir"
    SWITCHYARD_BIN_DIR="$target_dir/debug"
fi
export SWITCHYARD_BIN_DIR
export SWITCHYARD_REQUIRE_API="${SWITCHYARD_REQUIRE_API:-1}"
for bin in switchyard-router switchyard-edge; do
    [[ -x "$SWITCHYARD_BIN_DIR/$bin" ]] || die "no $SWITCHYARD_BIN_DIR/$bin: build it (cargo build -p switchyard-router -p switchyard-edge --bins) or set SWITCHYARD_BIN_DIR"
done
echo "binaries: $SWITCHYARD_BIN_DIR"

command -v python3 >/dev/null 2>&1 || die "python3 is needed"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "Python 3.10 or newer is needed (found $(python3 --version))"
VENV="${SWITCHYARD_PY_VENV:-$ROOT/clients/python/.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
    step "python3 -m venv $VENV"
    python3 -m venv "$VENV"
fi

step "pip install ./clients/python[test]"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "$ROOT/clients/python[test]"

cd "$ROOT/clients/python"
step "mypy --strict (clients/python: package and tests; examples/python)"
"$VENV/bin/mypy" --strict src/switchyard tests ../../examples/python

step "pytest (clients/python/tests: unit, then a real nats-server + router + edge)"
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider "$@"
