#!/usr/bin/env bash
# Starts a whole Switchyard fleet locally: nats-server (JetStream), a router,
# an edge in dev mode serving the demo page, and a demo producer. Ctrl-C stops everything.
#   scripts/dev.sh            # run in the foreground
# Ports (override with env): NATS 4222, edge WebSocket 8080, edge admin 9090, router admin 9091.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NATS_PORT="${NATS_PORT:-4222}"
EDGE_PORT="${EDGE_PORT:-8080}"
EDGE_ADMIN_PORT="${EDGE_ADMIN_PORT:-9090}"
ROUTER_ADMIN_PORT="${ROUTER_ADMIN_PORT:-9091}"
RUN_DIR="$ROOT/.run"

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

echo "==> installing nats-server (if missing)"
NATS_BIN="$(bash scripts/install-nats.sh | tail -n 1)"

echo "==> building (first build takes ~2 minutes)"
cargo build -p switchyard-router -p switchyard-edge -p switchyard-tests --bins

# The demo page: the JS client's bundle and page, built into clients/js/dist/demo.
DEMO_DIR="$ROOT/clients/js/dist/demo"
demo_args=()
if command -v npm >/dev/null 2>&1; then
    echo "==> building the JS client and demo page (clients/js)"
    (
        cd "$ROOT/clients/js"
        if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
            npm ci --no-audit --no-fund --loglevel=error
        fi
        npm run --silent build
    )
    demo_args=(--demo-dir "$DEMO_DIR")
else
    echo "dev.sh: npm not found; starting without the demo page (install Node.js 20+ for it)" >&2
fi

for port in "$NATS_PORT" "$EDGE_PORT" "$EDGE_ADMIN_PORT" "$ROUTER_ADMIN_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "dev.sh: port $port is already in use (another fleet running?); set NATS_PORT/EDGE_PORT/EDGE_ADMIN_PORT/ROUTER_ADMIN_PORT" >&2
        exit 1
    fi
done

mkdir -p "$RUN_DIR/nats"
pids=()
cleanup() {
    trap - EXIT INT TERM
    echo
    echo "==> stopping the fleet"
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_for() { # url-or-port, what
    for _ in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "dev.sh: $2 did not start; see $RUN_DIR/*.log" >&2
    exit 1
}

BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
export SWITCHYARD_NATS_URL="nats://127.0.0.1:$NATS_PORT"

"$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$RUN_DIR/nats" >"$RUN_DIR/nats.log" 2>&1 &
pids+=($!)
wait_for "$NATS_PORT" nats-server

SWITCHYARD_ADMIN_LISTEN="127.0.0.1:$ROUTER_ADMIN_PORT" "$BIN/switchyard-router" >"$RUN_DIR/router.log" 2>&1 &
pids+=($!)
wait_for "$ROUTER_ADMIN_PORT" router

SWITCHYARD_LISTEN="127.0.0.1:$EDGE_PORT" SWITCHYARD_ADMIN_LISTEN="127.0.0.1:$EDGE_ADMIN_PORT" \
    "$BIN/switchyard-edge" --dev-insecure "${demo_args[@]}" >"$RUN_DIR/edge.log" 2>&1 &
pids+=($!)
wait_for "$EDGE_PORT" edge

"$BIN/switchyard-demo-producer" --rate 10 >"$RUN_DIR/producer.log" 2>&1 &
pids+=($!)

demo_line="  demo page     (not built: needs Node.js 20+ and npm)"
if [[ ${#demo_args[@]} -gt 0 ]]; then
    demo_line="  demo page     http://127.0.0.1:$EDGE_PORT/demo/   (open it in a browser; it fetches a dev token from /demo/token)"
fi

cat <<MSG

Switchyard is running:
$demo_line
  nats-server   nats://127.0.0.1:$NATS_PORT        (log: .run/nats.log)
  router        admin http://127.0.0.1:$ROUTER_ADMIN_PORT/metrics   (log: .run/router.log)
  edge          ws://127.0.0.1:$EDGE_PORT/ws, admin http://127.0.0.1:$EDGE_ADMIN_PORT/metrics   (dev mode; log: .run/edge.log)
  producer      demo ticks (AAPL TSLA NVDA MSFT AMZN META) and pattern alerts   (log: .run/producer.log)

Watch events flow (in another terminal):
  target/debug/switchyard-tail --url ws://127.0.0.1:$EDGE_PORT/ws --symbols AAPL,TSLA --min-confidence 0.7
Mint a dev token for your own client (or GET http://127.0.0.1:$EDGE_PORT/demo/token?sub=alice):
  target/debug/switchyard-token --sub alice
More producers: bash examples/node/run.sh   or   bash examples/python/run.sh

Press Ctrl-C to stop the fleet.
MSG

wait -n "${pids[@]}" || true
echo "dev.sh: a fleet process exited; see $RUN_DIR/*.log" >&2
exit 1
