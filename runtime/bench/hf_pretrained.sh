#!/usr/bin/env bash
# A real run from a Hugging Face checkpoint on one GPU (issue 15), as a user would do it:
#   1. "pretrain": a Llama-3.2-1B-shaped model (runtime/bench/inputs/llama-1b-bpe512.json: 16 layers,
#      hidden 2048, GQA 32/8, llama3 rope scaling, tied embeddings, a 512-token BPE vocabulary)
#      trained from random weights at 8K tokens on the shipped public-domain text, saved with
#      --save-hf (no pretrained Llama checkpoint can reach the GPU machine: it has no network);
#   2. fine-tune that checkpoint (--model DIR) at the longest context `mmsp plan --max-context`
#      says one GPU holds, and at 64K, against the plan's predictions; saved again with --save-hf.
# Plans are made there at run time with the carried planner (common.sh, <kind>-1gpu.toml).
# Data: carry/corpus.npy, the shipped
# text tokenized by carry/tokenizer.json (a byte-level BPE trained on it) and repeated to 600K
# tokens. Results: one file, $OUT/hf_pretrained.tgz (reports, metrics JSONL, plans, logs).
# Carry: carry/{mmsp-runtime,mmsp,tokenizer.json,corpus.npy} (release builds; BIN, MMSP override).
set -uo pipefail
# shellcheck source=runtime/bench/common.sh
source "$(dirname "$0")/common.sh"
DEST=$OUT; OUT=/tmp/hf_pretrained; mkdir -p $OUT
trap 'tar czf $DEST/hf_pretrained.tgz -C /tmp hf_pretrained' EXIT
B=$BIN; CFG=$IN/llama-1b-bpe512.json
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
plan1() { plan 1 --model $CFG --layout 1x1 --global-batch 1 --recompute none "$@"; }
sec "pretrain 8K"
plan1 --context 8K > $OUT/plan_8K.json || exit 1
timeout 240 $B run $OUT/plan_8K.json --model $CFG --data carry/corpus.npy --data-seed 1 --steps 150 \
  --lr 6e-4 --warmup-steps 15 --decay-steps 150 --clip-grad 1.0 --metrics $OUT/pretrain.jsonl \
  --save-hf $OUT/pretrained --inprocess 1 --quiet --out $OUT/pretrain.json > /dev/null 2> $OUT/pretrain.err
echo "pretrain exit=$?"; tail -2 $OUT/pretrain.err
cp carry/tokenizer.json $OUT/pretrained/
ls -la $OUT/pretrained
sec "fine-tune at the planner's max context"
plan1 --max-context > $OUT/plan_max.json || exit 1
python3 -c "import json; p=json.load(open('$OUT/plan_max.json')); print('max context', p['context_tokens'], 'predicted GiB', p['predicted']['memory_per_gpu_bytes']/2**30)"
for p in max 64K; do
  [ $p = 64K ] && { plan1 --context 64K > $OUT/plan_64K.json || exit 1; }
  timeout 200 $B run $OUT/plan_$p.json --model $OUT/pretrained --data carry/corpus.npy --data-seed 2 --steps 6 \
    --lr 1e-4 --clip-grad 1.0 --metrics $OUT/finetune_$p.jsonl --save-hf $OUT/finetuned_$p --inprocess 1 --quiet \
    --out $OUT/finetune_$p.json > /dev/null 2> $OUT/finetune_$p.err
  echo "fine-tune $p exit=$?"; tail -3 $OUT/finetune_$p.err
  rm -rf $OUT/finetuned_$p/*.safetensors   # 2 GB each: the files' list stays in the log
done
rm -rf $OUT/pretrained/*.safetensors
sec done
