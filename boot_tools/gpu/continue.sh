#!/usr/bin/env bash
# A short GPU run: go on distilling a student (default pretrained/shapes-boot, `distill.run --init-from`),
# alone on the GPU, against the teacher in pretrained/shapes-teacher. Inputs: .devdata/textpk
# (scripts/pack_states.py pack of `python -m distill.text precompute`), diffusers as a wheel in .whl/.
# Results go to $1 (default runs/device): the student as an fp16 tarball, and its log.
set -u
RESULTS=${1:-runs/device}
MINUTES=${MINUTES:-2.5}
START=${START:-pretrained/shapes-boot}
DEV=${DEVICE:-cuda}
W=${WORK:-/tmp/boot-work}
EXTRA=(--batch-size 64)
[ -n "${SMOKE:-}" ] && EXTRA=(--steps 3 --batch-size 4)
mkdir -p "$RESULTS" $W
export OMP_NUM_THREADS=8
# shellcheck source=scripts/device_env.sh
. scripts/device_env.sh
python3 -m distill.run --preset full --device "$DEV" --init-from "$START" --max-minutes "$MINUTES" \
    --eval-n 0 "${EXTRA[@]}" --out $W/student --work $W/boot > $W/boot.log 2>&1
rc=$?
python3 scripts/halve_unet.py "$W/student"
tar -C $W --exclude "*/vae" -cf "$RESULTS/student.tar" student boot/loss.jsonl boot/samples.png boot/loss.png
tr '\r' '\n' < $W/boot.log | grep -v 'it/s\]$\|s/it\]$' > "$RESULTS/boot.log.txt"
tail -5 "$RESULTS/boot.log.txt"
exit $rc
