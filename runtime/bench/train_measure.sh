#!/usr/bin/env bash
# Measures training steps of llama3-8b-shaped layers (2 layers, stated) on one GPU against the
# planner's predictions. Plans are made here with:
#   mmsp plan --topology runtime/bench/h100-1gpu.toml --gpus 1 \
#     --model runtime/bench/llama3-8b-2layer.json --context C --recompute none --global-batch 1 --format json
# and carried in carry/ with the binary. Run there: bash runtime/bench/train_measure.sh
set -uo pipefail
BIN=${BIN:-carry/mmsp-runtime}
PY=${TORCH_PY:-/opt/torch/.venv/bin/python3}
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p /tmp/mmsp-nccl && ln -sf "$SP/nvidia/nccl/lib/libnccl.so.2" /tmp/mmsp-nccl/libnccl.so
LD_LIBRARY_PATH=/tmp/mmsp-nccl:$SP/torch/lib:$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH RUST_BACKTRACE=0
OUTDIR=${OUT:-/tmp}
for c in ${CONTEXTS:-8K 16K 32K max}; do
  echo "== context $c"
  timeout 240 $BIN run carry/plan_$c.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps ${STEPS:-5} --out "$OUTDIR/run_$c.json"
  echo "exit=$?"
done
