#!/usr/bin/env bash
# `make demo`: tiny random GPT-2/CLIP -> synthetic shards -> Coconut curriculum training on 2 CPU ranks ->
# four-view evaluation (nocot / cot / coconut / dummy) on 2 ranks -> plots -> where everything is.
# Runs with the venv's bin first on PATH (the Makefile does that). ≤ 5 minutes on 2 cores, first-run builds included.
# ARCH=llama|qwen2|mistral (make demo ARCH=llama): the same demo on a tiny model of that LM family; VISION=siglip: a
# SigLIP tower instead of CLIP (models/tiny-ARCH-VISION, runs/demo-ARCH-VISION). ENGINE=fsdp2: FSDP2 (runs/...-fsdp2).
for arg in "$@"; do  # --help: the header above, then exit (nothing is started)
  if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    echo "Options: none (-h/--help prints this); env ARCH, VISION, ENGINE. make clean-demo removes what it made."
    exit 0
  fi
done
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
ARCH="${ARCH:-gpt2}" VISION="${VISION:-clip}"
MODELS=models/tiny NAME=demo EXTRA=()
if [ "$ARCH" != gpt2 ] || [ "$VISION" != clip ]; then
  MODELS="models/tiny-$ARCH-$VISION" NAME="demo-$ARCH-$VISION"
  EXTRA=(--model.lm_id="$MODELS/lm" --model.vision_id="$MODELS/vision")
fi
if [ "${ENGINE:-deepspeed}" = fsdp2 ]; then NAME="$NAME-fsdp2"; fi  # its own run dir (checkpoints are per engine)
[ "$NAME" = demo ] || EXTRA+=(--train.name="$NAME")
RUN="runs/$NAME"
EVAL="$RUN/eval"
SHARDS=shards/synthetic
start=$(date +%s)
step() { echo; echo "==> [$1/6] $2 ($(( $(date +%s) - start ))s elapsed)"; }

step 1 "tiny random $ARCH LM + $VISION vision + BPE tokenizer -> $MODELS (skipped when up to date)"
python tools/make_tiny_models.py "$MODELS" --preset demo --arch "$ARCH" --vision "$VISION"

step 2 "synthetic visual-reasoning shards -> $SHARDS (skipped when present)"
if compgen -G "$SHARDS/train-*.tar" >/dev/null; then
  echo "train shards present: $(ls "$SHARDS"/train-*.tar | wc -l) files"
else
  python tools/make_shards.py --synthetic 8000 --seed 0 --split train --out "$SHARDS" --maxcount 1000 \
    --image-size 64 --no-choices-in-question --no-progress
fi
if compgen -G "$SHARDS/val-*.tar" >/dev/null; then
  echo "val shards present: $(ls "$SHARDS"/val-*.tar | wc -l) files"
else
  python tools/make_shards.py --synthetic 256 --seed 1 --split val --out "$SHARDS" --maxcount 128 \
    --image-size 64 --no-choices-in-question --no-progress
fi

step 3 "train through the curriculum: 2 CPU processes, engine ${ENGINE:-deepspeed} (ENGINE=fsdp2: FSDP2), fp32 (config mmcoconut/configs/demo.yaml)"
# fp32 (train.precision in demo.yaml): DeepSpeed's CPU fp16 needs AVX512-FP16/AMX, which most CPUs lack
CONFIG=demo NGPU=0 ./launch.sh ${EXTRA[@]+"${EXTRA[@]}"}

step 4 "evaluate the last checkpoint in four views on the val shards (2 processes, gloo)"
rm -f "$EVAL"/predictions_*.json
python -m torch.distributed.run --nproc_per_node 2 --master_port "${DEMO_EVAL_PORT:-29561}" -m mmcoconut.eval \
  "$RUN" "$SHARDS/val" --views nocot,cot,coconut,dummy --out "$EVAL" --metrics "$RUN/metrics.jsonl"

step 5 "plot $RUN/metrics.jsonl"
python tools/plot_metrics.py "$RUN"

step 6 "where everything is"
ckpt_latest=$(find "$RUN" -name latest -type f | head -n 1)
echo "checkpoints:    $(dirname "${ckpt_latest:-$RUN/?}") (latest tag: $(cat "$ckpt_latest" 2>/dev/null || echo '?'))"
echo "metrics:        $RUN/metrics.jsonl ($(wc -l < "$RUN/metrics.jsonl") records)"
echo "plots:          $(ls "$RUN"/*.png 2>/dev/null | tr '\n' ' ')"
echo "eval table:     $EVAL/eval_results.json"
echo "predictions:    $(ls "$EVAL"/predictions_*.json | tr '\n' ' ')"
echo "export to HF:   mmcoconut-export $RUN $RUN/export && mmcoconut-predict $RUN/export $SHARDS/val preds.json"
python - "$EVAL/eval_results.json" <<'PY'
import json, sys
print(json.load(open(sys.argv[1]))["table"])
PY
echo "demo finished in $(( $(date +%s) - start ))s"
