#!/usr/bin/env bash
# The end-to-end demo on the committed example subset. Run through `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
RETRO=${RETRO:-.venv/bin/retro}
OUT=${DEMO_DIR:-demo-out}
PY=${PY:-.venv/bin/python}
# The generation prompt: characters [FROM, TO) of held-out page DOC (examples/subset/heldout.jsonl):
# Django 1.3.5's release notes, whose security section the DB's 1.4.3 notes share. Chosen with
# scripts/pick_demo_prompt.py (the window where the model copies the most retrieved text).
PROMPT_DOC=14 PROMPT_FROM=1302 PROMPT_TO=2137
mkdir -p "$OUT"

echo "==> 1/6 chunk: tokenize the example subset (Python docs, Django release notes) into 64-token chunks"
$RETRO chunk examples/subset/train.jsonl --out "$OUT/chunks-only" --overwrite
$RETRO info "$OUT/chunks-only"

echo "==> 2/6 build-db: chunk → embed (frozen MiniLM BERT) → index (HNSW); a rerun resumes"
$RETRO build-db examples/subset/train.jsonl --out "$OUT/db"

echo "==> 3/6 neighbors: the nearest chunks of a question, with their continuations"
$RETRO neighbors "$OUT/db" --k 2 \
  --query "How do I define a class with a method that returns the instance's name?"

echo "==> 4/6 batch neighbours of every DB chunk (excluding its own document), as RETRO training reads them"
$RETRO neighbors "$OUT/db" --input "$OUT/db" --out "$OUT/neighbors" --k 2 --exclude-same-doc --overwrite

echo "==> 5/6 leakage-report: how much of the held-out pages already sits in the DB"
$RETRO leakage-report "$OUT/db" --test examples/subset/heldout.jsonl --examples 2 \
  --html "$OUT/leakage.html" --json-out "$OUT/leakage.json"

echo "==> 6/6 generate: the bundled RETRO model continues a held-out page, retrieving from the DB as it goes"
PROMPT=$($PY -c 'import json, sys
doc = [json.loads(line) for line in open("examples/subset/heldout.jsonl")][int(sys.argv[1])]
print(doc["text"][int(sys.argv[2]):int(sys.argv[3])])' "$PROMPT_DOC" "$PROMPT_FROM" "$PROMPT_TO")
$RETRO generate --db "$OUT/db" --prompt "$PROMPT" --max-new-tokens 96 --temperature 0 --show-neighbors

echo "done: DB in $OUT/db, batch neighbours in $OUT/neighbors, leakage report in $OUT/leakage.html"
