#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything it needs.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON_BIN="${PYTHON_BIN:-python3}"
# torch goes in first, as the CPU build pinned here; otherwise a dependency pulls a
# multi-GB CUDA build. Override on a GPU machine, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON_BIN" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$TORCH_SPEC"
"${PIP[@]}" install -e ".[test,lab]"
echo "environment ready: $VENV"
