# Sourced by the measurement scripts (not faults.sh): device_env.sh (binary, torch's libraries,
# NCCL), the input files, and helpers to make plans at run time with the carried planner.
#   BIN    runtime binary (default carry/mmsp-runtime; the README's figures are release builds)
#   MMSP   planner binary (default carry/mmsp)
#   TOPOLOGY  a topology TOML instead of the one picked by GPU kind and count
#   HBM_GIB   plan on a copy of the topology with this much memory per GPU (contexts the
#             planner refuses on the real one; run them with MMSP_SKIP_MEMORY_CHECK=1)
# shellcheck source=runtime/bench/device_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
MMSP=${MMSP:-carry/mmsp}
IN=runtime/bench/inputs          # inputs only these scripts read
TD=runtime/tests/data            # inputs the tests read as well
MODEL=$TD/llama3-8b-2layer.json  # the llama3-8b shape with 2 layers
OUTDIR=${OUT:-/tmp}
T0=$(date +%s)
sec() { echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }

# gpu_kind: h100 or h200, from the first GPU's name.
gpu_kind() { case $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) in *H200*) echo h200;; *) echo h100;; esac; }

# topo N: the topology TOML for N GPUs of this machine's kind. The 1- and 4-GPU files are kept
# (inputs/ or tests/data/); other counts are the 1-GPU file with N GPUs on its NVSwitch.
topo() {
  local n=$1 k f; k=$(gpu_kind)
  if [ -n "${TOPOLOGY:-}" ]; then f=$TOPOLOGY
  else
    for f in "$IN/$k-${n}gpu.toml" "$TD/$k-${n}gpu.toml" ""; do [ -f "$f" ] && break; done
    if [ -z "$f" ]; then
      for f in "$IN/$k-1gpu.toml" "$TD/$k-1gpu.toml"; do [ -f "$f" ] && break; done
      sed -e "s/^gpus = 1/gpus = $n/" -e "s/^domain_gpus = 1/domain_gpus = $n/" \
        -e "s/^name = .*/name = \"$k-${n}gpu\"/" "$f" > "/tmp/mmsp-$k-${n}gpu.toml"
      f=/tmp/mmsp-$k-${n}gpu.toml
    fi
  fi
  if [ -n "${HBM_GIB:-}" ]; then
    sed "s/^hbm_gib = .*/hbm_gib = $HBM_GIB/" "$f" > /tmp/mmsp-topo-hbm.toml; f=/tmp/mmsp-topo-hbm.toml
  fi
  echo "$f"
}

# plan N ARGS...: `mmsp plan` for N GPUs of this machine (JSON on stdout).
plan() { local n=$1; shift; $MMSP plan --topology "$(topo "$n")" --gpus "$n" --format json "$@"; }

# launch N ARGS...: `$BIN ARGS...` as N NCCL processes, one per GPU (torchrun-style environment).
PORT=${PORT:-29700}
launch() {
  local n=$1 pids=() p rk; shift; PORT=$((PORT + 1))
  for rk in $(seq 0 $((n - 1))); do
    RANK=$rk WORLD_SIZE=$n LOCAL_RANK=$rk MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
      timeout "${STEP_TIMEOUT:-300}" "$BIN" "$@" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || echo "{\"rank_pid\": $p, \"failed\": \"$1\"}"; done
}
