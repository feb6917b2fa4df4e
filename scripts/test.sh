#!/usr/bin/env bash
# All set-up on a fresh machine, then the test suite (2 CPU cores: about 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
