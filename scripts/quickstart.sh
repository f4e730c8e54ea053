#!/usr/bin/env bash
# The quickstart's first command: set up (.venv + package), then run the main job
# (scripts/main_job.sh). Arguments go to distill.run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec bash scripts/main_job.sh "$@"
