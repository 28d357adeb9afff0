#!/usr/bin/env bash
# How long a router that takes over user partitions takes to rebuild their
# presence from the edges: nats-server, two routers, one edge holding
# USERS idle users (default 19,500); the router that holds the partitions
# is killed, and the other one's "delivering for user partition" lines
# show how many users each partition learned and in how many ms
# (also the histogram switchyard_router_presence_rebuild_seconds).
#   BENCH_NO_BUILD=1 scripts/bench-takeover.sh
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
USERS="${USERS:-19500}"
if [[ "${BENCH_NO_BUILD:-}" != 1 ]]; then
    cargo build --release -p switchyard-router -p switchyard-edge -p switchyard-tests --bins >&2
fi
NATS_BIN="$(bash scripts/install-nats.sh | tail -n 1)"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"; D=$(mktemp -d)
ulimit -n "$(ulimit -Hn)"
"$NATS_BIN" -a 127.0.0.1 -p 24222 -js -sd $D/js >$D/nats.log 2>&1 & NP=$!
sleep 1
export SWITCHYARD_NATS_URL=nats://127.0.0.1:24222 SWITCHYARD_LOG=info
SWITCHYARD_ADMIN_LISTEN=127.0.0.1:29091 SWITCHYARD_ROUTER_ID=ra $BIN/switchyard-router >$D/ra.log 2>&1 & RA=$!
sleep 2
SWITCHYARD_ADMIN_LISTEN=127.0.0.1:29092 SWITCHYARD_ROUTER_ID=rb $BIN/switchyard-router >$D/rb.log 2>&1 & RB=$!
sleep 3
SWITCHYARD_LISTEN=127.0.0.1:28080 SWITCHYARD_ADMIN_LISTEN=127.0.0.1:29100 SWITCHYARD_MAX_PENDING_PER_ADDR=0 $BIN/switchyard-edge --dev-insecure >$D/edge.log 2>&1 & EP=$!
sleep 2
$BIN/switchyard-loadgen --scenario w3 --edge 127.0.0.1:28080 --users "$USERS" --duration-s 90 --progress false >$D/lg.json 2>$D/lg.log & LG=$!
for i in $(seq 1 240); do
  n=$(curl -s 127.0.0.1:29100/metrics | awk '/^switchyard_edge_connections /{print int($2)}')
  [[ "${n:-0}" -ge "$USERS" ]] && break; sleep 0.5
done
echo "connected: $n; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "partitions delivered by ra:"; grep -c "delivering for user partition" $D/ra.log
echo "partitions delivered by rb:"; grep -c "delivering for user partition" $D/rb.log
sleep 2
# The router that holds them (ra starts first and takes every lease).
kill -9 $RA; echo "killed ra at $(date +%T.%N)"
sleep 12
echo "rb after the kill:"; grep "delivering for user partition" $D/rb.log | tail -n 8 | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-260
grep -i "late\|not every edge" $D/rb.log | head -3
echo "edge late resyncs: $(curl -s 127.0.0.1:29100/metrics | grep -E '^switchyard_edge_late_resyncs_total' )"
kill $LG $EP $RB $NP 2>/dev/null; wait 2>/dev/null; rm -rf $D
