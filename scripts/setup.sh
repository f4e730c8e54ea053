#!/usr/bin/env bash
# Create .venv (once) and install boot with the extras given as arguments (e.g. "test").
# Where no NVIDIA GPU is present, CPU builds of torch and onnxruntime are installed instead of the
# CUDA ones (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# pip_install ARGS...: some PyPI downloads here run to hundreds of MB (the wheel that carries
# tritonserver; onnxruntime-gpu on GPU machines) and a connection is now and then cut mid-file; pip
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
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# The CLIP BPE vocabulary that boot_tools.fixtures builds real CLIP tokenizers from ships inside
# open_clip_torch; only that data file is read, so the package goes in without its dependencies
# (torchvision, timm), which would otherwise pull a second torch build.
clip_vocab=(--no-deps "open_clip_torch==3.3.0")
# The shipped folders' tokenizer/ (what plain diffusers loads them with): the installed MiniLM
# package's vocabulary with the models' 16-token length, written here (git-ignored), never committed.
write_tokenizers() {
    python -m distill.diffusers_folder tokenizer --files-only pretrained/shapes-teacher pretrained/shapes-boot
}
if command -v nvidia-smi >/dev/null 2>&1; then
    pip_install -e "$spec"
    pip_install "${clip_vocab[@]}"
    write_tokenizers
    exit 0
fi
# No NVIDIA GPU: the CPU builds. torch==2.13.0 (from this machine's disk) first, so that the open
# `torch` requirement is met without a CUDA build; and onnxruntime (17 MB) in place of the package's
# onnxruntime-gpu (256 MB, and only its CPU provider would run here). Both install the same
# `onnxruntime` module, so the package's requirements are installed from a list with that one
# swapped, then the package itself without dependencies; its metadata keeps onnxruntime-gpu for
# GPU machines.
if ! python -c "import torch" 2>/dev/null; then
    pip_install "torch==2.13.0"
fi
if python -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then  # a venv made before this swap
    python -m pip uninstall -q -y onnxruntime-gpu onnxruntime
fi
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
python - "$extras" >"$reqs" <<'PY'
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
name, seen = project["name"], set()


def extra_requirements(extras):
    """The requirements of these extras, following ones that name others (e.g. boot[test])."""
    out = []
    for extra in extras:
        if extra not in seen:
            seen.add(extra)
            for req in project["optional-dependencies"][extra]:
                inner = req[len(name) + 1:req.index("]")].split(",") if req.startswith(f"{name}[") else None
                out += extra_requirements(inner) if inner else [req]
    return out


extras = [e.strip() for e in sys.argv[1].split(",") if e.strip()]
for req in project["dependencies"] + extra_requirements(extras):
    print("onnxruntime" + req[len("onnxruntime-gpu"):] if req.startswith("onnxruntime-gpu") else req)
PY
pip_install -r "$reqs"
pip_install --no-deps -e .
pip_install "${clip_vocab[@]}"
write_tokenizers
