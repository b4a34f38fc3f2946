#!/usr/bin/env bash
# Training steps of the 2-layer llama3-8b shape (runtime/tests/data/llama3-8b-2layer.json)
# measured against the plan's predictions. Every plan is made here at run time with the
# carried planner (common.sh: `mmsp plan --topology <kind>-<N>gpu.toml --gpus N ...`), one per
# (context, layout, ZeRO, recompute). Run on the device machine from the repository root:
#   CONTEXTS="32K 128K" ZEROS="0 3" RECOMPUTES="none full" bash runtime/bench/train.sh
# Arguments (environment; lists are space-separated, "auto" lets the planner choose):
#   CONTEXTS    token counts, or "max" for `--max-context` (default "8K 16K 32K")
#   GPUS        GPUs the plans are for (default 1)
#   LAYOUTS     UxR layouts (default 1x1 on one GPU, else auto)
#   ZEROS       ZeRO stages 0-3 (default auto)
#   RECOMPUTES  none or full (default none)
#   LAUNCH      inprocess: the plan's ranks as threads on GPU 0 (default); nccl: one process
#               per GPU (common.sh's launch); spawn: `run` without --inprocess starts them itself
#   STEPS       steps per run (default 5; reports exclude the first)
#   VISION=1    the VLM plan instead of a context: --samples inputs/vlm_samples.jsonl, run with
#               --vision-config inputs/siglip_so400m_config.json
#   CALIBRATION plan with this calibration JSON (--calibration)
#   RUN_ARGS    extra `run` flags, e.g. "--deterministic --attn-backend flash"
#   TRACE=0     no Chrome trace of the phases; KERNEL_TRACE=1 adds a Kineto kernel profile
#   MEM_TRACE=1 the caching allocator's timeline of the last step (MMSP_MEM_TRACE=1), in GiB
#   REPEAT=N    N runs of each plan, losses compared bit for bit
#   RESUME_CHECK=1  4 steps straight against 2 + resume 2: losses and state files compared
# The runtime's own environment passes through (MMSP_PROFILE, MMSP_SKIP_MEMORY_CHECK,
# PYTORCH_CUDA_ALLOC_CONF, ...), and HBM_GIB / TOPOLOGY (common.sh) pick the planning topology.
# Results in $OUT: plan_TAG.json, run_TAG[_k].json, trace/kt/timeline_TAG files, one summary
# JSON line per run on stdout (TAG = gGPUS_CONTEXT_LAYOUT_zZERO_RECOMPUTE).
set -uo pipefail
# shellcheck source=runtime/bench/common.sh
source "$(dirname "$0")/common.sh"
GPUS=${GPUS:-1}
[ "$GPUS" = 1 ] && LAYOUTS=${LAYOUTS:-1x1}
LAUNCH=${LAUNCH:-inprocess}
VISION=${VISION:-0}
[ "$VISION" = 1 ] && CONTEXTS=${CONTEXTS:-vlm}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1

# summary FILES...: one JSON line per run report (measured vs predicted, memory, profile).
summary() { $PY - "$@" <<'PY'
import json, sys
G = 2**30
for f in sys.argv[1:]:
    try: r = json.load(open(f))
    except Exception as e: print(json.dumps({"file": f, "error": str(e)})); continue
    p = r.get("predicted") or {}; k = r.get("kernel_profile"); v = r.get("vision")
    o = {"file": f.split("/")[-1], "ctx": r.get("context_tokens"), "launch": r.get("launch"), "layout": r.get("layout"),
         "zero": r.get("zero_stage"), "recompute": r.get("recompute"), "step_s": r.get("micro_step_s"),
         "pred_s": p.get("micro_step_s"), "err_pct": (p.get("error_pct") or {}).get("micro_step_s"),
         "mfu": r.get("mfu"), "hfu": r.get("hfu"), "dev_peak_GiB": (r.get("peak_device_memory_used_bytes") or 0) / G,
         "alloc_peak_GiB": (r.get("peak_allocated_bytes_rank0") or 0) / G,
         "pred_mem_GiB": (p.get("memory_per_gpu_bytes") or 0) / G, "losses": r.get("losses"),
         "phases": r.get("phases_rank0"), "comm_s": r.get("communication_s_rank0")}
    if k and "span_s" in k:
        o["kp"] = {"span": k["span_s"], "busy": k["busy_s"], "idle": k["idle_s"],
                   "class_s": {c: round(x["s"], 5) for c, x in k["class_s"].items()}}
    if v: o["vision"] = {x: v.get(x) for x in ("encode_s", "plan_ranges_match", "measured", "predicted") if x in v}
    print(json.dumps(o)[:3000])
PY
}

