#!/usr/bin/env bash
# Sequence-parallel inference over NCCL, one process per GPU (torchrun-style environment:
# RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), on every GPU of this machine.
# For each model (the CI tiny model, then a random model of the plan's shape), greedy
# decoding with NCCL is checked against the same plan run in ONE process with in-process
# thread ranks on GPU 0 (the tokens must be equal), and rank 0's decode ms/token and prefill
# tokens/s are printed next to the plan's prediction, as JSON.
#
# Plans are made on the CPU machine and carried in carry/ with the binary (carry/mmsp-runtime).
# One node of N GPUs on one NVSwitch: runtime/bench/h100-1gpu.toml with N GPUs (and, for
# H200s, the H200's memory and bandwidth from topologies/hgx-h200.toml):
#   M=target/release/mmsp   # or any build of the planner
#   for n in 2 4 8; do
#     sed -e "s/^gpus = 1/gpus = $n/" -e "s/^domain_gpus = 1/domain_gpus = $n/" \
#       -e "s/^name = .*/name = \"h100-${n}gpu\"/" runtime/bench/h100-1gpu.toml > carry/h100-${n}gpu.toml
#     sed -e 's/^model = .*/model = "H200 SXM 141GB"/' -e 's/^hbm_gib = .*/hbm_gib = 140.4/' \
#       -e 's/^hbm_tbps = .*/hbm_tbps = 4.8/' -e "s/h100-${n}gpu/h200-${n}gpu/" \
#       carry/h100-${n}gpu.toml > carry/h200-${n}gpu.toml
#     for g in h100 h200; do
#       $M plan --mode inference --topology carry/$g-${n}gpu.toml --gpus $n \
#         --model runtime/bench/needle-1m-model.json --context 256K --global-batch 1 \
#         --decode-tokens 32 --format json > carry/plan_infer_${g}_$n.json
#     done
#   done
# Usage there: bash runtime/bench/infer_nccl.sh   (PLAN=... to pick another plan)
set -uo pipefail
# shellcheck source=runtime/bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
OUTDIR=${OUT:-/tmp}
N=${NGPU:-$(nvidia-smi -L | wc -l)}
NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case $NAME in *H200*) TOPO=h200;; *) TOPO=h100;; esac
PLAN=${PLAN:-carry/plan_infer_${TOPO}_$N.json}
MAX_NEW=${MAX_NEW:-32}
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
