#!/usr/bin/env bash
# In-process GPU benchmark of boot (no server, no TensorRT, no onnxruntime-gpu: PyTorch + CUDA only),
# for a machine with one NVIDIA GPU; about 5 minutes on an H200. Writes docs/bench/in-process/ (override OUT).
#
#   bash scripts/gpu_bench.sh                      # the GPU run: fp16, CUDA graphs, shipped + SD-1.5 at 512x512
#   SMOKE=1 DEVICE=cpu bash scripts/gpu_bench.sh   # seconds on a CPU: tiny networks, eager, 2 teacher steps
#
# Environment: DEVICE (cuda), DTYPE (fp16; bf16 also measured on CUDA), GRAPHS (manual; compile = torch.compile
# reduce-overhead), OUT, PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-docs/bench/in-process}
bench() { timeout "${STEP_TIMEOUT:-420}" "$PYTHON" -m boot_serve.bench --in-process --device "$DEVICE" "$@"; }

if [ "${SMOKE:-0}" = 1 ]; then
  GRAPHS=${GRAPHS:-none}
  bench --dtype "${DTYPE:-fp32}" --graphs "$GRAPHS" --student pretrained/shapes-boot --teacher pretrained/shapes-teacher \
    --sd15-tiny --batches 1,2 --requests 2 --warmup 1 --teacher-requests 1 --teacher-steps 2 --out "$OUT"
  exit 0
fi

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch: run with SMOKE=1 DEVICE=cpu for a CPU smoke run"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
GRAPHS=${GRAPHS:-manual}
bench --dtype "${DTYPE:-fp16}" --graphs "$GRAPHS" --student pretrained/shapes-boot --teacher pretrained/shapes-teacher \
  --sd15 --batches 1,4,16,64 --requests 50 --warmup 5 --teacher-requests 5 --out "$OUT"
bench --dtype bf16 --graphs "$GRAPHS" --sd15 --batches 1,16 --requests 30 --warmup 3 --teacher-requests 3 \
  --out "$OUT/bf16"
