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

echo "==> 1/7 chunk: tokenize the example subset (Python docs, Django release notes) into 64-token chunks"
$RETRO chunk examples/subset/train.jsonl --out "$OUT/chunks-only" --overwrite
$RETRO info "$OUT/chunks-only"

echo "==> 2/7 build-db: chunk → embed (frozen MiniLM BERT) → index (HNSW); a rerun resumes"
$RETRO build-db examples/subset/train.jsonl --out "$OUT/db"

echo "==> 3/7 neighbors: the nearest chunks of a question, with their continuations"
$RETRO neighbors "$OUT/db" --k 2 \
  --query "How do I define a class with a method that returns the instance's name?"

echo "==> 4/7 batch neighbours of every DB chunk (excluding its own document), as RETRO training reads them"
$RETRO neighbors "$OUT/db" --input "$OUT/db" --out "$OUT/neighbors" --k 2 --exclude-same-doc --overwrite

echo "==> 5/7 leakage-report: how much of the held-out pages already sits in the DB"
$RETRO leakage-report "$OUT/db" --test examples/subset/heldout.jsonl --examples 2 \
  --html "$OUT/leakage.html" --json-out "$OUT/leakage.json"

echo "==> 6/7 generate: the bundled model (SmolLM2-135M RETRO-fitted) continues a held-out page, retrieving as it goes"
PROMPT=$($PY -c 'import json, sys
doc = [json.loads(line) for line in open("examples/subset/heldout.jsonl")][int(sys.argv[1])]
print(doc["text"][int(sys.argv[2]):int(sys.argv[3])])' "$PROMPT_DOC" "$PROMPT_FROM" "$PROMPT_TO")
$RETRO generate --db "$OUT/db" --prompt "$PROMPT" --max-new-tokens 96 --temperature 0 --show-neighbors

echo "==> 7/7 knowledge without retraining: add a page the DB lacks, generate again, then remove it"
# Held-out page NEW_DOC (Python's Development Mode) is not in the DB. The prompt is its first 7 chunks
# (448 tokens); once the page is added, the retrieval for the 7th returns that chunk and its continuation.
NEW_DOC=8
$PY -c 'import json, sys
from retrocli.db import open_db
doc = [json.loads(line) for line in open("examples/subset/heldout.jsonl")][int(sys.argv[1])]
open(sys.argv[2], "w").write(json.dumps(doc) + "\n")
tokenizer = open_db(sys.argv[4]).tokenizer
print(tokenizer.decode(tokenizer.encode_batch([doc["text"]])[0][:448]), file=open(sys.argv[3], "w"), end="")' \
  "$NEW_DOC" "$OUT/new-page.jsonl" "$OUT/new-prompt.txt" "$OUT/db"
cp -r "$OUT/db" "$OUT/living-db.partial" && rm -rf "$OUT/living-db" && mv "$OUT/living-db.partial" "$OUT/living-db"
# One `retro serve` answers the three generations: it follows the DB from version to version as `retro add`
# and `retro remove` commit, and the model loads once instead of three times.
PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$RETRO serve "$OUT/living-db" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
$PY -c 'import sys, time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5)
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit("retro serve did not start: see " + sys.argv[2])' "$PORT" "$OUT/serve.log"
copied_run() {  # greedy, 48 new tokens; prints the longest run copied from a neighbour, as --show-neighbors does
  $PY -c 'import json, sys, urllib.request
body = json.dumps({"prompt": open(sys.argv[2]).read(), "max_new_tokens": 48, "temperature": 0}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
answer = json.loads(urllib.request.urlopen(request, timeout=600).read())
copy, version = answer["copy"], answer["version"]
if copy and copy["tokens"] >= 4:
    tokens, chunk, source, text = copy["tokens"], copy["neighbor_id"], copy["source"], copy["text"]
    print(f"── the continuation shares a {tokens}-token run with retrieved chunk {chunk} ({source}), "
          f"DB version {version}: {text}")
else:
    print(f"(no copied run), DB version {version}")' "$PORT" "$OUT/new-prompt.txt"
}
echo "--- before: the page is not in the DB"
copied_run
$RETRO add "$OUT/living-db" "$OUT/new-page.jsonl"
echo "--- after retro add: the model copies the page's continuation from the DB"
copied_run
$RETRO remove "$OUT/living-db" --source "*new-page.jsonl*"
echo "--- after retro remove: the page is gone from every search"
copied_run
kill "$SERVER" 2>/dev/null || true
$RETRO info "$OUT/living-db"

echo "done: DB in $OUT/db, batch neighbours in $OUT/neighbors, leakage report in $OUT/leakage.html, the changed DB in $OUT/living-db"
echo "next: $RETRO serve $OUT/db, then open http://127.0.0.1:8765/ to search, generate and check leakage in a browser"
