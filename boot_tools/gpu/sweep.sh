#!/usr/bin/env bash
# Several BOOT recipes side by side on one GPU, each distilled from pretrained/shapes-teacher (fresh, or
# --init-from a student) with periodic validation (--val-every; --keep best by PSNR against the teacher's
# 50-step images, the judge's accuracy recorded beside it; SELECT=judge keeps by the judge) and, unless
# EVAL_N=0, the 300-caption evaluation at the end.
#
#   VARIANTS=$'a --delta 20\nb --delta 40' bash boot_tools/gpu/sweep.sh [RESULTS]   # repository root
#   SMOKE=1 DEVICE=cpu bash boot_tools/gpu/sweep.sh     # 3 steps per variant, to check it on a CPU
#
# Inputs: .devdata/textpk and packages in .whl/ (see boot_tools/gpu/env.sh); VARIANTS: one "name flags..."
# per line (distill.run flags). Environment: MINUTES (6), KEEP (2), VAL_EVERY (250), VAL_N (128), EVAL_N
# (300), SELECT (psnr), DEVICE (cuda), WORK (/tmp/boot-sweep). Outputs in RESULTS (runs/sweep): reports.tar
# (every run's log, val.jsonl/png, loss, samples, eval report) and the KEEP best students (by the final
# evaluation, else by validation): the best one's folder without weights plus its fp32 UNet split into
# fp32-NAME.part-* (cat them back together), the others as fp16 tarballs.
set -u
RESULTS=${1:-runs/sweep}
MINUTES=${MINUTES:-6}
KEEP=${KEEP:-2}
DEV=${DEVICE:-cuda}
W=${WORK:-/tmp/boot-sweep}
VARIANTS=${VARIANTS:-"base --delta 20 --solver-steps 1"}
VAL_EVERY=${VAL_EVERY:-250}
VAL_N=${VAL_N:-128}
EVAL_N=${EVAL_N:-300}
COMMON=(--preset full --device "$DEV" --max-minutes "$MINUTES" --batch-size 128 --val-every "$VAL_EVERY"
        --val-n "$VAL_N" --keep best --select "${SELECT:-psnr}" --eval-n "$EVAL_N" --sample-every 1000)
[ -n "${SMOKE:-}" ] && COMMON=(--preset full --device "$DEV" --steps 3 --batch-size 4 --val-every 2 --val-n 4
                               --keep best --eval-n "$([ "$EVAL_N" = 0 ] && echo 0 || echo 4)" --sample-every 0)
mkdir -p "$RESULTS" $W
export OMP_NUM_THREADS=3
# shellcheck source=boot_tools/gpu/env.sh
. boot_tools/gpu/env.sh
names=()
while read -r name flags; do
    [ -z "$name" ] && continue
    names+=("$name")
    # shellcheck disable=SC2086
    python3 -m distill.run "${COMMON[@]}" $flags --out $W/$name/student --work $W/$name/work > $W/$name.log 2>&1 &
done <<< "$VARIANTS"
wait
for name in "${names[@]}"; do
    tr '\r' '\n' < $W/$name.log | grep -v 'it/s\]$\|s/it\]$' > $W/$name/log.txt
    echo "$name: $(grep 'student-1 accuracy' $W/$name/log.txt || tail -2 $W/$name/log.txt)"
done
tar -C $W -cf "$RESULTS/reports.tar" --exclude '*.safetensors' --exclude '*/checkpoints' --exclude '*/best' --exclude '*/student' \
    --exclude '*/samples/*' "${names[@]}"
# The KEEP students with the highest final student-1 accuracy (with EVAL_N=0: best validation), fp16,
# without the teacher's VAE.
score() {  # final evaluation's student-1 accuracy, else the best validation accuracy, else -1
    python3 - "$1" <<'PY' 2>/dev/null || echo -1
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
ev = json.loads((run / "student/boot.json").read_text()).get("evaluation")
if ev:
    print(ev["student_accuracy"])
else:
    print(max(json.loads(line)["accuracy"] for line in (run / "work/val.jsonl").read_text().splitlines() if line))
PY
}
for name in $(for n in "${names[@]}"; do echo "$(score $W/$n) $n"; done | sort -rn | head -n "$KEEP" | awk '{print $2}'); do
    if [ -z "${top:-}" ]; then  # the best one as its fp32 UNet (to go on from), in parts under 16 MiB
        top=$name
        split -b 15M "$W/$name/student/unet/diffusion_pytorch_model.safetensors" "$RESULTS/fp32-$name.part-"
        tar -C $W/$name --exclude "*/vae" --exclude "*.safetensors" -cf "$RESULTS/student-$name.tar" student
        continue
    fi
    python3 -m boot_tools.halve_unet "$W/$name/student"
    tar -C $W/$name --exclude "*/vae" -cf "$RESULTS/student-$name.tar" student
done
ls -la "$RESULTS"
