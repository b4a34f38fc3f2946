#!/usr/bin/env bash
# One H200 (issue 13): the H200's own calibration (calibrate --model), the caching
# allocator's timeline of a ZeRO-0 step without recompute at 16K-128K (MMSP_MEM_TRACE=1: the
# activation bytes per token per layer), and training runs of the 2-layer llama3-8b shape for
# ZeRO-0/1/2/3 x recompute none/full at 32K and 128K tokens (one rank), plus ZeRO-1/2/3
# without recompute at 128K over 4 in-process ranks (2x2) sharing the GPU. Plans are made here:
#   mmsp plan --topology runtime/bench/h200-1gpu.toml --gpus 1 --model runtime/bench/llama3-8b-2layer.json \
#     --context C --layout 1x1 --zero Z --recompute R --global-batch 1 --format json > carry/p1_C_zZ_R.json
#   (4 ranks: --topology runtime/bench/h200-4gpu.toml --gpus 4 --layout 2x2 > carry/p4_128K_zZ_none.json)
# and carried with carry/mmsp-runtime-rel. Every run's report goes into $OUT/runI.tgz (one
# file: the device tool brings back only a few). SKIP_CALIBRATE=1 skips the calibration.
set -uo pipefail
source runtime/bench/device_env.sh
DEST=$OUT; OUT=/tmp/runI; mkdir -p $OUT
trap 'tar czf $DEST/runI.tgz -C /tmp runI' EXIT
B=carry/mmsp-runtime-rel
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
sec calibrate
[ "${SKIP_CALIBRATE:-0}" = 1 ] || timeout 200 $B calibrate --model carry/llama3-8b-2layer.json --out $OUT/h200-sxm-2layer.json 2>&1 | tail -2
sec "memory timeline"
for c in 16K 32K 64K 96K 128K; do
  MMSP_MEM_TRACE=1 timeout 100 $B run carry/p1_${c}_z0_none.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps 2 --quiet --out $OUT/mt_$c.json 2>/tmp/mt_$c.err >/dev/null; echo "exit=$?"
  n=$(grep -c mem_trace /tmp/mt_$c.err); h=$((n/2))
  grep mem_trace /tmp/mt_$c.err | tail -$h | awk -v c=$c '{printf "%s %s %.3f %.3f\n", c, $3, $5/2^30, $7/2^30}' > $OUT/timeline_$c.txt
  head -3 $OUT/timeline_$c.txt
done
sec "one rank"
for c in 32K 128K; do for z in 0 3 1 2; do for r in none full; do
  timeout 100 $B run carry/p1_${c}_z${z}_${r}.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps 4 --quiet --out $OUT/r1_${c}_z${z}_${r}.json >/dev/null 2>$OUT/r1_${c}_z${z}_${r}.err; echo "$c z$z $r exit=$?"
done; done; done
sec "four in-process ranks"
for z in 1 2 3; do
  MMSP_SKIP_MEMORY_CHECK=1 timeout 120 $B run carry/p4_128K_z${z}_none.json --model carry/llama3-8b-2layer.json --inprocess 4 --steps 3 --quiet --out $OUT/r4_128K_z${z}_none.json >/dev/null 2>$OUT/r4_128K_z${z}_none.err; echo "4r z$z exit=$?"
done
sec done
