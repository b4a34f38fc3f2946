#!/usr/bin/env bash
# One H100: where the step time goes (Kineto kernel profile of one step at 8K/16K/32K), the
# caching allocator's peaks against the planner's memory (default allocator and
# expandable_segments), and deterministic mode (two straight runs and checkpoint/resume
# compared bitwise). Plans: runtime/bench/plan_*.json (see train_measure.sh for how they are
# made); carry carry/mmsp-runtime-rel (release build of mmsp-runtime).
set -uo pipefail
source runtime/bench/device_env.sh
B=carry/mmsp-runtime-rel
MOD="--model carry/llama3-8b-2layer.json --inprocess 1"
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
M=/tmp/m; mkdir -p $M
summ() { $PY - "$@" <<'PY'
import json,sys
for f in sys.argv[1:]:
    try: r=json.load(open(f))
    except Exception as e: print(json.dumps({"file":f,"error":str(e)})); continue
    p=r.get("predicted",{}); k=r.get("kernel_profile")
    o={"file":f.split('/')[-1],"ctx":r["context_tokens"],"step_s":r["micro_step_s"],"pred_s":p.get("micro_step_s"),
       "err_pct":p.get("error_pct",{}).get("micro_step_s"),"mfu":r["mfu"],
       "dev_peak_GiB":(r.get("peak_device_memory_used_bytes") or 0)/2**30,
       "alloc_peak_GiB":(r.get("peak_allocated_bytes_rank0") or 0)/2**30,
       "reserved_peak_GiB":(r.get("peak_reserved_bytes_rank0") or 0)/2**30,
       "pred_mem_GiB":(p.get("memory_per_gpu_bytes") or 0)/2**30,"losses":r["losses"],"det":r.get("deterministic")}
    if k:
        o["kp"]={"span":k["span_s"],"busy":k["busy_s"],"idle":k["idle_s"],"class_s":{c:round(v["s"],5) for c,v in k["class_s"].items()},
                 "class_n":{c:v["count"] for c,v in k["class_s"].items()}}
        o["top"]=[(t["name"][:70],round(t["s"],5),t["count"]) for t in k["top_kernels"][:16]]
    print(json.dumps(o))
PY
}
sec "kernel profiles"
for c in 8K 16K 32K; do
  MMSP_PROFILE=0 timeout 150 $B run carry/plan_$c.json $MOD --steps 4 --quiet --kernel-trace $M/kt_$c.json --out $M/run_$c.json >/dev/null 2>$M/err_$c.txt || tail -3 $M/err_$c.txt
  summ $M/run_$c.json
done
sec "memory: default allocator vs expandable segments"
for v in "64K:0" "112K:0" "112K:1" "128K:1" "max:1"; do
  c=${v%:*}; e=${v#*:}
  if [ $e = 1 ]; then export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; else unset PYTORCH_CUDA_ALLOC_CONF; fi
  MMSP_PROFILE=0 MMSP_SKIP_MEMORY_CHECK=1 timeout 150 $B run carry/plan_$c.json $MOD --steps 3 --quiet --out $M/mem_${c}_$e.json >/dev/null 2>$M/err.txt; rc=$?
  echo "{\"mem\":\"$c\",\"expandable\":$e,\"exit\":$rc}"; [ $rc = 0 ] && summ $M/mem_${c}_$e.json || tail -2 $M/err.txt | cut -c1-300
done
unset PYTORCH_CUDA_ALLOC_CONF
sec "deterministic"
R="$B run carry/plan_8K.json $MOD --quiet"
for v in "cudnn:" "cudnn:--deterministic" "flash:--deterministic"; do
  be=${v%:*}; d=${v#*:}
  for k in 1 2; do
    timeout 150 $R --steps 3 --attn-backend $be $d --out $M/det_${be}_${d:+d}_$k.json >/dev/null 2>$M/err.txt || tail -2 $M/err.txt | cut -c1-300
  done
  $PY - $M/det_${be}_${d:+d}_1.json $M/det_${be}_${d:+d}_2.json <<PY
import json,sys
a,b=[json.load(open(f)) for f in sys.argv[1:]]
print(json.dumps({"backend":"$be","flags":"$d","losses_1":a["losses"],"losses_2":b["losses"],"bitwise_equal":a["losses"]==b["losses"],"step_s":[a["micro_step_s"],b["micro_step_s"]]}))
PY
done
sec "deterministic checkpoint/resume (flash)"
C=/tmp/ck; rm -rf $C
DR="$R --deterministic --attn-backend flash"
$DR --steps 4 --save $C/straight --out $C/a.json >/dev/null 2>&1; echo "straight exit=$?"
$DR --steps 2 --save $C/half --out $C/b.json >/dev/null 2>&1; echo "half exit=$?"
$DR --steps 2 --resume $C/half --save $C/resumed --out $C/c.json >/dev/null 2>&1; echo "resumed exit=$?"
$PY - $C <<'PY'
import json,sys,os,hashlib
d=sys.argv[1]
a=json.load(open(f"{d}/a.json"))["losses"]; c=json.load(open(f"{d}/c.json"))["losses"]
def h(p): return {f: hashlib.sha256(open(os.path.join(p,f),'rb').read()).hexdigest() for f in sorted(os.listdir(p)) if f.endswith('.safetensors')}
hs, hr = h(f"{d}/straight"), h(f"{d}/resumed")
print(json.dumps({"checkpoint_gpu_deterministic": True, "losses_straight_3_4": a[2:], "losses_resumed": c, "losses_equal": a[2:]==c, "state_files_equal": hs==hr, "files": len(hs)}))
PY
cp $M/kt_32K.json.summary.json $M/run_32K.json $M/run_16K.json $M/run_8K.json $OUT/ 2>/dev/null
gzip -c $M/kt_32K.json > $OUT/kt_32K.json.gz 2>/dev/null
sec done
