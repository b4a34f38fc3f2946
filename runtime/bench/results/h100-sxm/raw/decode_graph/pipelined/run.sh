#!/usr/bin/env bash
# pipelined greedy decode (graph) vs eager: tokens equal, ms/token; EOS undo on the tiny model.
set -u
source runtime/bench/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
O=$OUT
for c in 64K 1M; do
  P=$O/plan_$c.json
  plan 1 --mode inference --model "$IN/needle-1m-model.json" --context $c --global-batch 1 --decode-tokens 32 > $P
  CTX=$($PY -c "import json; print(json.load(open('$P'))['context_tokens'])")
  for mode in graph eager; do
    a=; [ $mode = eager ] && a=--no-cuda-graph
    timeout 200 $BIN infer $P --device cuda --max-new 32 --haystack $((CTX - 32)) --dtype bf16 $a > $O/inf_${c}_$mode.json 2> $O/inf_${c}_$mode.err
    echo "exit=$? $c $mode"; grep -v "^frame" $O/inf_${c}_$mode.err | tail -3
  done
  $PY - $O/inf_${c}_graph.json $O/inf_${c}_eager.json <<'PY'
import json,sys
a,b=[json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:]]
print(json.dumps({"ctx":a.get("prompt_tokens"),"tokens_equal":a["tokens"]==b["tokens"],"graph_ms":a["decode_ms_per_token_median"],"graph_path":a["decode_path"],"eager_ms":b["decode_ms_per_token_median"],"predicted":a["predicted"]["decode_ms_per_token"],"n":len(a["tokens"])}))
PY
done
echo "== EOS undo, tiny bf16"
P=$O/plan_64K.json
timeout 100 $BIN infer $P --tiny --haystack 1000 --dtype bf16 --device cuda --max-new 16 > $O/tiny_free.json 2>/dev/null
E=$($PY -c "import json; t=json.loads(open('$O/tiny_free.json').read().strip().splitlines()[-1])['tokens']; print(t[6])")
for mode in graph eager; do
  a=; [ $mode = eager ] && a=--no-cuda-graph
  timeout 100 $BIN infer $P --tiny --haystack 1000 --dtype bf16 --device cuda --max-new 16 --eos $E $a > $O/tiny_eos_$mode.json 2>/dev/null
done
$PY - $O/tiny_free.json $O/tiny_eos_graph.json $O/tiny_eos_eager.json $E <<'PY'
import json,sys
f,g,e=[json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:4]]
print(json.dumps({"eos":int(sys.argv[4]),"free":f["tokens"],"graph":g["tokens"],"eager":e["tokens"],"equal":g["tokens"]==e["tokens"],"graph_path":g["decode_path"],"stopped":[g.get("stopped_on_eos"),e.get("stopped_on_eos")],"kv_tokens":[g.get("kv_tokens_per_rank"),e.get("kv_tokens_per_rank")]}))
PY
echo "== infer.sh NGPU=1 64K (NCCL world of 1 vs in-process)"
mkdir -p $O/inf64
NGPU=1 CONTEXT=64K MAX_NEW=32 OUT=$O/inf64 timeout 150 bash runtime/bench/infer.sh 2>&1 | grep '"summary"' | cut -c1-200
rm -f $O/inf64/*tiny*
echo "== done"
