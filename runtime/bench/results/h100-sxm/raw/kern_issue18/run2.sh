#!/usr/bin/env bash
# kern (issue 18), device call 2: 1M-token needle decode (plan layout, one rank) for main's
# build (base), the host-side RoPE table alone (rope) and the new build (new: + FlashAttention
# decode); then, on an H200, `calibrate` with the new build.
set -uo pipefail
export MMSP=carry/kern/mmsp
BIN=carry/kern/new/mmsp-runtime
source runtime/bench/common.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu2.txt
plan 1 --mode inference --model "$IN/needle-1m-model.json" --context 1M --global-batch 1 --decode-tokens 16 > $OUT/plan_needle.json || exit 1
for b in ${BINS:-base rope new}; do
  sec "needle $b"
  timeout 200 carry/kern/$b/mmsp-runtime needle $OUT/plan_needle.json --decode ${DECODE:-16} > /tmp/needle_$b.json 2>/tmp/needle_$b.err
  echo "exit=$?"; tail -3 /tmp/needle_$b.err
  tail -1 /tmp/needle_$b.json | sed "s/^/{\"bin\":\"$b\",\"needle\":/; s/\$/}/" >> $OUT/needle_all.jsonl
  python3 - /tmp/needle_$b.json $b <<'PY'
import json,sys
try: v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception as e: print(sys.argv[2], "error", e); sys.exit(0)
m,p=v["measured"],v["predicted"]
print(json.dumps({"bin":sys.argv[2],"decode_ms":m["decode_ms_per_token_median"],"pred_ms":p["decode_ms_per_token"],"prefill_tok_s":m["prefill_tokens_per_s"],"err_needle":v["max_rel_err_needle_prefill"],"err_decode":v["max_rel_err_decode"]}))
PY
done
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && [ "${CAL:-1}" = 1 ]; then
  sec calibrate
  timeout 300 carry/kern/new/mmsp-runtime calibrate --model $MODEL --out $OUT/h200-sxm-2layer.json 2>&1 | tail -5
fi
sec done
