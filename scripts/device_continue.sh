#!/usr/bin/env bash
# Second, shorter GPU run: go on distilling a student made by device_train.sh (--init-from), alone on
# the GPU, against the teacher now in pretrained/shapes-teacher. Inputs travel xz-compressed to fit
# the 64 MiB a lent machine accepts: .devdata/text/states.safetensors.xz (precomputed text states) and
# .devdata/student/ (student folder, its UNet as diffusion_pytorch_model.safetensors.xz).
# Results go to $1 (default runs/device): the student as an fp16 tarball, and its log.
set -u
RESULTS=${1:-runs/device}
MINUTES=${MINUTES:-2.5}
DEV=${DEVICE:-cuda}
W=${WORK:-/tmp/boot-work}
EXTRA=()
[ -n "${SMOKE:-}" ] && EXTRA=(--steps 3 --batch-size 4)
mkdir -p "$RESULTS" $W
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD BOOT_TEXT_STATES=$W/text PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mkdir -p $W/text && cp .devdata/text/tokenizer* $W/text/ && cp -r .devdata/student $W/student-start
python3 - "$W" <<'EOF' || exit 1
import lzma, shutil, sys
w = sys.argv[1]
for src, dst in ((".devdata/text/states.safetensors.xz", f"{w}/text/states.safetensors"),
                 (f"{w}/student-start/unet/diffusion_pytorch_model.safetensors.xz",
                  f"{w}/student-start/unet/diffusion_pytorch_model.safetensors")):
    with lzma.open(src) as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)
EOF
rm $W/student-start/unet/*.xz
python3 -m distill.run --preset full --device "$DEV" --init-from $W/student-start --max-minutes "$MINUTES" \
    --eval-n 0 "${EXTRA[@]}" --out $W/student --work $W/boot > $W/boot.log 2>&1
rc=$?
python3 scripts/halve_unet.py "$W/student"
tar -C $W --exclude "*/vae" -cf "$RESULTS/student.tar" student boot/loss.jsonl boot/samples.png boot/loss.png
tr '\r' '\n' < $W/boot.log | grep -v 'it/s\]$\|s/it\]$' > "$RESULTS/boot.log.txt"
tail -5 "$RESULTS/boot.log.txt"
exit $rc
