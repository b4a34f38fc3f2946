#!/usr/bin/env bash
# 4 x H100, after this session's runtime changes (expandable allocator segments, the contiguous
# encoder stream, per-sample packed attention): NCCL training at 128K for three layouts and
# ZeRO-3 with a kernel profile of the last step, the VLM plan over NCCL (per-sample ranges),
# two --deterministic NCCL runs compared bit for bit, and the one-GPU configurations on GPU 0.
# Plans: runtime/bench/plan4_*.json and plan_*.json (their headers' commands); carry
# carry/mmsp-runtime-rel (release build).
set -uo pipefail
source runtime/bench/device_env.sh
BIN=carry/mmsp-runtime-rel
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
N=4; PORT=29900
launch() { local PIDS=(); PORT=$((PORT + 1))
  for RK in 0 1 2 3; do RANK=$RK WORLD_SIZE=$N LOCAL_RANK=$RK MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT timeout 200 $BIN "$@" & PIDS+=($!); done
  for p in "${PIDS[@]}"; do wait "$p" || echo "{\"rank_pid\": $p, \"failed\": \"$1\"}"; done; }
summ() { $PY - "$@" <<'PY'
import json,sys
for f in sys.argv[1:]:
    try: r=json.load(open(f))
    except Exception as e: print(json.dumps({"file":f,"error":str(e)})); continue
    k=r.get("kernel_profile"); v=r.get("vision") or {}
    o={"file":f.split('/')[-1],"ctx":r["context_tokens"],"launch":r["launch"],"layout":r["layout"],"zero":r["zero_stage"],"step_s":r["micro_step_s"],"mfu":r["mfu"],
       "dev_peak_GiB":(r.get("peak_device_memory_used_bytes") or 0)/2**30,"alloc_peak_GiB":(r.get("peak_allocated_bytes_rank0") or 0)/2**30,
       "reserved_peak_GiB":(r.get("peak_reserved_bytes_rank0") or 0)/2**30,"losses":r["losses"],"phases":r.get("phases_rank0"),"comm_s":r.get("communication_s_rank0"),"alloc_conf":r.get("allocator_conf")}
    if k and "span_s" in k:
        o["kp"]={"span":k["span_s"],"busy":k["busy_s"],"idle":k["idle_s"],"class_s":{c:round(x["s"],5) for c,x in k["class_s"].items()}}
    if v: o["vision"]={kk:v.get(kk) for kk in ("encode_s","encoder_fwd_s","encoder_bwd_s","reshard_s","plan_ranges_match","stage2","measured","predicted") if kk in v}
    print(json.dumps(o)[:2500])
PY
}
M=/tmp/g; mkdir -p $M
for P in 1x4 2x2 4x1 2x2_z3; do
  sec "train NCCL $P 128K"
  MMSP_PROFILE=0 launch run carry/plan4_$P.json --model carry/llama3-8b-2layer.json --steps 4 --quiet --kernel-trace $M/kt4_$P.json --out $M/train4_$P.json 2>&1 | grep -v '^{"attention\|train_kernels' | tail -3 | cut -c1-300
  summ $M/train4_$P.json
done
sec "VLM NCCL 2x2"
launch run carry/plan4_vlm.json --model carry/llama3-8b-2layer.json --vision-config carry/siglip_so400m_config.json --steps 4 --quiet --out $M/vlm.json 2>&1 | grep -v '^{"attention\|train_kernels' | tail -3 | cut -c1-300
$PY -c "import json;r=json.load(open('$M/vlm.json'));print(json.dumps({'vlm':True,'micro_step_s':r['micro_step_s'],'losses':r['losses'],'vision':r.get('vision')})[:3000])"
sec "deterministic NCCL 2x2 32K x2"
for k in 1 2; do launch run carry/plan4_2x2_32K.json --model carry/llama3-8b-2layer.json --steps 3 --quiet --deterministic --out $M/det4_$k.json 2>&1 | grep -v '^{"attention\|train_kernels' | tail -2 | cut -c1-300; done
$PY -c "import json;a,b=[json.load(open('$M/det4_%d.json'%k)) for k in (1,2)];print(json.dumps({'det_nccl':True,'losses_1':a['losses'],'losses_2':b['losses'],'bitwise_equal':a['losses']==b['losses'],'step_s':[a['micro_step_s'],b['micro_step_s']]}))"
sec "one GPU (GPU 0)"
for c in 8K 16K 32K 64K 112K 128K; do
  CUDA_VISIBLE_DEVICES=0 MMSP_PROFILE=0 MMSP_SKIP_MEMORY_CHECK=1 timeout 150 $BIN run carry/plan_$c.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps 4 --quiet --kernel-trace $M/kt1_$c.json --out $M/train1_$c.json >/dev/null 2>$M/err.txt || tail -2 $M/err.txt | cut -c1-300
  summ $M/train1_$c.json
done
cp $M/train4_2x2.json $M/train4_2x2_z3.json $M/vlm.json $M/train1_32K.json $OUT/ 2>/dev/null
gzip -c $M/kt4_2x2.json.rank0 > $OUT/kt4_2x2_rank0.json.gz 2>/dev/null
sec done
