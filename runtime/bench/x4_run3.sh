#!/usr/bin/env bash
# 4 x H100: faults after the reaper fix, ZeRO-3 over NCCL, the vision stage over NCCL.
set -uo pipefail
source runtime/bench/device_env.sh
T0=$(date +%s); sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
N=4; PORT=29900
launch() { local PIDS=(); PORT=$((PORT + 1))
  for RK in 0 1 2 3; do RANK=$RK WORLD_SIZE=$N LOCAL_RANK=$RK MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT timeout 150 $BIN "$@" & PIDS+=($!); done
  for p in "${PIDS[@]}"; do wait "$p" || echo "{\"rank_pid\": $p, \"failed\": \"$1\"}"; done; }
sec "ZeRO-3 NCCL 2x2 128K"
launch run carry/plan4_2x2_z3.json --model carry/llama3-8b-2layer.json --steps 4 --out /tmp/z3.json 2>&1 | grep -v '^  step\|^step\|^{"attention' | tail -6 | cut -c1-300
$PY -c "import json;r=json.load(open('/tmp/z3.json'));p=r['predicted'];print(json.dumps({'zero3':True,'micro_step_s':r['micro_step_s'],'pred_s':p['micro_step_s'],'mfu':r['mfu'],'peak':r.get('peak_device_memory_used_bytes'),'pred_mem':p['memory_per_gpu_bytes'],'losses':r['losses'],'phases':r.get('phases_rank0')}))"
sec "VLM NCCL 2x2 (2-layer llama3-8b shape + SigLIP-so400m, 64 frames)"
launch run carry/plan4_vlm.json --model carry/llama3-8b-2layer.json --vision-config carry/siglip_so400m_config.json --steps 4 --out /tmp/vlm.json 2>&1 | grep -v '^  step\|^step\|^{"attention' | tail -8 | cut -c1-300
$PY -c "import json;r=json.load(open('/tmp/vlm.json'));print(json.dumps({'vlm':True,'micro_step_s':r['micro_step_s'],'losses':r['losses'],'vision':r.get('vision')})[:1500])"
sec "faults"
timeout 280 bash runtime/bench/faults.sh 2>&1 | grep '^{' | cut -c1-600
sec done
