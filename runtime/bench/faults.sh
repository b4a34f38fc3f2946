#!/usr/bin/env bash
# Fault checks of `mmsp-runtime run` over NCCL, one process per GPU (torchrun-style
# environment), with the tiny model. Prints one JSON object per case:
#   clean      no fault: every rank exits 0 (the liveness channel raises no false alarm)
#   kill9      rank K is killed with SIGKILL after rank 0 printed step 3: every other rank
#              must exit non-zero within BOUND_S with a line naming rank K
#   exit       MMSP_FAULT_INJECT=K:3:exit: rank K exits by itself (code 3) before step 3
#   hang       MMSP_FAULT_INJECT=K:3:hang, MMSP_COMM_TIMEOUT_S=$HANG_TIMEOUT_S: rank K stops
#              calling collectives; the others' collectives time out (watchdog), and every
#              rank, K included, exits non-zero within the timeout + BOUND_S
#   spawn      `mmsp-runtime run PLAN` with no launcher environment starts one process per
#              GPU itself; with rank K injected to exit, the launcher fails naming rank K
# NCCL refuses two ranks of one communicator on one GPU, so with fewer than 2 GPUs the script
# runs the exit, panic and hang cases as in-process ranks on GPU 0 instead (default and 20 s
# collective timeouts) and says the NCCL cases were not run. Run on the device machine from the repository root with the binary in
# carry/: bash runtime/bench/faults.sh   (env: KILL_RANK, BOUND_S, HANG_TIMEOUT_S, CTX)
set -uo pipefail
# shellcheck source=runtime/bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
N=$(nvidia-smi -L 2>/dev/null | wc -l)
K=${KILL_RANK:-$((N - 1))}
BOUND_S=${BOUND_S:-60}
HANG_TIMEOUT_S=${HANG_TIMEOUT_S:-20}
CTX=${CTX:-1024}
WORK=${OUT:-/tmp}/faults
mkdir -p "$WORK"
PORT=29700
# Float helpers (no bc needed): lt A B is true when A < B; since T0 prints seconds since T0.
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

# inprocess CASE INJECT [TIMEOUT_S]: RANKS (default 2) in-process ranks on GPU 0 (a ring),
# the tiny model, 1000 steps, the fault injected; prints seconds to exit, exit code and the
# last error line. Without TIMEOUT_S the default (adaptive) collective timeout applies.
inprocess() {
  local case=$1 inject=$2 to=${3:-} n=${RANKS:-2} t0 code secs last
  local plan=$WORK/plan_inprocess_$n.json
  echo "{\"schema\": \"mmsp-plan\", \"schema_version\": 1, \"world_size\": $n, \"layout\": {\"ulysses\": 1, \"ring\": $n, \"dp\": 1, \"tp\": 1, \"placement\": \"ulysses_inner\"}, \"zero_stage\": 1, \"recompute\": \"none\", \"micro_batch\": 1, \"grad_accum_steps\": 1, \"context_tokens\": $CTX}" > "$plan"
  t0=$(date +%s.%N)
  if [ -n "$to" ]; then
    MMSP_FAULT_INJECT=$inject MMSP_COMM_TIMEOUT_S=$to timeout 400 $BIN run "$plan" --tiny --inprocess "$n" --steps 1000 >"$WORK/ip_$case.out" 2>"$WORK/ip_$case.err"
  else
    env -u MMSP_COMM_TIMEOUT_S MMSP_FAULT_INJECT=$inject timeout 400 $BIN run "$plan" --tiny --inprocess "$n" --steps 1000 >"$WORK/ip_$case.out" 2>"$WORK/ip_$case.err"
  fi
  code=$?; secs=$(since "$t0")
  last=$(grep "^error:" "$WORK/ip_$case.err" | tail -1 | sed 's/"/\\"/g' | cut -c1-300)
  # The fault's own time: the injected step starts after the steps before it.
  echo "{\"case\": \"inprocess_$case\", \"ranks\": $n, \"injected\": \"$inject\", \"comm_timeout_s\": \"${to:-default}\", \"exit_code\": $code, \"seconds_to_exit\": $secs, \"error\": \"$last\"}"
}

if [ "$N" -lt 2 ]; then
  # NCCL refuses two ranks of one communicator on one GPU: the fault cases run as in-process
  # ranks (threads) sharing GPU 0 instead.
  K=1
  inprocess exit "$K:3:exit"
  inprocess panic "$K:3:panic"
  inprocess hang_default "$K:3:hang"
  inprocess hang_20s "$K:3:hang" 20
  RANKS=4 inprocess hang_default_4 "3:5:hang"
  echo "{\"faults_nccl\": \"not run\", \"gpus\": $N, \"reason\": \"NCCL does not allow two ranks of one communicator on one GPU; the NCCL cases need at least 2 GPUs\"}"
  exit 0
fi
PLAN=$WORK/plan.json
echo "{\"schema\": \"mmsp-plan\", \"schema_version\": 1, \"world_size\": $N, \"layout\": {\"ulysses\": 1, \"ring\": $N, \"dp\": 1, \"tp\": 1, \"placement\": \"ulysses_inner\"}, \"zero_stage\": 1, \"recompute\": \"none\", \"micro_batch\": 1, \"grad_accum_steps\": 1, \"context_tokens\": $CTX}" > "$PLAN"

# start CASE STEPS [extra env...]: starts N ranks; fills PIDS.
start() {
  local case=$1 steps=$2; shift 2
  PIDS=(); PORT=$((PORT + 1))
  for r in $(seq 0 $((N - 1))); do
    env "$@" RANK=$r WORLD_SIZE=$N LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT \
      $BIN run "$PLAN" --tiny --steps "$steps" >"$WORK/$case.$r.out" 2>"$WORK/$case.$r.err" &
    PIDS+=($!)
  done
}

