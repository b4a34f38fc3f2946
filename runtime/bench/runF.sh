#!/usr/bin/env bash
# One H100: a calibration with the model's output head and the layout-copy bandwidths
# (calibrate --model), and the caching allocator's timeline of a training step
# (MMSP_MEM_TRACE=1: bytes in tensors at every phase lap, lines of runtime/src/train/mod.rs)
# at 16K, 32K and 64K tokens. Carry carry/mmsp-runtime-rel (release build).
set -uo pipefail
source runtime/bench/device_env.sh
B=carry/mmsp-runtime-rel
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
sec calibrate
timeout 400 $B calibrate --model carry/llama3-8b-2layer.json --out $OUT/h100-sxm-2layer-v2.json 2>&1 | tail -2
sec "memory timeline"
for c in 16K 32K 64K; do
  MMSP_MEM_TRACE=1 MMSP_SKIP_MEMORY_CHECK=1 timeout 150 $B run carry/plan_$c.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps 2 --quiet --out /tmp/mt_$c.json 2>/tmp/mt_$c.err >/dev/null; echo "exit=$?"
  # the second step's laps only
  n=$(grep -c mem_trace /tmp/mt_$c.err); h=$((n/2))
  echo "{\"ctx\":\"$c\",\"laps\":$h}"; grep mem_trace /tmp/mt_$c.err | tail -$h | awk -v c=$c '{printf "%s %s %.3f %.3f\n", c, $3, $5/2^30, $7/2^30}'
done
sec done
