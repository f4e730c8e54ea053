#!/usr/bin/env bash
# Several BOOT recipes side by side on one GPU, each distilled fresh from pretrained/shapes-teacher
# with periodic judge validation (--val-every, --keep best) and the 300-caption evaluation at the end.
# Inputs: .devdata/textpk (scripts/pack_states.py pack of `python -m distill.text precompute`), diffusers
# as a wheel in .whl/. VARIANTS: one "name flags..." per line. Results go to $1 (default runs/sweep):
# reports.tar (every run's log, val.jsonl/png, loss, samples, eval report) and the KEEP best students
# (by the final evaluation) as fp16 tarballs.
set -u
RESULTS=${1:-runs/sweep}
MINUTES=${MINUTES:-6}
KEEP=${KEEP:-2}
DEV=${DEVICE:-cuda}
W=${WORK:-/tmp/boot-sweep}
VARIANTS=${VARIANTS:-"base --delta 20 --solver-steps 1"}
COMMON=(--preset full --device "$DEV" --max-minutes "$MINUTES" --batch-size 128 --val-every 250 --val-n 128
        --keep best --eval-n 300 --sample-every 1000)
[ -n "${SMOKE:-}" ] && COMMON=(--preset full --device "$DEV" --steps 3 --batch-size 4 --val-every 2 --val-n 4
                               --keep best --eval-n 4 --sample-every 0)
mkdir -p "$RESULTS" $W
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD BOOT_TEXT_STATES=$W/text PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
python3 scripts/pack_states.py unpack .devdata/textpk $W/text || exit 1
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
tar -C $W -cf "$RESULTS/reports.tar" --exclude '*/checkpoints' --exclude '*/best' --exclude '*/student' \
    --exclude '*/samples/*' "${names[@]}"
# The KEEP students with the highest final student-1 accuracy, fp16, without the teacher's VAE.
for name in $(for n in "${names[@]}"; do
                  acc=$(python3 -c "import json,sys; print(json.load(open('$W/$n/student/boot.json'))['evaluation']['student_accuracy'])" 2>/dev/null || echo -1)
                  echo "$acc $n"; done | sort -rn | head -n "$KEEP" | awk '{print $2}'); do
    python3 scripts/halve_unet.py "$W/$name/student"
    tar -C $W/$name --exclude "*/vae" -cf "$RESULTS/student-$name.tar" student
done
ls -la "$RESULTS"
