#!/usr/bin/env bash
# BOOT at SD-1.5 scale on one GPU (an H100 or H200 with PyTorch + CUDA, no internet), in under 8 minutes:
# the full SD-1.5 architecture at 512² (random weights, boot_tools.fixtures), bf16 + gradient checkpointing,
# batch 16/32/64: s/step, peak GPU memory, projected GPU-hours for 10k steps beside published costs, and
# the bf16-vs-fp32 gradient cosine (python -m boot_tools.gpu_scale).
#
#   bash boot_tools/gpu/scale.sh [OUT]                 # from the repository root; OUT: runs/gpu_scale
#   SMOKE=1 DEVICE=cpu bash boot_tools/gpu/scale.sh     # the tiny SD-1.5 fixture, batch 2, one step
#
# The GPU image lacks diffusers and open_clip_torch (whose CLIP vocabulary the fixture's tokenizer reads):
# carry them as wheels in .whl/, made on a machine with internet with
#   pip download --no-deps -d .whl diffusers==0.42.1 open_clip_torch==3.3.0
# Output: OUT/scale.json (every number; also printed).
set -u
OUT=${1:-runs/gpu_scale}
DEV=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    mkdir -p /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L 2>/dev/null
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1
ARGS=(--batches 16,32,64 --steps 3 --cosine-batch 8)
if [ -n "${SMOKE:-}" ]; then
    ARGS=(--size tiny --batches 2 --steps 1 --cosine-batch 2)
fi
timeout 460 python3 -m boot_tools.gpu_scale --out "$OUT" --device "$DEV" "${ARGS[@]}"
