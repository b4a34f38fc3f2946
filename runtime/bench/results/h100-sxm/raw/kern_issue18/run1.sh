#!/usr/bin/env bash
# kern (issue 18), device call 1: GPU check of the new build, then the 2D in-process bench of
# main's build (base) and the new build on the same machine.
set -uo pipefail
BIN=carry/kern/new/mmsp-runtime
source runtime/bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
sec check
timeout 120 carry/kern/new/mmsp-runtime check 2>&1 | tee $OUT/check_new.jsonl
sec base
timeout 240 carry/kern/base/mmsp-runtime bench --what 2d --seqs-2d ${SEQS:-32768,131072} --ranks 8 --streams per-rank 2>&1 | tee $OUT/2d_base.jsonl
sec new
timeout 300 carry/kern/new/mmsp-runtime bench --what 2d --seqs-2d ${SEQS:-32768,131072} --ranks 8 --streams ${NEWSTREAMS:-per-rank,per-rank-events,one} 2>&1 | tee $OUT/2d_new.jsonl
sec done
for f in base new; do
  python3 - $OUT/2d_$f.jsonl $f <<'PY'
import json,sys
for l in open(sys.argv[1]):
    try: j=json.loads(l)
    except Exception: continue
    if j.get("bench")=="2d_inprocess_one_gpu" and "error" not in j:
        print(sys.argv[2], j["S"], f'{j["ulysses"]}x{j["ring"]}', j["streams"], "fwdbwd_ms %.2f"%j["fwdbwd_ms"], "vs_kernel %.3f"%j["fwdbwd_vs_single_kernel"], "bound %.3f"%j["blocks_only_fwdbwd_vs_single_kernel"], "fwd_vs_kernel %.3f"%j["fwd_vs_single_kernel"])
    elif "error" in j: print(sys.argv[2], j)
PY
done
