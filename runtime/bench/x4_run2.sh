#!/usr/bin/env bash
# 4 x H100: NCCL 2D attention (every factorisation, 32K and 128K), NCCL training at 128K for
# three layouts, faults, NCCL inference, and max tokens on one GPU.
set -uo pipefail
source runtime/bench/device_env.sh
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
sec "nccl attention"
timeout 240 bash runtime/bench/device.sh nccl 2>&1 | grep -v '"nccl_check":true' | cut -c1-700
N=4; PORT=29800
launch() { local PIDS=(); PORT=$((PORT + 1))
  for RK in 0 1 2 3; do RANK=$RK WORLD_SIZE=$N LOCAL_RANK=$RK MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT timeout 200 $BIN "$@" & PIDS+=($!); done
  for p in "${PIDS[@]}"; do wait "$p" || echo "{\"rank_pid\": $p, \"failed\": \"$1\"}"; done; }
for L in 1x4 2x2 4x1; do
  sec "train NCCL $L 128K"
  launch run carry/plan4_$L.json --model carry/llama3-8b-2layer.json --steps 4 --out /tmp/train4_$L.json --trace /tmp/trace4_$L.json 2>&1 | grep -v '^  step\|^step\|rank [123]' | tail -8 | cut -c1-400
done
$PY - <<'PY'
import json
for L in ("1x4","2x2","4x1"):
    try: r=json.load(open(f"/tmp/train4_{L}.json"))
    except Exception as e: print(json.dumps({"layout":L,"error":str(e)})); continue
    p=r.get("predicted",{})
    print(json.dumps({"train4":L,"micro_step_s":r.get("micro_step_s"),"mfu":r.get("mfu"),"pred_s":p.get("micro_step_s"),"err_pct":p.get("error_pct"),"peak_mem":r.get("peak_device_memory_used_bytes"),"pred_mem":p.get("memory_per_gpu_bytes"),"losses":r.get("losses"),"phases":r.get("phases_rank0"),"comm_s":r.get("communication_s_rank0")}))
PY
cp /tmp/trace4_2x2.json $OUT/ 2>/dev/null
sec "faults"
timeout 300 bash runtime/bench/faults.sh 2>&1 | grep '^{' | cut -c1-600
sec "infer nccl"
timeout 200 bash runtime/bench/infer_nccl.sh 2>&1 | grep -i 'summary\|error\|fail' | cut -c1-700
sec "max tokens one GPU"
for c in 64K 96K 112K; do
  MMSP_SKIP_MEMORY_CHECK=1 timeout 120 $BIN run carry/plan_$c.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps 2 --out /tmp/max_$c.json 2>&1 | grep -i 'error\|memory per GPU' | cut -c1-300
  $PY -c "import json,sys
try:
  r=json.load(open('/tmp/max_$c.json')); print(json.dumps({'max_tokens':'$c','ok':True,'peak':r.get('peak_device_memory_used_bytes'),'pred':r['predicted']['memory_per_gpu_bytes'],'step_s':r.get('micro_step_s'),'pred_s':r['predicted']['micro_step_s']}))
except Exception as e: print(json.dumps({'max_tokens':'$c','ok':False}))"
done
sec done
