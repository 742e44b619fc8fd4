#!/usr/bin/env bash
# Reproduce the bundled model (retrocli/assets/model), SmolLM2-135M-Instruct RETRO-fitted on the example
# corpus, from a fresh clone: `make bundled-model`. Every step resumes: rerun after an interruption.
# WORK=dir keeps the intermediate DB, neighbours and checkpoints.
# Needs the full example corpus (Debian packages python3.11-doc postgresql-doc-15 python-django-doc).
#
# The defaults are the recipe of the shipped model. The variables below exist so that the whole chain can be
# run small (tests/test_bundled_model_recipe.py does, on a tiny corpus, BERT and base); leave them unset to
# reproduce the model.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-bundled-work}
RETRO=${RETRO:-.venv/bin/retro}
PYTHON=${PYTHON:-.venv/bin/python}
TRAIN=${TRAIN:-examples/data/train.jsonl}
HELDOUT=${HELDOUT:-$PWD/examples/data/heldout.jsonl}
DEST=${DEST:-retrocli/assets/model}
BASE=${BASE:-smollm2}           # the frozen base: smollm2, a GGUF file or a Hugging Face directory
TOKENIZER=${TOKENIZER:-smollm2}  # the DB speaks the base's tokens
STEPS=${STEPS:-480}
SEQ_LEN=${SEQ_LEN:-512}
BATCH=${BATCH:-4}
K=${K:-2}
FOCUS=${FOCUS:-0.25}  # a quarter of each batch from windows whose neighbours predict the next chunk
LAYOUT=${LAYOUT:-}    # e.g. "--cca-start 2 --cca-every 2" for a small base; empty: the paper's positions
PRECISION=${PRECISION:-auto}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-20}
EMBEDDER=${EMBEDDER:+--embedder $EMBEDDER}
mkdir -p "$W"
step() { printf '\n==> %s\n' "$*"; }

step "1/6 corpus: the train split of the technical-docs corpus (held-out pages never enter the DB)"
[ -f "$TRAIN" ] || python3 scripts/gather_corpus.py --out "$(dirname "$TRAIN")"

step "2/6 build-db on the train split with the base's tokenizer (~10 min on 2 cores: embedding dominates)"
# shellcheck disable=SC2086  # EMBEDDER is empty or two words
$RETRO build-db "$TRAIN" --out "$W/db" --tokenizer "$TOKENIZER" $EMBEDDER

step "3/6 batch neighbours of every DB chunk, k=$K, excluding the chunk's own document"
$RETRO neighbors "$W/db" --input "$W/db" --out "$W/db-neighbors" --k "$K" --exclude-same-doc

step "4/6 retrofit: $BASE frozen, CCA branches + neighbour encoder trained ($STEPS steps x $BATCH x $SEQ_LEN tokens; ~40-90 min on 2 cores)"
RESUME=""
[ -f "$W/model/checkpoint/state.json" ] && RESUME="--resume"
# shellcheck disable=SC2086  # LAYOUT and RESUME are words
$RETRO retrofit "$W/db" --neighbors "$W/db-neighbors" --out "$W/model" --base "$BASE" $LAYOUT --seq-len "$SEQ_LEN" \
  --batch-size "$BATCH" --steps "$STEPS" --warmup 30 --lr 1e-3 --threads 2 --checkpoint-every "$CHECKPOINT_EVERY" \
  --seed 0 --k "$K" --retrieval-focus "$FOCUS" --precision "$PRECISION" $RESUME

step "5/6 evaluate on the held-out pages (near-duplicates excluded): the base alone, the retrofit, bpb(alpha), the copy ceiling"
$RETRO eval "$W/db" --test "$HELDOUT" --model "$W/model" --work-dir "$W/heldout" --exclude-near-duplicates \
  --losses-out "$W/losses.npz" \
  --json > "$W/eval.json.tmp"
mv "$W/eval.json.tmp" "$W/eval.json"
# the ceiling reads eval's per-token bits and the neighbours it fed (the same near-duplicates dropped)
$PYTHON bench/bench_retrieval_ceiling.py --db "$W/db" --test-neighbors "$W/heldout" --model "$W/model" \
  --k "$K" --losses "$W/losses.npz" --exclude-near-duplicates --threads 2 --json > "$W/ceiling.json.tmp"
mv "$W/ceiling.json.tmp" "$W/ceiling.json"

step "6/6 copy the new weights into $DEST and write its card (runs the held-out transcripts)"
rm -rf "$DEST.partial" && mkdir -p "$DEST.partial"
cp "$W/model/model.safetensors" "$W/model/config.json" "$W/model/base.json" "$W/model/tokenizer.json" \
   "$W/model/retrocli_model.json" "$W/model/train_log.jsonl" "$W/eval.json" "$W/ceiling.json" "$DEST.partial/"
$PYTHON scripts/retrofit_card.py --work "$W" --model "$DEST.partial" --heldout "$HELDOUT"
$PYTHON -c "import sys; from retrocli.model.retrofit import shard_weights; shard_weights(sys.argv[1])" "$DEST.partial"
rm -rf "$DEST" && mv "$DEST.partial" "$DEST"
echo "bundled model → $DEST ($(du -sh "$DEST" | cut -f1), the base not included); evaluation in $W/eval.json"
