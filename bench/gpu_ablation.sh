#!/usr/bin/env bash
# The localization ablation (paper Table 4; issue 4) on a lent GPU, within a fixed budget:
#   1. the 4 mm phantom caches of the training and validation seeds, by a process pool;
#   2. the five arms (scn ln gn lngn mscn) trained side by side on the one GPU, each from scratch
#      with the shipped model's settings (4 mm grid, patch 64,48,48, Adam, cosine schedule), for
#      the same wall-clock time (what is left of the budget, less the evaluation);
#   3. each arm's decoder and presence threshold calibrated on 8001-8012, then all five evaluated
#      on 9001-9010 (`spine-node evaluate --localization A.pt --localization B.pt ...`: id rate, error, > 4/10/20 mm);
#   4. into OUT: ablation.json, the five calibrated weight files, the logs.
# The shares of errors over 4, 10 and 20 mm go into docs/archive/model-card-history.md's Table 4 on the CPU
# machine. Iterations per arm are printed: a fair table needs each arm near convergence (the
# shipped model: ~3,600 iterations of batch 2 at 4 mm).
#
#   bench/gpu_ablation.sh OUT_DIR [BUDGET_S]     # DEVICE=cpu ITERATIONS=2 SEEDS=1-2 for a dry run
set -u
OUT=${1:?usage: bench/gpu_ablation.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-480}
T0=$(date +%s)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu-ablation}
CACHE=$WORK/cache
SEEDS=${SEEDS:-1-200}
VAL_SEEDS=${VAL_SEEDS:-8001-8004}
CAL_SEEDS=${CAL_SEEDS:-8001-8012}
EVAL_SEEDS=${EVAL_SEEDS:-9001-9010}
ITERATIONS=${ITERATIONS:-100000}     # the time limit ends the runs; a dry run sets a few
DEVICE=${DEVICE:-cuda}
ARMS=${ARMS:-scn ln gn lngn mscn}
EVAL_S=${EVAL_S:-120}                # kept for calibration and evaluation
mkdir -p "$OUT" "$WORK" "$CACHE"
left() { echo $(( T0 + BUDGET - $(date +%s) )); }
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }

say "devices: $(nvidia-smi -L 2>&1 | head -2)"
say "1. phantom caches ($SEEDS, $VAL_SEEDS, $CAL_SEEDS)"
# (python -c, not a script on stdin: the pool's spawned processes would try to re-read "<stdin>")
ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 OMP_NUM_THREADS=1 $PY -c "
import os
from pipeline.localization.dataset import cached_phantom_cases
from pipeline.training import seed_range
seeds = sorted(set(seed_range('$SEEDS') + seed_range('$VAL_SEEDS') + seed_range('$CAL_SEEDS')))
cached_phantom_cases(seeds, 4.0, '$CACHE', print, workers=max(1, (os.cpu_count() or 2) - 1))
" > "$WORK/cache.log" 2>&1
say "   rc $?; caches: $(ls "$CACHE" | wc -l) files"

MIN=$(awk -v s="$(( $(left) - EVAL_S ))" 'BEGIN { printf "%.2f", (s > 30 ? s : 30) / 60 }')
say "2. arms ($ARMS) side by side for $MIN min each"
for arm in $ARMS; do
    $PY -m dicom_node train localization --variant "$arm" --seeds "$SEEDS" --val-seeds "$VAL_SEEDS" \
        --iterations "$ITERATIONS" --schedule cosine --device "$DEVICE" --threads 2 \
        --cache-dir "$CACHE" --time-limit-min "$MIN" --val-every 250 \
        --out "$WORK/$arm" > "$WORK/$arm.out" 2>&1 &
done
wait
for arm in $ARMS; do
    say "   $arm: $(grep -E 'val|best' "$WORK/$arm.out" | tail -1 | cut -c1-160)"
done

say "3. calibration on $CAL_SEEDS, evaluation on $EVAL_SEEDS"
models=()
for arm in $ARMS; do
    if [ -f "$WORK/$arm/best.pt" ]; then
        $PY -m dicom_node train calibrate-localization "$WORK/$arm/best.pt" --val-seeds "$CAL_SEEDS" \
            --cache-dir "$CACHE" --out "$WORK/$arm/calibrated.pt" --threads 2 \
            > "$WORK/$arm.calibrate.out" 2>&1 &
    fi
done
wait
for arm in $ARMS; do
    if [ -f "$WORK/$arm/calibrated.pt" ]; then
        cp "$WORK/$arm/calibrated.pt" "$OUT/$arm.pt"
        models+=("$OUT/$arm.pt")
    fi
done
if [ ${#models[@]} -gt 0 ]; then
    loc_args=()
    for m in "${models[@]}"; do loc_args+=(--localization "$m"); done
    $PY -m dicom_node evaluate --seeds "$EVAL_SEEDS" --device "$DEVICE" --json "$OUT/ablation.json" \
        "${loc_args[@]}" > "$WORK/evaluate.out" 2>&1
    say "   evaluate rc $?"
fi
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude=cache --exclude='*.pt' . 2>/dev/null
say "end ($(ls "$OUT" | tr '\n' ' '))"
