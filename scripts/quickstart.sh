#!/usr/bin/env bash
# Set up (.venv + package) and run the main job. Arguments go to the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m distill.evaluate --teacher pretrained/shapes-teacher --steps 4,50 --n 64 "$@"
