#!/usr/bin/env bash
# Reproduce the bundled RETRO model (retrocli/assets/model) from a fresh clone: `make bundled-model`.
# Every step resumes: rerun after an interruption. WORK=dir keeps the intermediate DB and checkpoints.
# Needs the full example corpus (Debian packages python3.11-doc postgresql-doc-15 python-django-doc).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-bundled-work}
RETRO=.venv/bin/retro
HELDOUT=$PWD/examples/data/heldout.jsonl
mkdir -p "$W"
step() { printf '\n==> %s\n' "$*"; }

step "1/6 corpus: the train split of the technical-docs corpus (held-out pages never enter the DB)"
[ -f examples/data/train.jsonl ] || python3 examples/gather_corpus.py --out examples/data

step "2/6 build-db on the train split (~25-45 min on 2 cores: embedding dominates)"
$RETRO build-db examples/data/train.jsonl --out "$W/db"

step "3/6 batch neighbours of every DB chunk, k=2, excluding the chunk's own document"
$RETRO neighbors "$W/db" --input "$W/db" --out "$W/db-neighbors" --k 2 --exclude-same-doc

step "4/6 train the base decoder (2,600 steps x 4 x 512 tokens, ~85 min on 2 cores; checkpoints every 100 steps)"
RESUME=""
[ -f "$W/base/checkpoint/state.json" ] && RESUME="--resume"
$RETRO train "$W/db" --neighbors "$W/db-neighbors" --out "$W/base" --config examples/bundled-model-config.json \
  --steps 2600 --warmup 100 --lr 1.5e-3 --threads 2 --checkpoint-every 100 --seed 0 --retrieval-focus 0.5 $RESUME

step "4b/6 add the copy head and fine-tune everything from the base (1,000 steps, ~35 min)"
if [ -f "$W/model/checkpoint/state.json" ]; then START="--resume"; else START="--init-from $W/base"; fi
$RETRO train "$W/db" --neighbors "$W/db-neighbors" --out "$W/model" --config examples/bundled-model-copy-config.json \
  --steps 1000 --warmup 50 --lr 1e-3 --threads 2 --checkpoint-every 100 --seed 1 --retrieval-focus 0.5 $START

step "5/6 evaluate on the held-out pages: bpb with / without retrieval, bpb(alpha) by leakage bucket"
$RETRO eval "$W/db" --test "$HELDOUT" --model "$W/model" --work-dir "$W/heldout" --json > "$W/eval.json"
$RETRO leakage-report "$W/db" --test "$HELDOUT" --model "$W/model" --work-dir "$W/heldout" \
  --json "$W/leakage.json" --html "$W/leakage.html"

step "6/6 copy the model into the package and write its card (runs the held-out transcripts)"
DEST=retrocli/assets/model
mkdir -p "$DEST"
cp "$W/model/model.safetensors" "$W/model/config.json" "$W/model/tokenizer.json" \
   "$W/model/retrocli_model.json" "$W/model/train_log.jsonl" "$DEST/"
cp "$W/base/train_log.jsonl" "$DEST/train_log_base.jsonl"
cp "$W/eval.json" "$DEST/eval.json"
.venv/bin/python examples/model_card.py --work "$W" --model "$DEST"
echo "bundled model → $DEST ($(du -sh "$DEST" | cut -f1)); evaluation in $W/eval.json and $W/leakage.html"
