#!/usr/bin/env bash
# Launch training on this machine (or on several) through DeepSpeed's launcher or torchrun (train.engine=fsdp2).
#   ./launch.sh [--key=value ...]                         # CONFIG=demo, all visible GPUs, or 2 CPU processes
#   NGPU=4 CONFIG=aokvqa DS_CONFIG=ds_configs/zero3_4gpu.json ./launch.sh --train.lr=3e-5
#   NGPU=4 CONFIG=aokvqa ./launch.sh --train.engine=fsdp2   # torchrun underneath, no ds_config
# Env: NGPU (default: GPUs seen by nvidia-smi; 0 -> CPU with NPROC processes, default 2), CONFIG (default demo),
#      ENGINE (deepspeed | fsdp2; default: the --train.engine argument, else deepspeed),
#      DS_CONFIG (DeepSpeed: default ds_configs/zero0_1gpu.json on one GPU, ds_configs/zero2_<N>gpu.json on N > 1,
#      ds_configs/cpu/zero2_<N>gpu.json on CPU; on several nodes pick the file for the total world size),
#      MASTER_PORT (default 29500), MASTER_ADDR (default 127.0.0.1).
# Several nodes (docs/training.md, "Several nodes"), on every node: NNODES, NODE_RANK (0 .. NNODES-1), MASTER_ADDR
#      (node 0's address) and the same MASTER_PORT; DeepSpeed also HOSTFILE (one line per node: `<name> slots=<N>`).
#      With NODE_RANK set each node starts its own ranks (DeepSpeed: --no_ssh); DeepSpeed with HOSTFILE alone
#      starts every node from this one over ssh (pdsh).
# Elastic resume on another world size: DeepSpeed: python -m mmcoconut.cli.universal RUN_DIR, then launch again;
# FSDP2: launch again (its checkpoints reshard on load).
# Exit codes: 0 done, 1 error, 2 bad config / run dir in use, 75 stopped by SIGTERM/SIGINT/SIGUSR1 after saving a
# checkpoint (run the same command again to resume), 128+N a second signal N stopped it at once, or a signal N came
# before the training processes existed (nothing saved).
for arg in "$@"; do  # --help: the header above, then exit (nothing is started)
  if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    echo "Every other argument goes to the trainer: python -m mmcoconut.train --help lists the config keys."
    exit 0
  fi
done
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${NGPU:-}" ]; then
  NGPU=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU') || echo 0)
fi
CONFIG=${CONFIG:-demo}
MASTER_PORT=${MASTER_PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
NNODES=${NNODES:-1}
ENGINE=${ENGINE:-}
prev=""
for arg in "$@"; do  # the engine named on the command line (--train.engine=X, --engine=X, --train.engine X)
  case "$arg" in
    --train.engine=*|--engine=*) ENGINE=${arg#*=} ;;
  esac
  if [ "$prev" = "--train.engine" ] || [ "$prev" = "--engine" ]; then ENGINE=$arg; fi
  prev=$arg
done
ENGINE=${ENGINE:-deepspeed}
if [ "$NGPU" = "0" ] || [ "$NGPU" = "none" ]; then
  export DS_ACCELERATOR=cpu            # DeepSpeed's CPU accelerator; gloo between processes
  NPROC=${NPROC:-2}
else
  NPROC=$NGPU
fi
WORLD=$((NPROC * NNODES))
if [ "$NGPU" = "0" ] || [ "$NGPU" = "none" ]; then
  DS_CONFIG=${DS_CONFIG:-ds_configs/cpu/zero2_${WORLD}gpu.json}   # global batch 32, micro 4 (CPU demo sizes)
elif [ "$WORLD" = "1" ]; then
  DS_CONFIG=${DS_CONFIG:-ds_configs/zero0_1gpu.json}
else
  DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_${WORLD}gpu.json}
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mmcoconut/torch_extensions}
CODES=""
if [ "$ENGINE" = "fsdp2" ]; then
  TORCHRUN=${TORCHRUN:-$(command -v torchrun || echo .venv/bin/torchrun)}
  CODES=$(mktemp -d)  # each rank's exit code (torchrun reports any failing rank as 1)
  export MMCOCONUT_EXIT_CODE_DIR=$CODES
  CMD=("$TORCHRUN" --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC"
       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m mmcoconut.train "$CONFIG" "$@"
       --train.engine=fsdp2)
else
  DEEPSPEED=${DEEPSPEED:-$(command -v deepspeed || echo .venv/bin/deepspeed)}
  if [ -n "${HOSTFILE:-}" ] && [ -n "${NODE_RANK:-}" ]; then  # this node's ranks only
    WHERE=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
  elif [ -n "${HOSTFILE:-}" ]; then
    WHERE=(--hostfile "$HOSTFILE")
  else
    WHERE=(--num_gpus "$NPROC")
  fi
  CMD=("$DEEPSPEED" "${WHERE[@]}" --master_port "$MASTER_PORT" --module mmcoconut.train "$CONFIG"
       --deepspeed "$DS_CONFIG" "$@")
