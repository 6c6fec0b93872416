#!/usr/bin/env bash
# Set up .venv with everything gpt2ipu needs: Python >= 3.10 and pip are all it asks of the machine.
# Safe to rerun: an existing .venv is reused and only missing packages are installed.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch first: a bare `torch` requirement would pull a CUDA build of several GB.
# On a GPU machine, install the CUDA build you want first (or set TORCH_SPEC="torch==2.13.0+cu128 ...").
.venv/bin/python -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "gpt2ipu is installed in .venv (activate it with: . .venv/bin/activate)" >&2
