#!/usr/bin/env bash
# Measures the planner's kernel calibration on the GPU machine with the runtime's own kernels
# (bf16 GEMM curves, cuDNN attention through mmsp_runtime::kernel, HBM bandwidth, layout
# copies), and optionally the NCCL collectives of all GPUs. Run there from the repository root:
#   bash runtime/bench/calibrate.sh      (about a minute per calibration on an H100)
# Arguments (environment):
#   SHAPES     which shapes: "8b" (llama3-8b, calibrate's default) and/or "2layer" (the 2-layer
#              bench model's exact shapes, runtime/tests/data/llama3-8b-2layer.json); default
#              both; SHAPES= (empty) none, for COMM=1 alone
#   NAME       file name prefix (default <kind>-sxm: h100-sxm.json, h100-sxm-2layer.json)
#   CAL_ARGS   extra `calibrate` flags, e.g. "--batch-ms 100 --preheat-s 10" (sustained clocks)
#   CLOCKS=1   log the SM clock, power and temperature every 500 ms to $OUT/clocks.csv
#   COMM=1     then `calibrate-comm` over every GPU (one process each) into a copy of BASE
#              (default: the last calibration made here), $OUT/NAME-2layer-ncclN.json (2+ GPUs)
# The calibration JSONs land in $OUT; plan with them here: mmsp plan --calibration FILE ...
set -uo pipefail
# shellcheck source=runtime/bench/common.sh
source "$(dirname "$0")/common.sh"
NAME=${NAME:-$(gpu_kind)-sxm}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "${CLOCKS:-0}" = 1 ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 500 > "$OUTDIR/clocks.csv" &
  SMI=$!
fi
CAL=
for s in ${SHAPES-8b 2layer}; do
  if [ "$s" = 8b ]; then CAL=$OUTDIR/$NAME.json; M=(); else CAL=$OUTDIR/$NAME-2layer.json; M=(--model "$MODEL"); fi
  sec "calibrate ($s shapes)"
  # shellcheck disable=SC2086
  time timeout 400 $BIN calibrate "${M[@]}" --out "$CAL" ${CAL_ARGS:-}
  echo "exit=$?"
done
[ -n "${SMI:-}" ] && kill "$SMI"
if [ "${COMM:-0}" = 1 ]; then
  N=$(nvidia-smi -L | wc -l); P=/tmp/mmsp-comm-plan.json
  BASE=${BASE:-$CAL}
  sec "calibrate-comm over $N GPUs into a copy of $BASE"
  plan "$N" --model "$MODEL" --context 32K --layout 2x$((N / 2)) --zero 1 --recompute none --global-batch 1 > $P
  cp "$BASE" "$OUTDIR/$NAME-2layer-nccl$N.json"
  launch "$N" calibrate-comm --plan $P --into "$OUTDIR/$NAME-2layer-nccl$N.json" 2>&1 | grep -v '^$' | tail -20 | cut -c1-300
fi
sec done
