#!/usr/bin/env bash
# 4 x H100: NCCL collectives for the planner's calibration (calibrate-comm into a copy of the
# runtime-measured calibration) and the VLM plan under ZeRO-3 over NCCL (2x2). Plans:
# runtime/bench/plan4_2x2_32K.json (world size only) and plan4_vlm_z3.json, made with
#   mmsp plan --topology runtime/bench/h100-4gpu.toml --gpus 4 --model runtime/bench/llama3-8b-2layer.json
#     --samples runtime/bench/vlm_samples.jsonl --global-batch 1 --layout 2x2 --zero 3 --format json
# Carry carry/mmsp-runtime-rel, carry/h100-sxm-2layer-v2.json and the plans.
set -uo pipefail
source runtime/bench/device_env.sh
BIN=carry/mmsp-runtime-rel
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
N=4; PORT=29950
launch() { local PIDS=(); PORT=$((PORT + 1))
  for RK in 0 1 2 3; do RANK=$RK WORLD_SIZE=$N LOCAL_RANK=$RK MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT timeout 200 $BIN "$@" & PIDS+=($!); done
  for p in "${PIDS[@]}"; do wait "$p" || echo "{\"rank_pid\": $p, \"failed\": \"$1\"}"; done; }
sec "calibrate-comm"
cp carry/h100-sxm-2layer-v2.json /tmp/cal.json
launch calibrate-comm --plan carry/plan4_2x2_32K.json --into /tmp/cal.json 2>&1 | grep -v '^$' | tail -20 | cut -c1-300
cp /tmp/cal.json $OUT/h100-sxm-2layer-v3-nccl4.json
sec "VLM ZeRO-3 NCCL 2x2"
launch run carry/plan4_vlm_z3.json --model carry/llama3-8b-2layer.json --vision-config carry/siglip_so400m_config.json --steps 4 --quiet --out /tmp/vlm_z3.json 2>&1 | grep -v '^{"attention\|train_kernels' | tail -3 | cut -c1-300
$PY -c "import json;r=json.load(open('/tmp/vlm_z3.json'));print(json.dumps({'vlm_z3':True,'zero':r['zero_stage'],'micro_step_s':r['micro_step_s'],'losses':r['losses'],'dev_peak_GiB':(r.get('peak_device_memory_used_bytes') or 0)/2**30,'alloc_peak_GiB':(r.get('peak_allocated_bytes_rank0') or 0)/2**30,'pred':r.get('predicted'),'vision':{k:r['vision'].get(k) for k in ('measured_slowest_rank','stage2','predicted')}})[:3000])"
cp /tmp/vlm_z3.json $OUT/
sec done
