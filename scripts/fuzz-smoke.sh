#!/usr/bin/env bash
# A few seconds of every fuzz target (docs/TESTING.md, "Fuzzing"): catches a
# target that no longer builds or an oracle that trips at once. Not part of
# scripts/test.sh or CI: it needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`), and takes about a minute on two cores.
#   scripts/fuzz-smoke.sh [seconds per target, default 5]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
secs="${1:-5}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke.sh: needs 'cargo +nightly fuzz' (rustup toolchain install nightly; cargo install cargo-fuzz)" >&2
    exit 1
fi

targets=(client_frame producer_event msgpack_to_json json_to_msgpack token ws_frames deflate)
cargo +nightly fuzz build
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    printf '==> %s (%ss)\n' "$t" "$secs"
    # A scratch corpus: the smoke run must not grow anything in the tree.
    mkdir -p "$scratch/$t"
    status=0
    cargo +nightly fuzz run "$t" "$scratch/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len=4096 -print_final_stats=1 >"$scratch/$t.log" 2>&1 || status=$?
    grep -E 'stat::number_of_executed_units|panicked' "$scratch/$t.log" || true
    if [[ "$status" != 0 ]]; then
        tail -n 40 "$scratch/$t.log" >&2
        echo "fuzz-smoke.sh: $t failed; the input is under fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
echo "fuzz smoke: every target ran ${secs}s without a finding"