fi
echo "+ ${CMD[*]}" >&2

# Signals (README, "Preemption and exit codes"). DeepSpeed's launcher runs in its own session, so a terminal's
# Ctrl-C or a scheduler's SIGTERM reaches this script, which forwards it to the training ranks only: DeepSpeed's
# per-node launcher, if signalled, SIGTERMs the ranks again and SIGKILLs them 30 s later, cutting a checkpoint
# short. 1st SIGTERM/SIGINT/SIGUSR1: the ranks finish the optimizer step, save, exit 75. 2nd: forwarded, the
# ranks exit at once. 3rd: SIGKILL to the whole launch. Whatever happens, nothing of it is left running.
if command -v setsid >/dev/null 2>&1; then
  setsid "${CMD[@]}" &
else
  set -m; "${CMD[@]}" & set +m  # job control: own process group, not the terminal's foreground group
fi
LEADER=$!  # DeepSpeed's runner or torchrun; its process group holds the whole launch
NSIG=0

children() {  # pids whose parent is $1
  if command -v pgrep >/dev/null 2>&1; then pgrep -P "$1" || true; return; fi
  local parent=$1 d stat ppid
  for d in /proc/[0-9]*; do
    stat=$(cat "$d/stat" 2>/dev/null) || continue
    read -r _ ppid _ <<<"${stat##*) }"
    if [ "$ppid" = "$parent" ]; then echo "${d#/proc/}"; fi
  done
}

ranks() {  # torchrun -> ranks; DeepSpeed: runner -> per-node launcher -> ranks; over ssh the runner (pdsh forwards)
  if [ "$ENGINE" = "fsdp2" ]; then children "$LEADER"; return; fi
  if [ -n "${HOSTFILE:-}" ] && [ -z "${NODE_RANK:-}" ]; then echo "$LEADER"; return; fi
  local l
  for l in $(children "$LEADER"); do children "$l"; done
}

forward() {
  NSIG=$((NSIG + 1))
  if [ "$NSIG" -ge 3 ]; then
    echo "launch.sh: SIG$1 again: killing the whole launch" >&2
    # shellcheck disable=SC2046
    kill -KILL $(ranks) 2>/dev/null || true  # torchrun's ranks each run in a session of their own
    kill -KILL -- "-$LEADER" 2>/dev/null || true
    return
  fi
  local targets
  targets=$(ranks | tr '\n' ' ')
  if [ -z "${targets// /}" ]; then  # no rank started yet: stop the launch itself; there is nothing to save
    EARLY=$1
    echo "launch.sh: SIG$1 before any training process started: stopping the launch" >&2
    kill -s "$1" -- "-$LEADER" 2>/dev/null || true
    return
  fi
  echo "launch.sh: SIG$1 -> training processes $targets" \
    "($([ "$NSIG" = 1 ] && echo "they save a checkpoint and exit 75" || echo "they exit at once"))" >&2
  # shellcheck disable=SC2086
  kill -s "$1" $targets 2>/dev/null || true
}
EARLY=""
trap 'forward TERM' TERM HUP
trap 'forward INT' INT
trap 'forward USR1' USR1

while :; do
  set +e
  wait "$LEADER"
  rc=$?
  set -e
  kill -0 "$LEADER" 2>/dev/null || break  # still running: `wait` was interrupted by a trapped signal
done
if kill -0 -- "-$LEADER" 2>/dev/null; then  # leftovers of the launch (orphaned ranks or workers)
  echo "launch.sh: stopping processes left over by the launch" >&2
  kill -TERM -- "-$LEADER" 2>/dev/null || true
  for _ in 1 2 3 4 5; do kill -0 -- "-$LEADER" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$LEADER" 2>/dev/null || true
fi
if [ -n "$EARLY" ]; then  # stopped before the ranks existed: say so (the runner's own code would mislead)
  echo "launch.sh: stopped by SIG$EARLY before training started: nothing was trained or saved by this launch," \
    "so there is nothing new to resume (the same command starts again, from the run dir's last checkpoint if it" \
    "has one)" >&2
  rm -rf "$CODES"
  exit $((128 + $(kill -l "$EARLY")))
fi
if [ -n "$CODES" ]; then  # torchrun: an error code of a rank, else 75 / 0 when every rank said so, else torchrun's
  codes=$(cat "$CODES"/rank* 2>/dev/null | sort -u || true)
  n=$(find "$CODES" -type f | wc -l)
  rm -rf "$CODES"
  worst=""
  for code in $codes; do if [ "$code" != 0 ] && [ "$code" != 75 ]; then worst=$code; fi; done
  if [ -n "$worst" ]; then
    rc=$worst
  elif [ "$n" = "$NPROC" ]; then
    if echo "$codes" | grep -qx 75; then rc=75; else rc=0; fi
  fi
fi
exit "$rc"
