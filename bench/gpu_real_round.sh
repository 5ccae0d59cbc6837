#!/usr/bin/env bash
# One real-data training round on a lent GPU (issue 24), within a fixed wall-clock budget:
# the localization and the 2 mm segmentation networks fine-tuned side by side from the installed
# weights on phantoms, the real-spine pack's train-side CT and CT synthesised from its train-side
# masks (pipeline/synthesis), cosine-annealed over the budget, each checkpoint chosen on phantom
# validation seeds and volumes synthesised from the train side's masks with a seed of their own; then the 1 mm refiner on the same
# real crops. Results into OUT: the best.pt of each run and logs.tar.gz. Choosing and installing
# happens on the CPU machine, on phantom validation seeds and the pack's train side only
# (`spine-node evaluate --data ../shared/data/real-spine --split train --segmentation ...`;
# the validation side is for the figures reported, once).
#
#   bench/gpu_real_round.sh OUT_DIR [BUDGET_S]
#   DEVICE=cpu STEPS_SCALE=0.001 SYNTH_LOC=2 SYNTH_SEG=2 VAL_SYNTH=2 LOC_SEEDS=1-2 SEG_SEEDS=100-101 \
#     REF_SEEDS=100-101 bench/gpu_real_round.sh /tmp/dry 300      # a dry run without a GPU
set -u
OUT=${1:?usage: bench/gpu_real_round.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-540}
T0=$(date +%s)
export PYTHONUNBUFFERED=1
PACK=${PACK:-../shared/data/real-spine}
WORK=${WORK:-/tmp/gpu-real-round}
DEVICE=${DEVICE:-cuda}
SCALE=${STEPS_SCALE:-1}
SYNTH_LOC=${SYNTH_LOC:-160}
SYNTH_SEG=${SYNTH_SEG:-150}
VAL_SYNTH=${VAL_SYNTH:-26}   # validation volumes synthesised with their own seed (1000)
LOC_SEEDS=${LOC_SEEDS:-1-120}
SEG_SEEDS=${SEG_SEEDS:-100-149}
REF_SEEDS=${REF_SEEDS:-100-119}
mkdir -p "$OUT" "$WORK"
steps() { awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s); print (v < 2 ? 2 : v) }'; }
left() { echo $(( T0 + BUDGET - $(date +%s) )); }
minutes() { awk -v s="$1" 'BEGIN { printf "%.2f", (s > 30 ? s : 30) / 60 }'; }
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }

[ -d "$PACK" ] || { echo "no real-spine pack at $PACK" >&2; exit 2; }
say "devices: $(nvidia-smi -L 2>&1 | head -1)"
# Both runs share the budget but the refiner's 90 s at the end.
TRAIN_MIN=$(minutes $(( $(left) - 120 )))
say "1. localization and segmentation side by side, $TRAIN_MIN min each"
spine-node train localization --device "$DEVICE" --seeds "$LOC_SEEDS" --val-seeds 8001-8004 \
    --iterations "$(steps 4000)" --lr 5e-4 --schedule cosine --init-from shipped --relabel \
    --real-data "$PACK" --real-repeat 3 --synth-from "$PACK" --synth-cases "$SYNTH_LOC" \
    --val-synth-cases "$VAL_SYNTH" --val-synth-seed 1000 --out "$WORK/loc" --cache-dir "$WORK/cache-loc" --workers 4 --val-every 250 \
    --time-limit-min "$TRAIN_MIN" > "$WORK/loc.log" 2>&1 &
LOC=$!
spine-node train segmentation --device "$DEVICE" --seeds "$SEG_SEEDS" --val-seeds 8001-8002 \
    --steps "$(steps 6000)" --batch 8 --lr 3e-4 --schedule cosine --init-from shipped \
    --real-data "$PACK" --real-fraction 0.3 --synth-from "$PACK" --synth-cases "$SYNTH_SEG" \
    --synth-fraction 0.3 --val-synth-cases "$VAL_SYNTH" --val-synth-seed 1000 --out "$WORK/seg" --cache "$WORK/cache" --workers 4 \
    --time-limit-min "$TRAIN_MIN" > "$WORK/seg.log" 2>&1 &
SEG=$!
wait $LOC; say "   localization rc $?: $(grep 'val it' "$WORK/loc.log" | tail -1)"
wait $SEG; say "   segmentation rc $?: $(grep 'val step' "$WORK/seg.log" | tail -1)"

say "2. refiner, $(minutes $(( $(left) - 20 ))) min"
spine-node train refiner --device "$DEVICE" --seeds "$REF_SEEDS" --val-seeds 8001 \
    --steps "$(steps 3000)" --lr 5e-4 --width 16 --extra-dilations 4,8 --schedule cosine \
    --init-from shipped --real-data "$PACK" --real-repeat 4 --out "$WORK/ref" \
    --cache "$WORK/cache" --workers 4 --time-limit-min "$(minutes $(( $(left) - 20 )))" \
    > "$WORK/ref.log" 2>&1
say "   refiner rc $?: $(grep 'val step' "$WORK/ref.log" | tail -1)"

for run in loc seg ref; do
    [ -f "$WORK/$run/best.pt" ] && cp "$WORK/$run/best.pt" "$OUT/$run-best.pt"
done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" loc.log seg.log ref.log 2>/dev/null
say "done: $(ls "$OUT" | tr '\n' ' ')"
