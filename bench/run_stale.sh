#!/usr/bin/env bash
# Stale retrieval, measured on the full example DB: bpb fresh vs stale for the bundled model and for two
# equal short fine-tunes of it (one trained fresh, one with --stale-retrieval), then generation tokens/s
# fresh vs stale, here and through `retro serve`. One job at a time (2 cores).
# Usage: bash bench/run_stale.sh [WORKDIR] [STEPS]   (WORKDIR/full: a DB of examples/data/train.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-bench-out}
STEPS=${2:-150}
RETRO=.venv/bin/retro
PY=.venv/bin/python
BUNDLED=retrocli/assets/model
HELDOUT=examples/data/heldout.jsonl
[ -f "$W/full/manifest.json" ] || $RETRO build-db examples/data/train.jsonl --out "$W/full"
[ -f "$W/full-neighbors/manifest.json" ] && grep -q '"complete"' "$W/full-neighbors/manifest.json" || \
  $RETRO neighbors "$W/full" --input "$W/full" --out "$W/full-neighbors" --k 2 --exclude-same-doc --overwrite
for mode in fresh stale; do
  flag=""; [ "$mode" = stale ] && flag="--stale-retrieval"
  if [ ! -f "$W/ft-$mode/model.safetensors" ]; then
    rm -rf "$W/ft-$mode"
    # shellcheck disable=SC2086  # flag is empty or one word
    $RETRO train "$W/full" --neighbors "$W/full-neighbors" --out "$W/ft-$mode" --init-from "$BUNDLED" \
      --config scripts/bundled-model-copy-config.json --seq-len 512 --batch-size 4 --steps "$STEPS" --warmup 10 \
      --lr 3e-4 --retrieval-focus 0.5 --seed 2 --checkpoint-every "$STEPS" $flag
  fi
done
for model in "$BUNDLED" "$W/ft-fresh" "$W/ft-stale"; do
  name=$(basename "$model")
  $RETRO eval "$W/full" --test "$HELDOUT" --model "$model" --work-dir "$W/heldout" --stale-retrieval --no-leakage \
    --json > "$W/eval-stale-$name.json"
  $PY - "$W/eval-stale-$name.json" "$model" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:28s} bpb none {r['bpb_no_retrieval']:.4f}  fresh {r['bpb_retrieval']:.4f}  "
      f"stale {r['bpb_stale_retrieval']:.4f}  stale cost {100 * r['stale_retrieval_cost']:+.2f}%  "
      f"(fresh gain {100 * r['retrieval_gain']:.2f}%)")
EOF
done
$PY bench/bench_generate.py --db "$W/full" --model "$BUNDLED" --new-tokens 256 --stale --serve
