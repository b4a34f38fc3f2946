#!/usr/bin/env bash
# Needle in a haystack over 1M tokens on ONE GPU (bf16, in-process ranks), against a chunked
# single-device reference, with the planner's predictions (decode ms/token, prefill tokens/s,
# KV bytes). Small model shape (stated in the output): runtime/bench/inputs/needle-1m-model.json
# (2 layers, hidden 1024, 8 heads, 2 kv heads, head_dim 128, intermediate 2816, vocab 32000).
# The plan is made here at run time with the carried planner (common.sh):
#   mmsp plan --mode inference --topology <kind>-1gpu.toml --gpus 1 \
#     --model runtime/bench/inputs/needle-1m-model.json --context 1M --global-batch 1 \
#     --decode-tokens 16 --format json > $OUT/plan_needle.json
# Run there: bash runtime/bench/needle.sh
# Arguments (environment): LAYOUTS (default "plan 2x2 1x4"), CONTEXT (default 1M), DECODE
# (tokens decoded, default 8), PLAN (a plan file instead of making one), STEP_TIMEOUT,
# NEEDLE_ARGS (extra `needle` flags, e.g. --no-cuda-graph), TAG (suffix of the output files).
# Prints each layout's JSON, then one summary line per layout: decode ms/token measured vs
# predicted (the prediction is for the plan's layout, 1 rank on the GPU).
set -uo pipefail
# shellcheck source=runtime/bench/common.sh
source "$(dirname "$0")/common.sh"
if [ -z "${PLAN:-}" ]; then
  PLAN=$OUTDIR/plan_needle.json
  plan 1 --mode inference --model "$IN/needle-1m-model.json" --context "${CONTEXT:-1M}" --global-batch 1 \
    --decode-tokens 16 > "$PLAN" || exit 1
fi
DECODE=${DECODE:-8}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The plan's layout (one rank: the figures next to the predictions), then 2x2 and 1x4
# in-process ranks on the same GPU (the sharded KV and the LSE merge at 1M tokens).
for lay in ${LAYOUTS:-plan 2x2 1x4}; do
  echo "== layout $lay"
  if [ "$lay" = plan ]; then extra=(); else extra=(--layout "$lay"); fi
  # shellcheck disable=SC2086
  timeout "${STEP_TIMEOUT:-150}" "$BIN" needle "$PLAN" --decode "$DECODE" "${extra[@]}" ${NEEDLE_ARGS:-} | tee "$OUTDIR/needle_$lay${TAG:-}.json"
  echo "exit=$?"
done
for lay in ${LAYOUTS:-plan 2x2 1x4}; do
  $PY - "$OUTDIR/needle_$lay${TAG:-}.json" "$lay" <<'PYEOF'
import json, sys
try:
    v = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception as e:
    print(json.dumps({"layout": sys.argv[2], "error": str(e)})); sys.exit(0)
m, p = v["measured"], v["predicted"]
print(json.dumps({"summary": "needle", "layout": sys.argv[2], "prompt_tokens": v["prompt_tokens"],
    "decode_ms_per_token": m["decode_ms_per_token_median"], "predicted_decode_ms_per_token": p["decode_ms_per_token"],
    "prefill_tokens_per_s": m["prefill_tokens_per_s"], "predicted_prefill_tokens_per_s": p["prefill_tokens_per_s"],
    "max_rel_err_needle_prefill": v["max_rel_err_needle_prefill"], "max_rel_err_decode": v["max_rel_err_decode"],
    "decode_path": v.get("decode_path")}))
PYEOF
done
