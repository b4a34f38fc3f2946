#!/usr/bin/env bash
# Runs every GPU check and benchmark of mmsp-runtime in one go on the device machine, from the
# repository root, with the binary carried in carry/mmsp-runtime. Prints JSON lines.
# Usage there: bash runtime/bench/device.sh [BIN]
set -uo pipefail
BIN=${1:-carry/mmsp-runtime}
PY=${TORCH_PY:-/opt/torch/.venv/bin/python3}
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p /tmp/mmsp-nccl && ln -sf "$SP/nvidia/nccl/lib/libnccl.so.2" /tmp/mmsp-nccl/libnccl.so
LD_LIBRARY_PATH=/tmp/mmsp-nccl:$SP/torch/lib:$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== check"; $BIN check
echo "== bf16 error vs ring size (cuDNN)"; $BIN bf16-error --backend cudnn --seq 8192
echo "== nccl world of 1"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 $BIN nccl-check --plan runtime/bench/plan_w1.json
echo "== plan for 2 ranks, launch of 1 (must fail at once)"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 timeout 60 $BIN nccl-check --plan runtime/bench/plan_w2.json; echo "exit=$?"
echo "== runtime bench"; $BIN bench ${BENCH_ARGS:-}
echo "== pytorch"; PYTHONUNBUFFERED=1 $PY runtime/bench/attn_bench.py
