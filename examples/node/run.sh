#!/usr/bin/env bash
# Runs the Node.js producer example, installing its packages (npm ci) first
# if they are missing. Arguments go to producer.mjs.
#   bash examples/node/run.sh --rate 10 --alert-every-ms 2000
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -d "$DIR/node_modules/nats" || ! -d "$DIR/node_modules/@msgpack/msgpack" ]]; then
    echo "node producer: installing packages (npm ci)" >&2
    (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
exec node "$DIR/producer.mjs" "$@"