# runit OUT ERR ARGS...: one `run` of the current plan in the chosen launch mode.
runit() {
  local out=$1 err=$2; shift 2
  local a=(run "$P" --model "$MODEL" --steps "$STEPS" --out "$out" "${VIS[@]}" "$@")
  # shellcheck disable=SC2086
  case $LAUNCH in
  inprocess) timeout "${STEP_TIMEOUT:-300}" "$BIN" "${a[@]}" --inprocess "$W" ${RUN_ARGS:-} 2>"$err";;
  nccl) launch "$W" "${a[@]}" ${RUN_ARGS:-} 2>"$err";;
  spawn) timeout "${STEP_TIMEOUT:-300}" "$BIN" "${a[@]}" ${RUN_ARGS:-} 2>"$err";;
  esac
  echo "{\"run\": \"${out##*/}\", \"exit\": $?}"
}

for c in ${CONTEXTS:-8K 16K 32K}; do for L in ${LAYOUTS:-auto}; do
for Z in ${ZEROS:-auto}; do for R in ${RECOMPUTES:-none}; do
  TAG=g${GPUS}_${c}_${L}_z${Z}_$R; P=$OUTDIR/plan_$TAG.json
  sec "$TAG ($LAUNCH)"
  A=(--model "$MODEL" --global-batch 1); VIS=()
  if [ "$VISION" = 1 ]; then A+=(--samples "$IN/vlm_samples.jsonl"); VIS=(--vision-config "$IN/siglip_so400m_config.json")
  elif [ "$c" = max ]; then A+=(--max-context); else A+=(--context "$c"); fi
  [ "$L" = auto ] || A+=(--layout "$L"); [ "$Z" = auto ] || A+=(--zero "$Z")
  [ "$R" = auto ] || A+=(--recompute "$R"); [ -n "${CALIBRATION:-}" ] && A+=(--calibration "$CALIBRATION")
  plan "$GPUS" "${A[@]}" > "$P" || { echo "{\"plan\": \"$TAG\", \"refused\": true}"; continue; }
  W=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['world_size'])" "$P")
  STEPS=${STEPS:-5}
  if [ "${RESUME_CHECK:-0}" = 1 ]; then
    C=/tmp/mmsp-ckpt; rm -rf $C; mkdir -p $C; S0=$STEPS
    STEPS=4; runit "$C/a.json" "$C/a.err" --save $C/straight
    STEPS=2; runit "$C/b.json" "$C/b.err" --save $C/half
    runit "$C/c.json" "$C/c.err" --resume $C/half --save $C/resumed; STEPS=$S0
    $PY - $C <<'PY'
import hashlib, json, os, sys
d = sys.argv[1]
a, c = (json.load(open(f"{d}/{x}.json"))["losses"] for x in "ac")
h = lambda p: {f: hashlib.sha256(open(os.path.join(p, f), "rb").read()).hexdigest() for f in sorted(os.listdir(p)) if f.endswith(".safetensors")}
hs, hr = h(f"{d}/straight"), h(f"{d}/resumed")
print(json.dumps({"resume_check": True, "losses_straight_3_4": a[2:], "losses_resumed": c, "losses_equal": a[2:] == c, "state_files_equal": hs == hr, "files": len(hs)}))
PY
    rm -rf $C; continue
  fi
  EXTRA=(); [ "${TRACE:-1}" = 1 ] && EXTRA+=(--trace "$OUTDIR/trace_$TAG.json")
  [ "${KERNEL_TRACE:-0}" = 1 ] && EXTRA+=(--kernel-trace "$OUTDIR/kt_$TAG.json")
  for k in $(seq 1 "${REPEAT:-1}"); do
    O=$OUTDIR/run_$TAG; [ "${REPEAT:-1}" = 1 ] || O=${O}_$k
    if [ "${MEM_TRACE:-0}" = 1 ]; then export MMSP_MEM_TRACE=1; fi
    runit "$O.json" "$O.err" "${EXTRA[@]}"; tail -2 "$O.err" | cut -c1-300
    summary "$O.json"
    if [ "${MEM_TRACE:-0}" = 1 ]; then  # the last step's laps: phase, allocated GiB, reserved GiB
      n=$(grep -c mem_trace "$O.err"); h=$((n / STEPS))
      grep mem_trace "$O.err" | tail -$h | awk -v c="$c" '{printf "%s %s %.3f %.3f\n", c, $3, $5/2^30, $7/2^30}' > "$OUTDIR/timeline_$TAG.txt"
    fi
  done
  [ "${REPEAT:-1}" = 1 ] || $PY - "$OUTDIR"/run_"${TAG}"_*.json <<'PY'
import json, sys
l = [json.load(open(f)) for f in sys.argv[1:]]
print(json.dumps({"repeat": len(l), "losses": [r["losses"] for r in l], "bitwise_equal": all(r["losses"] == l[0]["losses"] for r in l), "step_s": [r["micro_step_s"] for r in l]}))
PY
done; done; done; done
sec done
