#!/usr/bin/env bash
# Measures training steps of llama3-8b-shaped layers (2 layers, stated) on one GPU against the
# planner's predictions. Plans are made here with:
#   mmsp plan --topology runtime/bench/h100-1gpu.toml --gpus 1 \
#     --model runtime/bench/llama3-8b-2layer.json --context C --recompute none --global-batch 1 --format json
# and carried in carry/ with the binary. Run there: bash runtime/bench/train_measure.sh
set -uo pipefail
# shellcheck source=runtime/bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
OUTDIR=${OUT:-/tmp}
for c in ${CONTEXTS:-8K 16K 32K max}; do
  echo "== context $c"
  timeout 240 $BIN run carry/plan_$c.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps ${STEPS:-5} --out "$OUTDIR/run_$c.json"
  echo "exit=$?"
done
