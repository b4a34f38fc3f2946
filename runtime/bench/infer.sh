#!/usr/bin/env bash
# Sequence-parallel inference over NCCL, one process per GPU (torchrun-style environment:
# RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), on every GPU of this machine.
# For each model (the CI tiny model, then a random model of the plan's shape), greedy
# decoding with NCCL is checked against the same plan run in ONE process with in-process
# thread ranks on GPU 0 (the tokens must be equal), and rank 0's decode ms/token and prefill
# tokens/s are printed next to the plan's prediction, as JSON.
#
# The plan is made here at run time with the carried planner (common.sh): N GPUs of this
# machine's kind on one NVSwitch, the needle model shape (runtime/bench/inputs/needle-1m-model.json):
#   mmsp plan --mode inference --topology <kind>-<N>gpu.toml --gpus N \
#     --model runtime/bench/inputs/needle-1m-model.json --context 256K --global-batch 1 \
#     --decode-tokens 32 --format json > $OUT/plan_infer.json
# Usage there: bash runtime/bench/infer.sh
# Arguments (environment): NGPU (default all), CONTEXT (default 256K), MAX_NEW (default 32),
# PLAN (a plan file instead of making one), STEP_TIMEOUT.
set -uo pipefail
# shellcheck source=runtime/bench/common.sh
source "$(dirname "$0")/common.sh"
N=${NGPU:-$(nvidia-smi -L | wc -l)}
MAX_NEW=${MAX_NEW:-32}
if [ -z "${PLAN:-}" ]; then
  PLAN=$OUTDIR/plan_infer.json
  plan "$N" --mode inference --model "$IN/needle-1m-model.json" --context "${CONTEXT:-256K}" \
    --global-batch 1 --decode-tokens "$MAX_NEW" > "$PLAN" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "{\"gpus\": $N, \"plan\": \"$PLAN\"}"
[ -f "$PLAN" ] || { echo "missing $PLAN"; exit 2; }
PORT=29700
run_case() { # name, extra args...
  local name=$1; shift
  echo "== $name: NCCL, $N processes"
  PORT=$((PORT + 1)); local PIDS=()
  for RK in $(seq 0 $((N - 1))); do
    RANK=$RK WORLD_SIZE=$N LOCAL_RANK=$RK MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
      timeout "${STEP_TIMEOUT:-300}" "$BIN" infer "$PLAN" --nccl --max-new "$MAX_NEW" "$@" \
      > "$OUTDIR/infer_${name}_nccl_rank$RK.json" & PIDS+=($!)
  done
  local ok=1
  for p in "${PIDS[@]}"; do wait "$p" || ok=0; done
  cat "$OUTDIR/infer_${name}_nccl_rank0.json"
  echo "nccl_exit_ok=$ok"
  echo "== $name: one process, in-process ranks on GPU 0"
  timeout "${STEP_TIMEOUT:-300}" "$BIN" infer "$PLAN" --device cuda --max-new "$MAX_NEW" "$@" \
    | tee "$OUTDIR/infer_${name}_inprocess.json"
  $PY - "$OUTDIR/infer_${name}_nccl_rank0.json" "$OUTDIR/infer_${name}_inprocess.json" "$name" <<'PYEOF'
import json, sys
def load(p):
    try:
        return json.loads(open(p).read().strip().splitlines()[-1])
    except Exception as e:
        return {"error": str(e)}
a, b = load(sys.argv[1]), load(sys.argv[2])
pred = a.get("predicted") or {}
print(json.dumps({"summary": "infer_nccl", "case": sys.argv[3], "world": a.get("world"),
    "ulysses": a.get("ulysses"), "ring": a.get("ring"), "dtype": a.get("dtype"),
    "prompt_tokens": a.get("prompt_tokens"),
    "tokens_equal": a.get("tokens") is not None and a.get("tokens") == b.get("tokens"),
    "nccl_tokens": a.get("tokens"), "inprocess_tokens": b.get("tokens"),
    "nccl_decode_ms_per_token": a.get("decode_ms_per_token_median"),
    "inprocess_decode_ms_per_token": b.get("decode_ms_per_token_median"),
    "predicted_decode_ms_per_token": pred.get("decode_ms_per_token"),
    "nccl_prefill_tokens_per_s": a.get("prefill_tokens_per_s"),
    "inprocess_prefill_tokens_per_s": b.get("prefill_tokens_per_s"),
    "predicted_prefill_tokens_per_s": pred.get("prefill_tokens_per_s"),
    "kv_bytes_per_rank": a.get("kv_bytes_per_rank"),
    "predicted_kv_cache_bytes_per_gpu": pred.get("kv_cache_bytes_per_gpu")}))
PYEOF
}
# Tiny model (2 layers, hidden 64): correctness of the NCCL path, bf16 and f32.
run_case tiny_bf16 --tiny --haystack 1000 --dtype bf16
run_case tiny_f32 --tiny --haystack 1000 --dtype f32
# The plan's model shape (random weights), a prompt filling the context but the decoded tokens.
CTX=$($PY -c "import json; print(json.load(open('$PLAN'))['context_tokens'])")
run_case plan_model --haystack $((CTX - MAX_NEW)) --dtype bf16
echo "== done"
