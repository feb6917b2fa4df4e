#!/usr/bin/env bash
# All set-up on a fresh machine, then the main job: build the safety lab, run every merge in
# merges/ through mergekit, evaluate, and write the comparison table and plot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
exec "$VENV/bin/mergekit-safety" demo "$@"
