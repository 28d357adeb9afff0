#!/usr/bin/env bash
# Runs a Python example (default producer.py) with the Switchyard SDK
# (clients/python), installing or updating the SDK in the repo's .venv first
# when it is missing or its sources changed. Arguments go to the example.
#   bash examples/python/run.sh --rate 10 --alert-every-ms 2000
#   bash examples/python/run.sh backend.py --nats-url nats://127.0.0.1:4222
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="$ROOT/examples/python"
VENV="$ROOT/.venv"
STAMP="$VENV/.switchyard-sdk-installed"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "python example: creating $VENV" >&2
    python3 -m venv "$VENV"
fi
# Reinstall when the SDK is missing or any of its files is newer than the last install.
if ! "$VENV/bin/python" -c "import switchyard, nats, msgpack" 2>/dev/null \
    || [[ ! -f "$STAMP" ]] \
    || [[ -n "$(find "$ROOT/clients/python/src" "$ROOT/clients/python/pyproject.toml" -newer "$STAMP" -print -quit)" ]]; then
    echo "python example: installing the Switchyard SDK (clients/python) into $VENV" >&2
    (cd "$DIR" && "$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt >&2)
    touch "$STAMP"
fi
script="producer.py"
if [[ $# -gt 0 && "$1" == *.py ]]; then
    script="$1"
    shift
fi
exec "$VENV/bin/python" "$DIR/$script" "$@"
