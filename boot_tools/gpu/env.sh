# Sourced by the scripts/device_*.sh scripts on a GPU machine without internet after they set W, their
# work folder: installs what the GPU image lacks and unpacks the precomputed text states.
# - Packages: wheels in .whl/, or (smaller, for when the 64 MiB a call may carry is tight) a tar.xz of an
#   installed site folder: `pip install --no-deps --target D WHEELS && tar -C D -cJf .whl/site.tar.xz .`.
# - Text states: .devdata/textpk (scripts/pack_states.py pack of `python -m distill.text precompute`).
# Exports PYTHONPATH, BOOT_TEXT_STATES and PYTHONUNBUFFERED; exits the calling script on failure.
mkdir -p /tmp/site "$W"
for f in .whl/*.tar.xz; do
    if [ -f "$f" ]; then tar -C /tmp/site -xJf "$f" || exit 1; fi
done
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD BOOT_TEXT_STATES=$W/text PYTHONUNBUFFERED=1
python3 scripts/pack_states.py unpack .devdata/textpk "$W/text" || exit 1
