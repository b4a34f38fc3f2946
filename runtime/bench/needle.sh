#!/usr/bin/env bash
# Needle in a haystack over 1M tokens on one GPU (bf16, in-process ranks), against a chunked
# single-device reference, with the planner's predictions. Small model shape (stated in the
# output): runtime/bench/needle-1m-model.json (2 layers, hidden 1024, 8 heads, 2 kv heads,
# head_dim 128, intermediate 2816, vocab 32000). The plan is made here with:
#   mmsp plan --mode inference --topology runtime/bench/h100-1gpu.toml --gpus 1 \
#     --model runtime/bench/needle-1m-model.json --context 1M --global-batch 1 \
#     --decode-tokens 16 --format json > runtime/bench/plan_needle_1m.json
# and carried in carry/ with the binary. Run there: bash runtime/bench/needle.sh
set -uo pipefail
BIN=${BIN:-carry/mmsp-runtime-infer}
# shellcheck source=runtime/bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
OUTDIR=${OUT:-/tmp}
PLAN=${PLAN:-carry/plan_needle_1m.json}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The plan's layout (one rank: the figures next to the predictions), then 2x2 and 1x4
# in-process ranks on the same GPU (the sharded KV and the LSE merge at 1M tokens).
for lay in plan 2x2 1x4; do
  echo "== layout $lay"
  if [ "$lay" = plan ]; then extra=(); else extra=(--layout "$lay"); fi
  timeout ${STEP_TIMEOUT:-120} "$BIN" needle "$PLAN" --decode 8 "${extra[@]}" | tee "$OUTDIR/needle_$lay.json"
  echo "exit=$?"
done
