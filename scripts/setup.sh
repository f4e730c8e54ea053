#!/usr/bin/env bash
# Create .venv (once) and install boot with the extras given as arguments (e.g. "test").
# Where no NVIDIA GPU is present, the CPU build torch==2.13.0 is installed first so that the
# package's open `torch` requirement is already met and no CUDA build is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
python -m pip install --quiet -e "$spec"
