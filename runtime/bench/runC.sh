#!/usr/bin/env bash
# One H100: sustained-clock calibration (long batches after a preheat) with the GPU's SM clock
# and power logged, then the 8K/16K/32K training steps, to compare clocks in both.
set -uo pipefail
source runtime/bench/device_env.sh
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 500 > $OUT/clocks.csv &
SMI=$!
echo "calibrate_start $(date +%s.%N)"
timeout 330 $BIN calibrate --model carry/llama3-8b-2layer.json --out $OUT/h100-sxm-2layer-sustained.json --batch-ms 100 --preheat-s 10; echo "exit=$?"
echo "calibrate_end $(date +%s.%N)"
M=/tmp/m; mkdir -p $M
echo "train_start $(date +%s.%N)"
OUT=$M CONTEXTS="8K 16K 32K" STEPS=5 bash runtime/bench/train_measure.sh 2>&1 | grep 'measured vs\|tokens/s/GPU\|exit='
echo "train_end $(date +%s.%N)"
kill $SMI
$PY - $M <<'PY'
import json,sys
for c in ("8K","16K","32K"):
    r=json.load(open(f"{sys.argv[1]}/run_{c}.json"))
    print(json.dumps({"run":c,"micro_step_s":r["micro_step_s"],"mfu":r["mfu"],"phases":r.get("phases_rank0"),"losses":r["losses"]}))
PY
