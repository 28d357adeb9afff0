#!/usr/bin/env bash
# Runs the Python producer example, installing nats-py and msgpack into the
# repo's .venv first if they are missing. Arguments go to producer.py.
#   bash examples/python/run.sh --rate 10 --alert-every-ms 2000
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "python producer: creating $VENV" >&2
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import nats, msgpack" 2>/dev/null; then
    echo "python producer: installing nats-py and msgpack into $VENV" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/examples/python/requirements.txt" >&2
fi
exec "$VENV/bin/python" "$ROOT/examples/python/producer.py" "$@"
