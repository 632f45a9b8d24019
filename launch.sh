#!/usr/bin/env bash
# Launch training on this machine (or several, with HOSTFILE) through DeepSpeed's launcher.
#   ./launch.sh [--key=value ...]                         # CONFIG=demo, all visible GPUs, or 2 CPU processes
#   NGPU=4 CONFIG=aokvqa DS_CONFIG=ds_configs/zero3_4gpu.json ./launch.sh --train.lr=3e-5
# Env: NGPU (default: GPUs seen by nvidia-smi; 0 -> CPU with NPROC processes, default 2), CONFIG (default demo),
#      DS_CONFIG (default ds_configs/zero2_<N>gpu.json; with HOSTFILE pick the file for the total world size),
#      HOSTFILE (multi-node: deepspeed --hostfile), MASTER_PORT (default 29500).
# Elastic resume on another world size: python -m mmcoconut.train.universal RUN_DIR, then launch again.
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
if [ "$NGPU" = "0" ] || [ "$NGPU" = "none" ]; then
  export DS_ACCELERATOR=cpu            # DeepSpeed's CPU accelerator; gloo between processes
  NPROC=${NPROC:-2}
else
  NPROC=$NGPU
fi
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_${NPROC}gpu.json}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mmcoconut/torch_extensions}
DEEPSPEED=${DEEPSPEED:-$(command -v deepspeed || echo .venv/bin/deepspeed)}
if [ -n "${HOSTFILE:-}" ]; then
  WHERE=(--hostfile "$HOSTFILE")
else
  WHERE=(--num_gpus "$NPROC")
fi
set -x
exec "$DEEPSPEED" "${WHERE[@]}" --master_port "$MASTER_PORT" --module mmcoconut.train "$CONFIG" \
  --deepspeed "$DS_CONFIG" "$@"
