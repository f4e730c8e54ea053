#!/usr/bin/env bash
# The main job, in the active Python environment: BOOT-distil the shipped shapes teacher into a
# one-step student (quick preset on a CPU), export it to ONNX with parity checks into a Triton
# repository of its own, and make one image with the ONNX pipeline. Arguments go to distill.run.
# Everything it writes lies under students/ and runs/ (both ignored by git): the committed
# model_repository/ holds the shipped student's configs and stays as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
student=students/shapes-boot
repository=runs/quickstart/model_repository
python -m distill.run --out "$student" "$@"
python -m boot_serve.export --student "$student" --repository "$repository"
python - "$student" "$repository" <<'PY'
import sys

from boot_serve import OnnxPipeline

student, repository = sys.argv[1:]
pipe = OnnxPipeline.from_pretrained(repository)
image = pipe(["a large red circle left of a blue square"], seeds=[0])[0]
image.save(f"{student}/quickstart.png")
print(f"one-step image from ONNX Runtime: {student}/quickstart.png")
print(f"serve it:  python -m boot_serve.serve --repository {repository}")
PY
