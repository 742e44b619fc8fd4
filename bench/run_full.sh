#!/usr/bin/env bash
# All benchmarks on the full example corpus, in sequence (2 cores: never two at once).
# Usage: bash bench/run_full.sh [WORKDIR]   (needs: python3 scripts/gather_corpus.py --out examples/data)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-bench-out}
PY=.venv/bin/python
RETRO=.venv/bin/retro
mkdir -p "$W"
if [ ! -f "$W/full/manifest.json" ] || ! grep -q '"index"' "$W/full/manifest.json"; then
  /usr/bin/time -v $RETRO build-db examples/data/train.jsonl --out "$W/full" 2> >(tee "$W/build-db.time" >&2)
fi
$RETRO info "$W/full"
$PY bench/bench_retrieval.py --db "$W/full" --queries 2000 | tee "$W/retrieval.txt"
$PY bench/bench_leakage.py --db "$W/full" --test-docs 200 | tee "$W/leakage.txt"
$PY bench/bench_embed.py --db "$W/full" --chunks 512 | tee "$W/embed.txt"
$RETRO neighbors "$W/full" --input "$W/full" --out "$W/full-neighbors" --k 2 --exclude-same-doc
rm -rf "$W/train-small"
$RETRO train "$W/full" --neighbors "$W/full-neighbors" --out "$W/train-small" --config small \
  --seq-len 512 --batch-size 4 --steps 30 --warmup 5 --checkpoint-every 30 | tee "$W/train.txt"
$PY bench/bench_generate.py --db "$W/full" --model "$W/train-small" --new-tokens 512 | tee "$W/generate.txt"
