#!/usr/bin/env bash
# Set up (venv + package with test extras + system packages the tests drive) and run the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `-m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The browser test drives Debian's Chromium (never a downloaded browser build).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "warning: could not install chromium; the browser test will be skipped"
    else
        echo "warning: chromium not found; the browser test will be skipped"
    fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check .
exec python -m pytest -q "$@"
