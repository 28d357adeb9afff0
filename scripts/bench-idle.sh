#!/usr/bin/env bash
# Edge memory per idle connection: starts nats-server, a router and an edge
# (release builds, separate processes, loopback only), opens N idle
# authenticated connections, and prints the edge's RSS delta per connection.
#   scripts/bench-idle.sh [connections]   (default 10000)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${1:-10000}"
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NATS_BIN="$(bash scripts/install-nats.sh | tail -n 1)"
cargo build --release -p switchyard-router -p switchyard-edge -p switchyard-tests --bins >&2
DIR="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
"$NATS_BIN" -a 127.0.0.1 -p 14222 -js -sd "$DIR/js" >"$DIR/nats.log" 2>&1 & pids+=($!)
sleep 0.5
export SWITCHYARD_NATS_URL=nats://127.0.0.1:14222 SWITCHYARD_LOG=warn
SWITCHYARD_ADMIN_LISTEN=127.0.0.1:19091 target/release/switchyard-router >"$DIR/router.log" 2>&1 & pids+=($!)
sleep 0.5
SWITCHYARD_LISTEN=127.0.0.1:18080 SWITCHYARD_ADMIN_LISTEN=127.0.0.1:19090 target/release/switchyard-edge --dev-insecure >"$DIR/edge.log" 2>&1 & EDGE=$!; pids+=($EDGE)
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/18080) 2>/dev/null && break; sleep 0.1; done
target/release/switchyard-idle-bench --edge 127.0.0.1:18080 --edge-pid "$EDGE" --connections "$N" --users "$N"
