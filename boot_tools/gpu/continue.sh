#!/usr/bin/env bash
# Go on distilling a student on one GPU for a few minutes (`distill.run --preset full --init-from`,
# batch 64), against the teacher in pretrained/shapes-teacher, on a machine with no internet.
#
#   bash boot_tools/gpu/continue.sh [RESULTS]          # from the repository root; RESULTS: runs/device
#   SMOKE=1 DEVICE=cpu bash boot_tools/gpu/continue.sh  # 3 steps at batch 4, to check the script on a CPU
#
# Inputs: .devdata/textpk (text states packed by `python -m boot_tools.pack_states`) and packages in
# .whl/ (see boot_tools/gpu/env.sh). Environment: START (student to go on from, pretrained/shapes-boot),
# MINUTES (2.5), DEVICE (cuda), WORK (/tmp/boot-work). Outputs in RESULTS: student.tar (the student, UNet
# in fp16, without its VAE, with its loss curve and samples) and boot.log.txt; the exit code is distill.run's.
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
# shellcheck source=boot_tools/gpu/env.sh
. boot_tools/gpu/env.sh
python3 -m distill.run --preset full --device "$DEV" --init-from "$START" --max-minutes "$MINUTES" \
    --eval-n 0 "${EXTRA[@]}" --out $W/student --work $W/boot > $W/boot.log 2>&1
rc=$?
python3 -m boot_tools.halve_unet "$W/student"
tar -C $W --exclude "*/vae" -cf "$RESULTS/student.tar" student boot/loss.jsonl boot/samples.png boot/loss.png
tr '\r' '\n' < $W/boot.log | grep -v 'it/s\]$\|s/it\]$' > "$RESULTS/boot.log.txt"
tail -5 "$RESULTS/boot.log.txt"
exit $rc
