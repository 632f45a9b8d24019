#!/usr/bin/env bash
# `make showcase`: a task where the continuous thoughts carry the reasoning (mmcoconut/data/chain.py).
# Tiny random GPT-2/CLIP with a chain-task tokenizer -> 3-hop pointer-chasing shards -> Coconut curriculum on 2 CPU
# ranks (mmcoconut/configs/showcase.yaml: c_thought 4, latent_scale embedding, lr x 0.25 after stage 0) -> the four
# views at the end of every stage + the latent-use gap ->
# an answer-only (no-CoT) baseline trained as long -> what the thoughts decode to.
# Env: SEED (default 0), NOCOT=0 skips the baseline, CONFIG (default showcase). Runs with the venv first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SEED=${SEED:-0}
CONFIG=${CONFIG:-showcase}
NAME=showcase-s$SEED
RUN=runs/$NAME
SHARDS=shards/chain
start=$(date +%s)
step() { echo; echo "==> [$1/6] $2 ($(( $(date +%s) - start ))s elapsed)"; }

step 1 "tiny random GPT-2 + CLIP + a tokenizer trained on chain-task texts -> models/chain (skipped when up to date)"
python tools/make_tiny_models.py models/chain --preset demo --task chain

step 2 "3-hop pointer-chasing shards -> $SHARDS (skipped when present)"
if ! compgen -G "$SHARDS/train-*.tar" >/dev/null; then
  python tools/make_shards.py --synthetic 8000 --task chain --hops 3 --seed 0 --split train --out "$SHARDS" \
    --maxcount 1000 --image-size 64 --no-progress
fi
if ! compgen -G "$SHARDS/val-*.tar" >/dev/null; then
  python tools/make_shards.py --synthetic 256 --task chain --hops 3 --seed 1 --split val --out "$SHARDS" \
    --maxcount 128 --image-size 64 --no-progress
fi

step 3 "Coconut curriculum, seed $SEED: stage 0 (CoT), then one hop per stage becomes a continuous thought"
CONFIG=$CONFIG NGPU=0 MASTER_PORT=${MASTER_PORT:-29571} ./launch.sh --train.seed="$SEED" --train.name="$NAME"

BASELINE=()
if [ "${NOCOT:-1}" != "0" ]; then
  step 4 "answer-only baseline (curriculum.no_cot), as many epochs as the curriculum run"
  CONFIG=$CONFIG NGPU=0 MASTER_PORT=${MASTER_PORT:-29571} ./launch.sh --train.seed="$SEED" \
    --train.name="$NAME-nocot" --curriculum.no_cot=true
  BASELINE=(--baseline "runs/$NAME-nocot")
else
  step 4 "answer-only baseline skipped (NOCOT=0)"
fi

step 5 "four views at the end of every stage (coconut / dummy: per-sample latents of that stage)"
python tools/showcase_table.py "$RUN" "$SHARDS/val" "${BASELINE[@]}" --out "$RUN/showcase_table.md"

step 6 "what the continuous thoughts of the last checkpoint decode to"
python tools/inspect_latents.py "$RUN" "$SHARDS/val" --first 4 --out "$RUN/latents"
echo "table: $RUN/showcase_table.md | heat map: $RUN/latents/latents.png | runs: $RUN ${BASELINE[1]:-}"
cat "$RUN/showcase_table.md"
echo "showcase finished in $(( $(date +%s) - start ))s"
