#!/usr/bin/env bash
# Runs one load-generator scenario against a fleet of release processes on
# loopback: nats-server (JetStream, file storage), one router, EDGES edges
# (default 1), then switchyard-loadgen with every server's pid watched (CPU
# seconds, RSS). Prints progress lines on stderr and the JSON summary on
# stdout (also kept in $BENCH_OUT when set).
#
#   scripts/bench-load.sh w1 [loadgen flags...]      # market fan-out (non-durable)
#   scripts/bench-load.sh w2 [loadgen flags...]      # alerts (durable)
#   scripts/bench-load.sh w3 --users 10000           # idle connections
#   scripts/bench-load.sh w4 --users 10000           # reconnect storm
#
#   LOADGENS=6 EDGES=6 USERS=100000 scripts/bench-load.sh w3
#       idle connections beyond one process's file-descriptor limit: LOADGENS
#       load generators side by side (USERS split between them); the script
#       itself waits for the edges' connection gauges and reads their RSS.
#   LOADGENS=3 EDGES=3 USERS=50000 scripts/bench-load.sh w4 --rate 100
#       a reconnect storm over several load generators: each connects its
#       share, all drop at the same wall-clock moment (--storm-at-ms, STORM_AT_S
#       seconds after start, default 20 + USERS/2500), and the summaries are
#       merged (sums of clients and events, the slowest time until all back).
# nats-server's monitoring port is 18222; w4 reads JetStream API requests
# and messages in from it, and the edges' log reads from their admin ports.
#
# Environment: EDGES (edges to start, default 1), BENCH_NO_BUILD=1 (skip the
# cargo build), BENCH_OUT (file for the summary), BENCH_KEEP_LOGS (a directory
# to copy the servers' logs into), EDGE_ENV (extra
# "NAME=value ..." for the edges), PERF_EDGE / PERF_ROUTER (a command prefix
# for that process, e.g. "perf record -g -o /tmp/edge.data"), ROUTER_ENV (extra
# "NAME=value ..." for the router), BESIDE (a command run beside the scenario
# once the fleet is up, with SWITCHYARD_NATS_URL and SY_WS_URL set, e.g.
# "target/release/switchyard-snapshot-bench --delay-s 5"; its output is printed
# on stderr at the end).
# Flow control is opened up on the edges (rate limit and burst 10^6): the
# benchmarks measure the delivery path, not the per-connection limits.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SCENARIO="${1:?usage: scripts/bench-load.sh w1|w2|w3|w4 [loadgen flags...]}"
shift
EDGES="${EDGES:-1}"
# One fd per connection on each side; this sandbox caps the hard limit (see BENCHMARKS.md).
ulimit -n "$(ulimit -Hn)"
NATS_BIN="$(bash scripts/install-nats.sh | tail -n 1)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if [[ "${BENCH_NO_BUILD:-}" != 1 ]]; then
    cargo build --release -p switchyard-router -p switchyard-edge -p switchyard-tests --bins >&2
