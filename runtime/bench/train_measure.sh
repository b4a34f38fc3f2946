#!/usr/bin/env bash
# Measures training steps of llama3-8b-shaped layers (2 layers, stated) against the planner's
# predictions. Plans are made here with:
#   mmsp plan --topology runtime/bench/h100-1gpu.toml --gpus 1 \
#     --model runtime/bench/llama3-8b-2layer.json --context C --recompute none --global-batch 1 --format json
# and carried in carry/ (carry/plan_C.json) with the binary. Run there:
#   bash runtime/bench/train_measure.sh
# Each run writes run_C.json (step time, tokens/s, MFU, peak memory per rank, communication
# time, phases, measured vs predicted) and trace_C.json (Chrome trace of every rank's step
# phases, the simulator's format: open it next to `mmsp simulate plan_C.json --trace`).
# LAUNCH=inprocess (default) runs the plan's ranks as threads on GPU 0; LAUNCH=gpus runs
# `mmsp-runtime run` without --inprocess, which starts one NCCL process per GPU itself (the
# plan's world size must equal the GPUs found).
set -uo pipefail
# shellcheck source=runtime/bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
OUTDIR=${OUT:-/tmp}
LAUNCH=${LAUNCH:-inprocess}
for c in ${CONTEXTS:-8K 16K 32K max}; do
  echo "== context $c ($LAUNCH)"
  P=carry/plan_$c.json
  if [ "$LAUNCH" = inprocess ]; then
    W=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['world_size'])" "$P")
    MODE=(--inprocess "$W")
  else
    MODE=()
  fi
  timeout 300 $BIN run "$P" --model carry/llama3-8b-2layer.json "${MODE[@]}" --steps "${STEPS:-5}" \
    --out "$OUTDIR/run_$c.json" --trace "$OUTDIR/trace_$c.json"
  echo "exit=$?"
done
