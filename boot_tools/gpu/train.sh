#!/usr/bin/env bash
# Train a teacher and distil students on one GPU in about 9 minutes, on a machine with no internet and
# no MiniLM package. Three jobs:
#   A  a teacher with cross-attention at every UNet level (batch 256): latents of 200k renders, then the
#      UNet for TEACHER_MIN minutes, then its pipeline folder; its VAE is given (.devdata/teacher2/vae);
#   B  BOOT's full recipe on pretrained/shapes-teacher for B_MIN minutes, in parallel with A;
#   C  BOOT's full recipe on A's teacher for C_MIN minutes, once A is done.
#
#   bash boot_tools/gpu/train.sh [RESULTS]             # from the repository root; RESULTS: runs/device
#   SMOKE=1 DEVICE=cpu bash boot_tools/gpu/train.sh     # a few steps of everything, to check it on a CPU
#
# Inputs: .devdata/textpk and packages in .whl/ (see boot_tools/gpu/env.sh), .devdata/teacher2/vae (a
# model-only checkpoint of the VAE stage of `python -m shapes_world`). Environment: TEACHER_MIN (3.5), B_MIN (7.0),
# C_MIN (3.0), DEVICE (cuda), WORK (/tmp/boot-work). Outputs in RESULTS: teacher-v2-unet.tar and
# teacher-v2-rest.tar.gz (A's teacher), student-v1.tar and student-v2.tar (B's and C's students, UNet
# in fp16, without the VAE, each under 16 MiB), logs.tar.gz.
set -u
RESULTS=${1:-runs/device}
TEACHER_MIN=${TEACHER_MIN:-3.5}
B_MIN=${B_MIN:-7.0}
C_MIN=${C_MIN:-3.0}
DEV=${DEVICE:-cuda}
W=${WORK:-/tmp/boot-work}
SIZES=(--set unet_batch=256 --dataset-size 200000 --unet-steps 40000)
BOOTX=()
if [ -n "${SMOKE:-}" ]; then  # a few steps of everything, to check the script on a CPU
    SIZES=(--set unet_batch=4 --dataset-size 3000 --unet-steps 130); BOOTX=(--steps 3 --batch-size 4)
fi
mkdir -p "$RESULTS" $W
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
export OMP_NUM_THREADS=4
# shellcheck source=boot_tools/gpu/env.sh
. boot_tools/gpu/env.sh
nvidia-smi -L 2>/dev/null
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1

pack_student() {  # $1 student folder, $2 name: UNet to fp16 (as the teacher ships), one tarball
    python3 -m boot_tools.halve_unet "$1"
    # the VAE is the teacher's own (copied back from it), the PNGs travel in logs.tar.gz
    tar -C "$(dirname "$1")" --exclude "*/vae" --exclude "*.png" -cf "$RESULTS/$2.tar" "$(basename "$1")"
    stamp "packed $2: $(du -h "$RESULTS/$2.tar" | cut -f1)"
}

stamp "job B: BOOT full on pretrained/shapes-teacher"
(python3 -m distill.run --preset full --device "$DEV" --max-minutes "$B_MIN" --eval-n 0 "${BOOTX[@]}" \
    --out $W/student-v1 --work $W/boot-v1 > $W/boot-v1.log 2>&1 && pack_student $W/student-v1 student-v1) &

V2=(--set 'unet_down=["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"]'
    --set 'unet_up=["CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]'
    --set unet_lr=0.0003 "${SIZES[@]}")
mkdir -p $W/t2 && cp -r .devdata/teacher2/vae $W/t2/
stamp "job A: teacher v2 latents"
python3 -m shapes_world --device "$DEV" --workers 12 --work $W/t2 --stage latents "${V2[@]}" > $W/teacher-v2.log 2>&1
stamp "job A: teacher v2 UNet"
python3 -m shapes_world --device "$DEV" --work $W/t2 --stage unet --fit-minutes "$TEACHER_MIN" "${V2[@]}" >> $W/teacher-v2.log 2>&1
stamp "job A: export"
python3 -m shapes_world --work $W/t2 --out $W/teacher-v2 --stage export "${V2[@]}" >> $W/teacher-v2.log 2>&1
tar -C $W -cf "$RESULTS/teacher-v2-unet.tar" teacher-v2/unet
tar -C $W --exclude teacher-v2/unet -czf "$RESULTS/teacher-v2-rest.tar.gz" teacher-v2 t2/unet/loss.jsonl t2/unet/loss.png t2/latents.json t2/samples.png
stamp "job A done: $(grep -o 'fit-minutes.*' $W/teacher-v2.log | tail -1)"

stamp "job C: BOOT full on teacher v2"
python3 -m distill.run --preset full --device "$DEV" --teacher $W/teacher-v2 --max-minutes "$C_MIN" --eval-n 0 "${BOOTX[@]}" \
    --out $W/student-v2 --work $W/boot-v2 > $W/boot-v2.log 2>&1 && pack_student $W/student-v2 student-v2
stamp "job C done"
wait
stamp "all done"
for f in $W/*.log; do tr '\r' '\n' < "$f" | grep -v 'it/s\]$\|s/it\]$' > "$f.txt"; done
tar -C $W -czf "$RESULTS/logs.tar.gz" $(cd $W && ls *.log.txt) boot-v1/loss.jsonl boot-v1/samples.png boot-v1/loss.png \
    boot-v2/loss.jsonl boot-v2/samples.png boot-v2/loss.png 2>/dev/null
ls -la "$RESULTS"
