#!/usr/bin/env bash
# Reproduce the 6M RETRO decoder shipped as `retro-6m` (retrocli/assets/retro-6m): `make retro-6m-model`.
# Every step resumes: rerun after an interruption. WORK=dir keeps the intermediate DB and checkpoints.
# Needs the full example corpus (Debian packages python3.11-doc postgresql-doc-15 python-django-doc).
#
# The defaults are the recipe of the shipped model. The variables below exist so that the whole chain can be
# run small (tests/test_bundled_model_recipe.py does, on a tiny corpus, BERT and config); leave them unset
# to reproduce the model.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-retro-6m-work}
RETRO=${RETRO:-.venv/bin/retro}
PYTHON=${PYTHON:-.venv/bin/python}
TRAIN=${TRAIN:-examples/data/train.jsonl}
HELDOUT=${HELDOUT:-$PWD/examples/data/heldout.jsonl}
DEST=${DEST:-retrocli/assets/retro-6m}
BASE_CONFIG=${BASE_CONFIG:-scripts/bundled-model-config.json}
COPY_CONFIG=${COPY_CONFIG:-scripts/bundled-model-copy-config.json}
BASE_STEPS=${BASE_STEPS:-2600}
COPY_STEPS=${COPY_STEPS:-1000}
SEQ_LEN=${SEQ_LEN:-512}
PRECISION=${PRECISION:-auto}  # auto: bf16 where the CPU has it natively, else fp32
BASE_K=${BASE_K:-2}   # the base decoder learns little from its neighbours (see the card): k = 2 keeps it fast
COPY_K=${COPY_K:-4}   # the copy-head fine-tune is where retrieval is learned: 4 neighbours beat 2 (docs/benchmarks.md)
BASE_FOCUS=${BASE_FOCUS:-0}     # --retrieval-focus costs the base decoder LM quality and teaches it nothing (docs/guide.md#teaching-a-small-model-to-read-its-neighbours)
COPY_FOCUS=${COPY_FOCUS:-0.5}  # the copy head learns to read its neighbours on those windows
COPY_EXCLUSION=${COPY_EXCLUSION:-all}  # --window-exclusion of the fine-tune (docs/data-rules.md)
COPY_CURRICULUM=${COPY_CURRICULUM:-0}  # share of chunks whose first neighbour is a damaged copy of their own text
EMBEDDER=${EMBEDDER:+--embedder $EMBEDDER}
mkdir -p "$W"
step() { printf '\n==> %s\n' "$*"; }

step "1/7 corpus: the train split of the technical-docs corpus (held-out pages never enter the DB)"
[ -f "$TRAIN" ] || python3 scripts/gather_corpus.py --out "$(dirname "$TRAIN")"

step "2/7 build-db on the train split (~25-45 min on 2 cores: embedding dominates)"
# shellcheck disable=SC2086  # EMBEDDER is empty or two words
$RETRO build-db "$TRAIN" --out "$W/db" --tokenizer retrocli-bpe-8k $EMBEDDER

NEIGHBORS_K=$(( BASE_K > COPY_K ? BASE_K : COPY_K ))  # one neighbours file serves both runs
step "3/7 batch neighbours of every DB chunk, k=$NEIGHBORS_K, excluding the chunk's own document"
$RETRO neighbors "$W/db" --input "$W/db" --out "$W/db-neighbors" --k "$NEIGHBORS_K" --exclude-same-doc

step "4/7 train the base decoder ($BASE_STEPS steps x 4 x $SEQ_LEN tokens, k=$BASE_K; 45-85 min on 2 cores; checkpoints every 100 steps)"
RESUME=""
[ -f "$W/base/checkpoint/state.json" ] && RESUME="--resume"
$RETRO train "$W/db" --neighbors "$W/db-neighbors" --out "$W/base" --config "$BASE_CONFIG" --seq-len "$SEQ_LEN" \
  --steps "$BASE_STEPS" --warmup 100 --lr 1.5e-3 --threads 2 --checkpoint-every 100 --seed 0 --retrieval-focus "$BASE_FOCUS" \
  --k "$BASE_K" --precision "$PRECISION" $RESUME

step "5/7 add the copy head and fine-tune everything from the base ($COPY_STEPS steps, k=$COPY_K, 30-60 min)"
if [ -f "$W/model/checkpoint/state.json" ]; then START="--resume"; else START="--init-from $W/base"; fi
# shellcheck disable=SC2086  # START is two words
$RETRO train "$W/db" --neighbors "$W/db-neighbors" --out "$W/model" --config "$COPY_CONFIG" --seq-len "$SEQ_LEN" \
  --steps "$COPY_STEPS" --warmup 50 --lr 1e-3 --threads 2 --checkpoint-every 100 --seed 1 --retrieval-focus "$COPY_FOCUS" \
  --k "$COPY_K" --window-exclusion "$COPY_EXCLUSION" --copy-curriculum "$COPY_CURRICULUM" \
  --precision "$PRECISION" $START

step "6/7 evaluate on the held-out pages: bpb with / without retrieval, bpb(alpha), and the copy ceiling"
$RETRO eval "$W/db" --test "$HELDOUT" --model "$W/model" --work-dir "$W/heldout" --json > "$W/eval.json.tmp"
mv "$W/eval.json.tmp" "$W/eval.json"
# the same model fed the other k as well, so that the card compares both with their copy ceilings
OTHER_K=$(( COPY_K == 2 ? 4 : 2 ))
$RETRO eval "$W/db" --test "$HELDOUT" --model "$W/model" --work-dir "$W/heldout" --k "$OTHER_K" \
  --json > "$W/eval-k$OTHER_K.json.tmp"
mv "$W/eval-k$OTHER_K.json.tmp" "$W/eval-k$OTHER_K.json"
$RETRO leakage-report "$W/db" --test "$HELDOUT" --model "$W/model" --work-dir "$W/heldout" \
  --json-out "$W/leakage.json" --html "$W/leakage.html"
# the eval's work dir holds k=10 neighbours of the held-out chunks: what the ceiling needs
$PYTHON bench/bench_retrieval_ceiling.py --db "$W/db" --test-neighbors "$W/heldout" --model "$W/model" \
  --k 2 4 10 --threads 2 --json > "$W/ceiling.json.tmp"
mv "$W/ceiling.json.tmp" "$W/ceiling.json"

step "7/7 copy the model into $DEST and write its card (runs the held-out transcripts)"
mkdir -p "$DEST"
cp "$W/model/model.safetensors" "$W/model/config.json" "$W/model/tokenizer.json" \
   "$W/model/retrocli_model.json" "$W/model/train_log.jsonl" "$DEST/"
cp "$W/base/train_log.jsonl" "$DEST/train_log_base.jsonl"
cp "$W/eval.json" "$DEST/eval.json"
cp "$W/eval-k$OTHER_K.json" "$DEST/eval-k$OTHER_K.json"
$PYTHON scripts/model_card.py --work "$W" --model "$DEST" --heldout "$HELDOUT"
echo "bundled model → $DEST ($(du -sh "$DEST" | cut -f1)); evaluation in $W/eval.json and $W/leakage.html"
