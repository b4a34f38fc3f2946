#!/usr/bin/env bash
# kern (issue 18), device call 3: repeats for the noise: needle decode base/new alternating,
# then the 2D bench at 32K for base and new.
set -uo pipefail
export MMSP=carry/kern/mmsp
BIN=carry/kern/new/mmsp-runtime
source runtime/bench/common.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu3.txt
plan 1 --mode inference --model "$IN/needle-1m-model.json" --context 1M --global-batch 1 --decode-tokens 32 > /tmp/plan_needle.json || exit 1
for b in new base new base; do
  timeout 200 carry/kern/$b/mmsp-runtime needle /tmp/plan_needle.json --decode 32 > /tmp/needle.json 2>/tmp/needle.err
  echo "exit=$?"; tail -2 /tmp/needle.err
  tail -1 /tmp/needle.json | sed "s/^/{\"bin\":\"$b\",\"needle\":/; s/\$/}/" >> $OUT/needle_rep.jsonl
  python3 - /tmp/needle.json $b <<'PY'
import json,sys
v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); m,p=v["measured"],v["predicted"]
print(json.dumps({"bin":sys.argv[2],"decode_ms":m["decode_ms_per_token_median"],"pred_ms":p["decode_ms_per_token"],"err_decode":v["max_rel_err_decode"]}))
PY
done
for b in base new; do
  st=per-rank; [ $b = new ] && st=per-rank,per-rank-events
  timeout 120 carry/kern/$b/mmsp-runtime bench --what 2d --seqs-2d 32768 --ranks 8 --streams $st > $OUT/2d32k_rep_$b.jsonl 2>&1
  python3 - $OUT/2d32k_rep_$b.jsonl $b <<'PY'
import json,sys
for l in open(sys.argv[1]):
    try: j=json.loads(l)
    except Exception: continue
    if j.get("bench")=="2d_inprocess_one_gpu" and "error" not in j:
        print(sys.argv[2], j["S"], f'{j["ulysses"]}x{j["ring"]}', j["streams"], "fwdbwd_ms %.2f"%j["fwdbwd_ms"], "vs_kernel %.3f"%j["fwdbwd_vs_single_kernel"], "bound %.3f"%j["blocks_only_fwdbwd_vs_single_kernel"])
PY
done
