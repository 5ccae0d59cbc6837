#!/usr/bin/env bash
# The process benchmark on a lent GPU for two checkouts on the same machine (issues 4 and 5):
# BASE (an older tree, e.g. `git archive <commit> | tar -x -C .base`) and this one, each as
# `python bench/process.py --warm N` (a cold `spine-node process`, then the stages warm in one
# process), this checkout's run also profiled (cProfile and the torch profiler, one warm run each).
# Into OUT: base.json, head.json, head_prof/{cprofile,torch}.txt, compare.log.
#
#   bench/gpu_compare.sh OUT_DIR BASE_DIR [WARM]     # DEVICE=cpu for a dry run without a GPU
set -u
OUT=${1:?usage: bench/gpu_compare.sh OUT_DIR BASE_DIR [WARM]}
BASE=$(cd "${2:?usage: bench/gpu_compare.sh OUT_DIR BASE_DIR [WARM]}" && pwd)
WARM=${3:-4}
DEVICE=${DEVICE:-cuda}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
STUDY=${STUDY:-/tmp/gpu-compare-study}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
summary() { $PY -c "
import json, sys
r = json.load(open(sys.argv[1]))
w = r.get('warm') or {}
print('cold wall', r.get('wall_s'), 'rc', r.get('returncode'), '| warm median', w.get('median_after_first'), '| gpu', w.get('gpu'))
" "$1" 2>&1; }

say "devices: $(nvidia-smi -L 2>&1 | head -1)"
# The same bench script for both (it imports the pipeline of the directory it runs in: the child
# is `python -m dicom_node` in that directory), the study written once.
say "1. base ($BASE)"
(cd "$BASE" && PYTHONPATH="$BASE${PYTHONPATH:+:$PYTHONPATH}" $PY "$HERE/bench/process.py" --seed 8101 \
    --device "$DEVICE" --warm "$WARM" --keep "$STUDY" --json "$OUT/base.json") > "$OUT/base.log" 2>&1
say "   rc $?: $(summary "$OUT/base.json")"
say "2. this checkout ($HERE), profiled"
(cd "$HERE" && PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" $PY bench/process.py --seed 8101 --device "$DEVICE" --warm "$WARM" --keep "$STUDY" \
    --profile "$OUT/head_prof" --json "$OUT/head.json") > "$OUT/head.log" 2>&1
say "   rc $?: $(summary "$OUT/head.json")"
tail -n 5 "$OUT/base.log" "$OUT/head.log" | grep -i -E 'error|traceback' && say "errors above"
say "end"
