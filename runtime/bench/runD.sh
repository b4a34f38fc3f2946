#!/usr/bin/env bash
# One H100: release build without phase syncs vs the debug build with them, 8K/16K/32K.
set -uo pipefail
source runtime/bench/device_env.sh
for c in 8K 16K 32K; do
  for v in "rel:0" "rel:1"; do
    b=${v%:*}; prof=${v#*:}
    B=carry/mmsp-runtime; [ $b = rel ] && B=carry/mmsp-runtime-rel
    MMSP_PROFILE=$prof timeout 120 $B run carry/plan_$c.json --model carry/llama3-8b-2layer.json --inprocess 1 --steps 6 --out /tmp/r.json >/dev/null 2>&1
    $PY -c "import json;r=json.load(open('/tmp/r.json'));p=r['predicted'];print(json.dumps({'ctx':'$c','build':'$b','profile':$prof,'micro_step_s':r['micro_step_s'],'pred_s':p['micro_step_s'],'err_pct':p['error_pct']['micro_step_s'],'mfu':r['mfu'],'losses':r['losses'][-2:]}))"
  done
done
