#!/usr/bin/env bash
# On a 4-GPU machine: NCCL 2D attention at 128K and 32K for every factorisation, and NCCL
# training steps of the 2-layer llama3-8b shape at 128K for three layouts (plans made with
# `mmsp plan --topology runtime/bench/h100-4gpu.toml --gpus 4 --model runtime/bench/llama3-8b-2layer.json
#  --context 128K --recompute none --global-batch 1 --layout UxR --zero 1 --format json`).
# Run there: bash runtime/bench/x4_base.sh (binary in carry/mmsp-runtime; results in $OUT).
set -uo pipefail
BIN=${BIN:-carry/mmsp-runtime}
source runtime/bench/device_env.sh
export BIN
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; nvidia-smi topo -m | head -6
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
N=4; PORT=29700
launch() { # launch SUB ARGS... on N ranks
  local PIDS=(); PORT=$((PORT + 1))
  for RK in 0 1 2 3; do
    RANK=$RK WORLD_SIZE=$N LOCAL_RANK=$RK MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT timeout 200 $BIN "$@" & PIDS+=($!)
  done
  for p in "${PIDS[@]}"; do wait "$p" || echo "{\"rank_pid\": $p, \"failed\": \"$1\"}"; done
}
for L in 1x4 2x2 4x1; do
  U=${L%x*}; R=${L#*x}
  P=/tmp/p-$L.json
  echo "{\"world_size\": 4, \"layout\": {\"ulysses\": $U, \"ring\": $R, \"dp\": 1, \"tp\": 1, \"placement\": \"ulysses_inner\"}}" > $P
  sec "nccl-check $L"; launch nccl-check --plan $P 2>&1 | grep -o '"attn2d_rel_err_out":[0-9.e-]*\|"nccl_check":[a-z]*\|failed.*' | sort | uniq -c
  sec "nccl-bench $L"; launch nccl-bench --plan $P --seq 131072
  sec "nccl-bench $L 32K"; launch nccl-bench --plan $P --seq 32768
done
for L in 1x4 2x2 4x1; do
  sec "train NCCL $L 128K"; launch run runtime/bench/plan4_$L.json --model runtime/bench/llama3-8b-2layer.json --steps 4 --out $OUT/train4_$L.json 2>&1 | tail -3 | cut -c1-1500
done
sec done
