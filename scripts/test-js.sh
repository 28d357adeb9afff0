#!/usr/bin/env bash
# The JavaScript client's checks (scripts/test.sh calls this after the Rust tests):
# builds the library with no warnings, prints the bundle size, and runs its
# tests against a real nats-server, router and edge, including the demo page
# in headless Chromium and the producer examples.
#   scripts/test-js.sh
# Installs what is missing: nats-server (scripts/install-nats.sh), Debian's
# chromium (apt-get, as root), the npm packages (npm ci into clients/js/node_modules).
# Env: SWITCHYARD_NATS_SERVER (skip the nats install), SWITCHYARD_CHROMIUM
# (browser path, default /usr/bin/chromium), SWITCHYARD_SHOT_DIR (keep the
# demo screenshots there), SWITCHYARD_SKIP_PY_EXAMPLE=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
step() { printf '\n==> %s\n' "$*"; }
die() { echo "test-js.sh: $*" >&2; exit 1; }

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run: $*"
    fi
}

apt_install() {
    step "apt-get install $*"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [[ -z "${SWITCHYARD_NATS_SERVER:-}" || ! -x "${SWITCHYARD_NATS_SERVER}" ]]; then
    step "install nats-server (scripts/install-nats.sh)"
    SWITCHYARD_NATS_SERVER="$(bash scripts/install-nats.sh | tail -n 1)"
    export SWITCHYARD_NATS_SERVER
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[[ "$node_major" -ge 20 ]] || die "Node.js 20 or newer is needed (found $(node --version))"

export SWITCHYARD_CHROMIUM="${SWITCHYARD_CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$SWITCHYARD_CHROMIUM" ]]; then
    apt_install chromium
    [[ -x "$SWITCHYARD_CHROMIUM" ]] || die "no browser at $SWITCHYARD_CHROMIUM after installing chromium"
fi
echo "browser: $SWITCHYARD_CHROMIUM ($(dpkg-query -W -f='${Version}' chromium 2>/dev/null || echo 'not a Debian package'))"

if [[ "${SWITCHYARD_BINS_BUILT:-}" == 1 ]]; then
    # scripts/test.sh just ran `cargo test --workspace`, which built both
    # binaries; building them alone would recompile dependencies with other
    # features for nothing.
    step "using the binaries cargo test --workspace built"
else
    step "cargo build -p switchyard-router -p switchyard-edge --bins"
    cargo build -p switchyard-router -p switchyard-edge --bins
fi
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$target_dir" = /* ]] || target_dir="$ROOT/$target_dir"
export SWITCHYARD_BIN_DIR="$target_dir/debug"

cd "$ROOT/clients/js"
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
    step "npm ci (clients/js)"
    npm ci --no-audit --no-fund --loglevel=error
fi

step "npm run build (clients/js: tsc + esbuild, warnings fail)"
npm run --silent build
npm run --silent size

step "JS tests (clients/js/test: real nats-server + router + edge, headless Chromium)"
node --test --test-concurrency=1 test/*.test.mjs
