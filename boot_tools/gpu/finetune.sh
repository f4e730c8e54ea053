#!/usr/bin/env bash
# Fine-tune the shipped pair on one GPU in about 9 minutes, on a machine with no internet: go on training
# pretrained/shapes-teacher at batch 512 (`python -m shapes_world --init-from`) for TEACHER_MIN minutes, then go
# on distilling pretrained/shapes-boot against that new teacher (`distill.run --init-from`, batch 64) for
# the time left before DEADLINE seconds. If the teacher stage fails, the student goes on against the
# shipped teacher instead.
#
#   bash boot_tools/gpu/finetune.sh [RESULTS]          # from the repository root; RESULTS: runs/device
#   SMOKE=1 DEVICE=cpu bash boot_tools/gpu/finetune.sh  # a few steps of everything, to check it on a CPU
#
# Inputs: .devdata/textpk and packages in .whl/ (see boot_tools/gpu/env.sh). Environment: TEACHER_MIN (4.0),
# DEADLINE (530), DEVICE (cuda), WORK (/tmp/boot-work). Outputs in RESULTS: teacher.tar (the teacher folder,
# its loss and samples), student.tar (UNet in fp16, without the VAE), teacher.log.txt and boot.log.txt.
set -u
RESULTS=${1:-runs/device}
TEACHER_MIN=${TEACHER_MIN:-4.0}
DEADLINE=${DEADLINE:-530}
DEV=${DEVICE:-cuda}
W=${WORK:-/tmp/boot-work}
SIZES=(--dataset-size 200000 --unet-steps 40000 --set unet_batch=512)
BOOTX=(--batch-size 64)
if [ -n "${SMOKE:-}" ]; then  # a few steps of everything, to check the script on a CPU
    SIZES=(--dataset-size 600 --unet-steps 4 --set unet_batch=4); BOOTX=(--steps 3 --batch-size 4)
fi
mkdir -p "$RESULTS" $W
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
export OMP_NUM_THREADS=4
# shellcheck source=boot_tools/gpu/env.sh
. boot_tools/gpu/env.sh
nvidia-smi -L 2>/dev/null
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'cuda', torch.cuda.is_available())" || exit 1

stamp "teacher: go on training pretrained/shapes-teacher"
python3 -m shapes_world --device "$DEV" --workers 14 --init-from pretrained/shapes-teacher \
    --work $W/t3 --out $W/teacher-v3 --fit-minutes "$TEACHER_MIN" "${SIZES[@]}" \
    --set unet_warmup=200 --set checkpoint_every=1000 > $W/teacher.log 2>&1
TEACHER=$W/teacher-v3
if [ -f $TEACHER/boot_teacher.json ]; then
    tar -C $W -cf "$RESULTS/teacher.tar" teacher-v3 t3/unet/loss.jsonl t3/unet/loss.png t3/samples.png t3/latents.json
    stamp "teacher done: $(grep -o 'fit-minutes.*steps$' $W/teacher.log | tail -1)"
else
    TEACHER=pretrained/shapes-teacher
    stamp "teacher FAILED; the student goes on against the shipped teacher"
fi

BOOT_MIN=$(python3 -c "print(max(0.5, ($DEADLINE - $(( $(date +%s) - t0 )) - 50) / 60))")
stamp "student: go on distilling pretrained/shapes-boot against $TEACHER for $BOOT_MIN min"
python3 -m distill.run --preset full --device "$DEV" --teacher $TEACHER --init-from pretrained/shapes-boot \
    --max-minutes "$BOOT_MIN" --eval-n 0 "${BOOTX[@]}" --out $W/student --work $W/boot > $W/boot.log 2>&1
rc=$?
if [ -d $W/student/unet ]; then
    python3 -m boot_tools.halve_unet $W/student
    tar -C $W --exclude "*/vae" -cf "$RESULTS/student.tar" student boot/loss.jsonl boot/samples.png boot/loss.png
fi
for f in teacher boot; do tr '\r' '\n' < $W/$f.log | grep -v 'it/s\]$\|s/it\]$' > "$RESULTS/$f.log.txt"; done
stamp "all done (student rc $rc)"
tail -4 "$RESULTS/boot.log.txt"
ls -la "$RESULTS"
exit $rc