# wait_all LIMIT_S: waits for every rank (killing what is left after LIMIT_S); fills CODES, SECS.
wait_all() {
  local limit=$1 t0 left
  t0=$(date +%s.%N)
  while :; do
    left=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && left=$((left + 1)); done
    [ $left -eq 0 ] && break
    if ! lt "$(since "$t0")" "$limit"; then
      for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
      break
    fi
    sleep 0.1
  done
  SECS=$(since "$t0")
  CODES=()
  for p in "${PIDS[@]}"; do wait "$p"; CODES+=($?); done
}

# names CASE RANK: whether every survivor's stderr has an error line naming rank RANK.
names() {
  local case=$1 who=$2 ok=true
  for r in $(seq 0 $((N - 1))); do
    [ "$r" = "$who" ] && continue
    grep -Eq "rank $who( |:|\)|$)" "$WORK/$case.$r.err" || ok=false
  done
  echo $ok
}

wait_step() { # wait_step CASE STEP: until rank 0 printed "step STEP/" (at most 180 s)
  for _ in $(seq 1 1800); do
    grep -q "^step $2/" "$WORK/$1.0.err" 2>/dev/null && return 0
    kill -0 "${PIDS[0]}" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

json_codes() { local IFS=,; echo "[${CODES[*]}]"; }

survivors_failed() { # all ranks but $1 exited non-zero
  local ok=true
  for r in $(seq 0 $((N - 1))); do
    [ "$r" = "$1" ] && continue
    [ "${CODES[$r]}" != 0 ] || ok=false
  done
  echo $ok
}

# clean
start clean 5
wait_all 300
ok=true; for c in "${CODES[@]}"; do [ "$c" = 0 ] || ok=false; done
echo "{\"case\": \"clean\", \"ranks\": $N, \"exit_codes\": $(json_codes), \"seconds\": $SECS, \"ok\": $ok}"

# kill9
start kill9 1000000
if wait_step kill9 3; then
  kill -9 "${PIDS[$K]}"
  wait_all "$BOUND_S"
  nm=$(names kill9 "$K"); sf=$(survivors_failed "$K")
  ok=false; [ "$nm" = true ] && [ "$sf" = true ] && lt "$SECS" "$BOUND_S" && ok=true
  echo "{\"case\": \"kill9\", \"ranks\": $N, \"killed\": $K, \"exit_codes\": $(json_codes), \"seconds_to_all_exit\": $SECS, \"bound_s\": $BOUND_S, \"errors_name_rank\": $nm, \"ok\": $ok}"
else
  wait_all 5
  echo "{\"case\": \"kill9\", \"ok\": false, \"reason\": \"rank 0 never reached step 3\", \"exit_codes\": $(json_codes)}"
fi

# exit (injected)
start exit 1000000 MMSP_FAULT_INJECT="$K:3:exit"
wait_all $((BOUND_S + 120))
nm=$(names exit "$K"); sf=$(survivors_failed "$K")
echo "{\"case\": \"exit\", \"ranks\": $N, \"injected\": \"$K:3:exit\", \"exit_codes\": $(json_codes), \"seconds_to_all_exit\": $SECS, \"errors_name_rank\": $nm, \"ok\": $([ "$nm" = true ] && [ "$sf" = true ] && echo true || echo false)}"

# hang (injected): the survivors time out; nobody can say which peer is missing over NCCL, so
# the check is that every rank ends, non-zero, within the timeout + BOUND_S.
start hang 1000000 MMSP_FAULT_INJECT="$K:3:hang" MMSP_COMM_TIMEOUT_S="$HANG_TIMEOUT_S"
wait_all $((HANG_TIMEOUT_S + BOUND_S + 120))
ok=true; for c in "${CODES[@]}"; do [ "$c" != 0 ] || ok=false; done
lt "$SECS" $((HANG_TIMEOUT_S + BOUND_S + 60)) || ok=false
to=$(grep -l "did not complete within" "$WORK"/hang.*.err 2>/dev/null | wc -l)
echo "{\"case\": \"hang\", \"ranks\": $N, \"injected\": \"$K:3:hang\", \"comm_timeout_s\": $HANG_TIMEOUT_S, \"exit_codes\": $(json_codes), \"seconds_to_all_exit\": $SECS, \"ranks_reporting_timeout\": $to, \"ok\": $ok}"

# spawn (self-launch, one process per GPU) with rank K injected to exit
t0=$(date +%s.%N)
env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u SLURM_PROCID MMSP_FAULT_INJECT="$K:3:exit" \
  timeout $((BOUND_S + 180)) $BIN run "$PLAN" --tiny --steps 1000000 >"$WORK/spawn.out" 2>"$WORK/spawn.err"
code=$?
secs=$(since "$t0")
last=$(grep "^error:" "$WORK/spawn.err" | tail -1 | sed 's/"/\\"/g')
ok=false; [ "$code" = 1 ] && echo "$last" | grep -q "rank $K" && ok=true
echo "{\"case\": \"spawn\", \"ranks\": $N, \"injected\": \"$K:3:exit\", \"exit_code\": $code, \"seconds\": $secs, \"error\": \"$last\", \"ok\": $ok}"
# The logs of every case stay in $WORK for inspection.
for f in "$WORK"/*.err; do echo "== $f"; grep -E "^error|rank [0-9]+:|gone|timed out|injected" "$f" | tail -5; done
