#!/usr/bin/env bash
# The GPU check of issue 16, for a machine with an accelerator (≤ 10 minutes on one GPU):
# our merges under mergekit's --cuda (and multi-GPU) executors against the CPU executor,
# Antidote/SSAH calibration and SOMF mask learning on the device, as ratios and differences.
#   bash scripts/gpu_check.sh                         # DEVICE=cuda SIZE=small
#   DEVICE=cpu SIZE=tiny bash scripts/gpu_check.sh    # dry run on a CPU machine (checks the script only)
# Uses the Python in $PYTHON (default: .venv/bin/python if it exists, else python3), which must
# have this package, mergekit and a torch build for the device installed. Writes
# $OUT/gpu_check-<device type>.json (default OUT=benchmarks/results) and prints every ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
SIZE="${SIZE:-small}"
OUT="${OUT:-benchmarks/results}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
exec "$PYTHON" benchmarks/gpu_check.py --device "$DEVICE" --size "$SIZE" --json "$OUT/gpu_check-${DEVICE%%:*}.json"
