#!/usr/bin/env bash
# Measures the planner's kernel calibration on the GPU machine with the runtime's own kernels
# (bf16 GEMM curves, cuDNN attention through mmsp_runtime::kernel, HBM bandwidth), for the
# default llama3-8b shapes and for the 2-layer bench model's exact shapes. Binary carried in
# carry/mmsp-runtime; run there from the repository root:
#   bash runtime/bench/calibrate.sh      (about a minute per calibration on an H100)
# The calibration JSONs land in $OUT; plan with them here:
#   mmsp plan --calibration h100-sxm.json --topology runtime/bench/h100-1gpu.toml --gpus 1 ...
set -uo pipefail
# shellcheck source=runtime/bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
OUTDIR=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== calibrate (llama3-8b shapes)"
time timeout 300 $BIN calibrate --out "$OUTDIR/h100-sxm.json"
echo "exit=$?"
echo "== calibrate (runtime/bench/llama3-8b-2layer.json shapes)"
time timeout 300 $BIN calibrate --model runtime/bench/llama3-8b-2layer.json --out "$OUTDIR/h100-sxm-2layer.json"
echo "exit=$?"
