#!/usr/bin/env bash
# Runs the GPU checks and benchmarks of mmsp-runtime on the device machine, from the
# repository root, with the binary carried in carry/mmsp-runtime. Prints JSON lines, with a
# "== section (time)" line before each part.
# Usage there: bash runtime/bench/kernels.sh [checks] [kernels] [pytorch] [2d] [nccl]
# (default: checks kernels pytorch 2d; nccl needs a machine with several GPUs to mean much)
#   kernels + pytorch: the runtime's kernels and attn_bench.py timed the same way (CUDA events,
#     mean of back-to-back calls), then one "kernel_ratio" line per S (runtime's best backend
#     over PyTorch's best, target 0.97).
#   2d: in-process ranks on one GPU, 2/4/8 ranks, every factorisation, 32K and 128K tokens,
#     both stream modes, with the kernel-curve bound of the same ring blocks
#     (BENCH_2D_ARGS adds flags, e.g. "--streams one").
#   nccl: one launch per (ulysses, ring) factorisation of all GPUs: checks, then 2D attention
#     at NCCL_SEQS (default 32768,131072) against one single-GPU kernel.
set -uo pipefail
# shellcheck source=runtime/bench/common.sh
source "$(dirname "$0")/common.sh"
PARTS=${*:-checks kernels pytorch 2d}
TMP=$(mktemp -d)
# wplan W U R: a whole plan of world size W, ulysses U x ring R (the 2-layer model at 32K),
# made by the carried planner (common.sh), as nccl-check and nccl-bench read it.
wplan() { plan "$1" --model "$MODEL" --context 32K --layout "$2x$3" --global-batch 1 > "$TMP/w$1-$2x$3.json" && echo "$TMP/w$1-$2x$3.json"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for part in $PARTS; do
  case $part in
  checks)
    sec "check: 2D attention in bf16 on the GPU vs float64"; $BIN check
    sec "bf16 error vs ring size (cuDNN)"; $BIN bf16-error --backend cudnn --seq 8192
    sec "nccl world of 1"
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 $BIN nccl-check --plan "$(wplan 1 1 1)"
    sec "plan for 2 ranks, launch of 1 (must fail at once)"
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 timeout 60 $BIN nccl-check --plan "$(wplan 2 1 2)"; echo "exit=$?";;
  kernels) sec "runtime kernels"; $BIN bench --what kernels | tee "$TMP/kernels.jsonl";;
  pytorch) sec "pytorch attn_bench.py"; PYTHONUNBUFFERED=1 $PY runtime/bench/attn_bench.py | tee "$TMP/pytorch.jsonl";;
  2d) sec "2D in-process ranks on one GPU"
    # shellcheck disable=SC2086
    $BIN bench --what 2d --seqs-2d 32768,131072 --ranks 2,4,8 ${BENCH_2D_ARGS:-};;
  nccl)
    # One process per GPU, torchrun-style environment; one launch per factorisation runs the
    # checks and then every sequence length.
    N=$(nvidia-smi -L | wc -l); PORT=29600
    for U in $(seq 1 "$N"); do
      [ $((N % U)) -eq 0 ] || continue
      R=$((N / U))
      sec "NCCL 2D over $N GPUs: ulysses $U x ring $R"
      P=$(wplan "$N" "$U" "$R") || continue
      PIDS=(); PORT=$((PORT + 1))
      for RK in $(seq 0 $((N - 1))); do
        RANK=$RK WORLD_SIZE=$N LOCAL_RANK=$RK MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
          timeout 400 $BIN nccl-bench --check --seqs "${NCCL_SEQS:-32768,131072}" --plan "$P" & PIDS+=($!)
      done
      for p in "${PIDS[@]}"; do wait "$p" || echo "{\"rank_pid\": $p, \"failed\": \"nccl-bench --check\"}"; done
    done;;
  esac
done
if [ -s "$TMP/kernels.jsonl" ] && [ -s "$TMP/pytorch.jsonl" ]; then
  sec "kernel ratio: runtime's best backend over PyTorch's best, same timing"
  $PY - "$TMP/kernels.jsonl" "$TMP/pytorch.jsonl" <<'PYEOF'
import json, sys
def rows(path):
    out = []
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "S" in r and "fwd_tflops" in r:
            out.append(r)
    return out
rt, pt = rows(sys.argv[1]), rows(sys.argv[2])
for s in sorted({r["S"] for r in rt} & {r["S"] for r in pt}):
    res = {"kernel_ratio": True, "S": s, "target": 0.97}
    for m in ("fwd", "fwdbwd"):
        a = max((r for r in rt if r["S"] == s), key=lambda r: r[m + "_tflops"])
        b = max((r for r in pt if r["S"] == s), key=lambda r: r[m + "_tflops"])
        res[m] = a[m + "_tflops"] / b[m + "_tflops"]
        res[m + "_runtime"] = [a["backend"], a[m + "_tflops"]]
        res[m + "_pytorch"] = [b["backend"], b[m + "_tflops"]]
    print(json.dumps(res))
PYEOF
fi
rm -rf "$TMP"
sec done
