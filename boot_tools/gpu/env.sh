# Sourced (not run) by the other boot_tools/gpu/*.sh scripts, from the repository root, after they set W
# (their work folder): makes a GPU machine with no internet ready to run the project. Inputs:
# - Packages the GPU image lacks (diffusers and the like): wheels in .whl/, or (smaller, where the files
#   carried to the machine are limited) a tar.xz of an installed site folder:
#   `pip install --no-deps --target D WHEELS && tar -C D -cJf .whl/site.tar.xz .`.
# - Text states: .devdata/textpk, made by `python -m boot_tools.pack_states pack STATES .devdata/textpk` from
#   `python -m shapes_world.text_states precompute STATES`; unpacked into $W/text.
# Outputs: packages in /tmp/site, states in $W/text; exports PYTHONPATH, BOOT_TEXT_STATES and
# PYTHONUNBUFFERED; exits the calling script on failure.
mkdir -p /tmp/site "$W"
for f in .whl/*.tar.xz; do
    if [ -f "$f" ]; then tar -C /tmp/site -xJf "$f" || exit 1; fi
done
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD BOOT_TEXT_STATES=$W/text PYTHONUNBUFFERED=1
python3 -m boot_tools.pack_states unpack .devdata/textpk "$W/text" || exit 1