fi
BIN="$TARGET/release"
DIR="$(mktemp -d)"
pids=()
cleanup() {
    # Newest first (edges, router, then NATS), each given 5 s before SIGKILL.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        p="${pids[$i]}"
        kill "$p" 2>/dev/null || continue
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ -n "${BENCH_KEEP_LOGS:-}" ]]; then mkdir -p "$BENCH_KEEP_LOGS" && cp "$DIR"/*.log "$BENCH_KEEP_LOGS"/ 2>/dev/null || true; fi
    rm -rf "$DIR"
}
trap cleanup EXIT
wait_port() {
    for _ in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "bench-load: nothing listens on port $1 (logs in $DIR)" >&2
    exit 2
}
NATS_PORT="${NATS_PORT:-14222}"
NATS_MONITOR="${NATS_MONITOR:-18222}"
"$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR" -js -sd "$DIR/js" >"$DIR/nats.log" 2>&1 &
NATS_PID=$!
pids+=("$NATS_PID")
wait_port "$NATS_PORT"
export SWITCHYARD_NATS_URL="nats://127.0.0.1:$NATS_PORT" SWITCHYARD_LOG="${SWITCHYARD_LOG:-warn}"
# shellcheck disable=SC2086
env SWITCHYARD_ADMIN_LISTEN=127.0.0.1:19091 ${ROUTER_ENV:-} ${PERF_ROUTER:-} "$BIN/switchyard-router" >"$DIR/router.log" 2>&1 &
ROUTER_PID=$!
pids+=("$ROUTER_PID")
wait_port 19091
watch="nats=$NATS_PID,router=$ROUTER_PID"
edges=()
edge_pids=()
admins=()
for i in $(seq 0 $((EDGES - 1))); do
    port=$((18080 + i))
    # shellcheck disable=SC2086
    env SWITCHYARD_LISTEN="127.0.0.1:$port" SWITCHYARD_ADMIN_LISTEN="127.0.0.1:$((19100 + i))" \
        SWITCHYARD_RATE_PER_S=1000000 SWITCHYARD_BURST=1000000 ${EDGE_ENV:-} \
        ${PERF_EDGE:-} "$BIN/switchyard-edge" --dev-insecure >"$DIR/edge$i.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    edge_pids+=("$pid")
    watch="$watch,edge=$pid"
    edges+=("127.0.0.1:$port")
    admins+=("127.0.0.1:$((19100 + i))")
done
monitor_args=()
if [[ "$SCENARIO" == w4 ]]; then
    monitor_args=(--nats-monitor "127.0.0.1:$NATS_MONITOR" --edge-admin "$(IFS=,; echo "${admins[*]}")")
fi
for e in "${edges[@]}"; do wait_port "${e##*:}"; done
# perf (when used) is the parent: watch the edge itself.
if [[ -n "${PERF_EDGE:-}" ]]; then
    sleep 0.5
    watch="nats=$NATS_PID,router=$ROUTER_PID"
    for p in "${edge_pids[@]}"; do watch="$watch,edge=$(pgrep -P "$p" -x switchyard-edge || echo "$p")"; done
fi
if [[ "${LOADGENS:-1}" -gt 1 && "$SCENARIO" == w4 ]]; then
    USERS="${USERS:?set USERS (total clients) with LOADGENS}"
    per=$((USERS / LOADGENS))
    at_ms=$(( $(date +%s%3N) + 1000 * ${STORM_AT_S:-$((20 + USERS / 2500))} ))
    echo "bench-load: w4 over $LOADGENS load generators and $EDGES edges, $per clients each, storm at $at_ms; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    lg=()
    for i in $(seq 0 $((LOADGENS - 1))); do
        extra=()
        [[ $i -eq 0 ]] && extra=(--watch "$watch")
        "$BIN/switchyard-loadgen" --scenario w4 --edge "$(IFS=,; echo "${edges[*]}")" --users "$per" \
            --user-offset $((i * per)) --nats-url "$SWITCHYARD_NATS_URL" --storm-at-ms "$at_ms" \
            --progress "$([[ $i -eq 0 ]] && echo true || echo false)" "${monitor_args[@]}" "${extra[@]}" "$@" \
            >"$DIR/lg$i.json" 2>"$DIR/lg$i.log" &
        lg+=($!)
    done
    status=0
    for p in "${lg[@]}"; do wait "$p" || status=$?; done
    python3 scripts/merge_storm.py "$DIR"/lg*.json | tee "${BENCH_OUT:-/dev/null}"
    exit "$status"
fi
if [[ "${LOADGENS:-1}" -gt 1 ]]; then
    [[ "$SCENARIO" == w3 ]] || { echo "bench-load: LOADGENS is for w3 and w4" >&2; exit 2; }
    USERS="${USERS:?set USERS (total connections) with LOADGENS}"
    rss_sum() { local t=0; for p in "${edge_pids[@]}"; do t=$((t + $(awk '/VmRSS/{print $2}' "/proc/$p/status"))); done; echo "$t"; }
    conns() { local t=0; for i in $(seq 0 $((EDGES - 1))); do
        t=$((t + $(exec 3<>"/dev/tcp/127.0.0.1/$((19100 + i))"; printf 'GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3; awk '/^switchyard_edge_connections /{print int($2)}' <&3 | head -n1; exec 3<&-) + 0)); done; echo "$t"; }
    before=$(rss_sum)
    per=$((USERS / LOADGENS))
    lg=()
    start=$(date +%s.%N)
    for i in $(seq 0 $((LOADGENS - 1))); do
        "$BIN/switchyard-loadgen" --scenario w3 --edge "$(IFS=,; echo "${edges[*]}")" --users "$per" \
            --user-offset $((i * per)) --duration-s 600 --progress false "$@" >"$DIR/lg$i.json" 2>"$DIR/lg$i.log" &
        lg+=($!)
    done
    for _ in $(seq 1 1200); do
        n=$(conns)
        [[ "$n" -ge $((per * LOADGENS)) ]] && break
        sleep 0.5
    done
    connect_s=$(awk "BEGIN{print $(date +%s.%N) - $start}")
    sleep 3
    after=$(rss_sum)
    n=$(conns)
    for p in "${lg[@]}"; do kill "$p" 2>/dev/null || true; done
    echo "{\"scenario\":\"w3\",\"loadgens\":$LOADGENS,\"edges\":$EDGES,\"connections\":$n,\"connect_seconds\":$connect_s,\"edge_rss_kib_before\":$before,\"edge_rss_kib_after\":$after,\"edge_bytes_per_connection\":$(( (after - before) * 1024 / (n > 0 ? n : 1) )),\"load_average\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
    exit 0
fi
echo "bench-load: $SCENARIO on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), edges ${edges[*]}" >&2
beside=""
if [[ -n "${BESIDE:-}" ]]; then
    # shellcheck disable=SC2086
    SY_WS_URL="ws://${edges[0]}/ws" $BESIDE >"$DIR/beside.log" 2>&1 &
    beside=$!
fi
status=0
"$BIN/switchyard-loadgen" --scenario "$SCENARIO" --edge "$(IFS=,; echo "${edges[*]}")" \
    --nats-url "$SWITCHYARD_NATS_URL" --watch "$watch" "${monitor_args[@]}" "$@" >"$DIR/summary.json" || status=$?
cat "$DIR/summary.json"
if [[ -n "$beside" ]]; then
    wait "$beside" || echo "bench-load: the BESIDE command failed" >&2
    echo "bench-load: beside: $(tail -n 3 "$DIR/beside.log")" >&2
fi
if [[ -n "${BENCH_OUT:-}" ]]; then cp "$DIR/summary.json" "$BENCH_OUT"; fi
if [[ $status -ne 0 ]]; then
    echo "bench-load: loadgen exit $status; last server log lines:" >&2
    tail -n 5 "$DIR"/*.log >&2 || true
fi
exit "$status"
