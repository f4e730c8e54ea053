#!/usr/bin/env bash
# Set up (.venv + package) and run the main job: BOOT-distil the shipped shapes teacher into a
# one-step student (quick preset on a CPU), export it to ONNX with parity checks into
# model_repository/, and make one image with the ONNX pipeline. Arguments go to distill.run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m distill.run --out students/shapes-boot "$@"
python -m boot_serve.export --student students/shapes-boot --repository model_repository
python - <<'PY'
from boot_serve import OnnxPipeline

pipe = OnnxPipeline.from_pretrained("model_repository")
image = pipe(["a large red circle left of a blue square"], seeds=[0])[0]
image.save("students/shapes-boot/quickstart.png")
print("one-step image from ONNX Runtime: students/shapes-boot/quickstart.png")
print("serve it:  python -m boot_serve.serve --repository model_repository")
PY
