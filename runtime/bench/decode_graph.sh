#!/usr/bin/env bash
# Decode through the CUDA graph against eager launches on ONE GPU (issue 18): the needle
# (runtime/bench/needle.sh: its small model, the plan's one-rank layout) at each context of
# CONTEXTS (default "64K 1M"), first replaying one captured graph per token, then with
# --no-cuda-graph, DECODE tokens each (default 32). Run there: bash runtime/bench/decode_graph.sh
# Prints one needle summary per run (decode ms/token measured and predicted, decode_path);
# the JSON of each run is in $OUT/decode_<context>/.
set -uo pipefail
# shellcheck source=runtime/bench/common.sh
source "$(dirname "$0")/common.sh"
O=$OUTDIR
for c in ${CONTEXTS:-64K 1M}; do
  mkdir -p "$O/decode_$c"
  for mode in graph eager; do
    a=
    [ "$mode" = eager ] && a=--no-cuda-graph
    OUT=$O/decode_$c TAG=_$mode NEEDLE_ARGS=$a CONTEXT=$c DECODE=${DECODE:-32} LAYOUTS=plan \
      bash "$(dirname "$0")/needle.sh" | tail -1
  done
done
