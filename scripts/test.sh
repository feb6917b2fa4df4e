#!/usr/bin/env bash
# All set-up on a fresh machine, then the test suite (2 idle CPU cores: about 5 minutes; one line per test file).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
# one line per test file with its progress (not -q): a long file shows which one is running
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
