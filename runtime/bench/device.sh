#!/usr/bin/env bash
# Runs the GPU checks and benchmarks of mmsp-runtime on the device machine, from the
# repository root, with the binary carried in carry/mmsp-runtime. Prints JSON lines, with a
# "== section (time)" line before each part.
# Usage there: bash runtime/bench/device.sh [checks] [kernels] [pytorch] [2d] [nccl]
# (default: checks kernels pytorch 2d; nccl needs a machine with several GPUs to mean much)
set -uo pipefail
# shellcheck source=runtime/bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
PARTS=${*:-checks kernels pytorch 2d}
T0=$(date +%s)
sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for part in $PARTS; do
  case $part in
  checks)
    sec "check: 2D attention in bf16 on the GPU vs float64"; $BIN check
    sec "bf16 error vs ring size (cuDNN)"; $BIN bf16-error --backend cudnn --seq 8192
    sec "nccl world of 1"
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 $BIN nccl-check --plan runtime/bench/plan_w1.json
    sec "plan for 2 ranks, launch of 1 (must fail at once)"
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 timeout 60 $BIN nccl-check --plan runtime/bench/plan_w2.json; echo "exit=$?";;
  kernels) sec "runtime kernels"; $BIN bench --what kernels;;
  pytorch) sec "pytorch attn_bench.py"; PYTHONUNBUFFERED=1 $PY runtime/bench/attn_bench.py;;
  2d) sec "2D in-process ranks on one GPU"; $BIN bench --what 2d ${BENCH_2D_ARGS:-};;
  nccl)
    # One process per GPU, torchrun-style environment, every (ulysses, ring) factorisation.
    N=$(nvidia-smi -L | wc -l); PORT=29600
    for U in $(seq 1 "$N"); do
      [ $((N % U)) -eq 0 ] || continue
      R=$((N / U))
      sec "NCCL 2D over $N GPUs: ulysses $U x ring $R"
      P=/tmp/mmsp-plan-$U-$R.json
      echo "{\"world_size\": $N, \"layout\": {\"ulysses\": $U, \"ring\": $R, \"dp\": 1, \"tp\": 1, \"placement\": \"ulysses_inner\"}}" > "$P"
      for SUB in nccl-check nccl-bench; do
        PIDS=(); PORT=$((PORT + 1))
        for RK in $(seq 0 $((N - 1))); do
          RANK=$RK WORLD_SIZE=$N LOCAL_RANK=$RK MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
            timeout 300 $BIN $SUB --plan "$P" & PIDS+=($!)
        done
        for p in "${PIDS[@]}"; do wait "$p" || echo "{\"rank_pid\": $p, \"failed\": \"$SUB\"}"; done
      done
    done;;
  esac
done
sec done
