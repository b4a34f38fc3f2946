#!/usr/bin/env bash
# One H100: training steps after the speed-ups, A/B of the optimizer/norm, max tokens per GPU,
# checkpoint/resume bit-exactness on the GPU, self-launched NCCL world of 1.
set -uo pipefail
source runtime/bench/device_env.sh
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
M=/tmp/m; mkdir -p $M
sec "train 8K 16K 32K"
OUT=$M CONTEXTS="8K 16K 32K" STEPS=5 bash runtime/bench/train_measure.sh 2>&1 | grep -v '^  step\|^step' | tail -40
sec "A/B 32K: MMSP_ADAMW=plain MMSP_FUSED_NORM=0"
MMSP_ADAMW=plain MMSP_FUSED_NORM=0 timeout 200 $BIN run carry/plan_32K.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps 5 --out $M/run_32K_plain.json 2>&1 | tail -2 | cut -c1-300
for c in 128K max 160K 176K; do
  sec "max tokens: $c"
  MMSP_SKIP_MEMORY_CHECK=1 timeout 200 $BIN run carry/plan_$c.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps 2 --out $M/run_$c.json 2>&1 | tail -1 | cut -c1-300
  echo "exit=${PIPESTATUS[0]}"
done
sec "checkpoint bit-exact on GPU (8K)"
C=/tmp/ck; rm -rf $C
R="$BIN run carry/plan_8K.json --model carry/llama3-8b-2layer.json --inprocess 1"
$R --steps 4 --save $C/straight --out $C/a.json >/dev/null 2>&1; echo "straight exit=$?"
$R --steps 2 --save $C/half --out $C/b.json >/dev/null 2>&1; echo "half exit=$?"
$R --steps 2 --resume $C/half --save $C/resumed --out $C/c.json >/dev/null 2>&1; echo "resumed exit=$?"
$PY - $C <<'PY'
import json,sys,os,hashlib
d=sys.argv[1]
a=json.load(open(f"{d}/a.json"))["losses"]; c=json.load(open(f"{d}/c.json"))["losses"]
def h(p): return {f: hashlib.sha256(open(os.path.join(p,f),'rb').read()).hexdigest() for f in sorted(os.listdir(p)) if f.endswith('.safetensors')}
hs, hr = h(f"{d}/straight"), h(f"{d}/resumed")
print(json.dumps({"checkpoint_gpu": True, "losses_straight_3_4": a[2:], "losses_resumed": c, "losses_equal": a[2:]==c, "state_files_equal": hs==hr, "files": len(hs)}))
PY
sec "self-launched NCCL world of 1 + trace"
timeout 200 $BIN run carry/plan_8K.json --model carry/llama3-8b-2layer.json --steps 3 --out $M/run_8K_nccl1.json --trace $M/trace_8K_nccl1.json 2>&1 | tail -3 | cut -c1-300
sec summary
$PY - $M <<'PY'
import json,sys,glob,os
for f in sorted(glob.glob(sys.argv[1]+"/run_*.json")):
    r=json.load(open(f)); p=r.get("predicted",{})
    keep={k:r.get(k) for k in ("context_tokens","micro_step_s","mfu","tokens_per_s_per_gpu","peak_device_memory_used_bytes","device_memory_used_bytes","phases_s_rank0","launch","losses")}
    keep["predicted"]={k:p.get(k) for k in ("micro_step_s","memory_per_gpu_bytes","error_pct")}
    print(json.dumps({"run":os.path.basename(f), **keep}))
PY
cp $M/run_32K.json $M/trace_32K.json $M/trace_8K_nccl1.json $OUT/ 2>/dev/null
sec done
