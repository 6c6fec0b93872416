#!/usr/bin/env bash
# Check every CUDA path of gpt2ipu in one command (tools/gpu_check.py says what and how):
#   tools/gpu-check.sh [--dry-run] [--out FILE]
# Uses the project's .venv (bootstrap.sh) when there is one, else the python on PATH.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${GPT2IPU_PYTHON:-python3}"
[[ -x "$repo/.venv/bin/python" ]] && python="${GPT2IPU_PYTHON:-$repo/.venv/bin/python}"
exec "$python" "$repo/tools/gpu_check.py" "$@"
