"""Rank held-out prompts by how much retrieved text the model copies into its continuation.

How the demo's generation prompt was chosen (examples/demo.sh records the winner). For every held-out page
and every window of PROMPT_CHUNKS chunks:
  1. retrieve the neighbours of the window's last chunk, as `retro generate` will, and measure the longest
     run the page's true next chunk shares with them (the text there is to copy);
  2. for the --candidates windows with the longest such runs, generate greedily with and without
     retrieval, and measure each continuation's longest run shared with the neighbours retrieved
     while generating (`retro generate`'s "copied" line).
The table lists both; "gain" is with minus without, so text the model would write anyway (common phrases,
the prompt's own words) does not count as copied.

    .venv/bin/python scripts/pick_demo_prompt.py --db demo-out/db --heldout examples/subset/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from retrocli.db import open_db
from retrocli.embed import db_embedder
from retrocli.generate import generate, longest_copy
from retrocli.index import ShardedIndex
from retrocli.model.checkpoint import bundled_model_dir
from retrocli.options import SamplingOptions
from retrocli.overlap import NEIGHBOR_PAD, QUERY_PAD, longest_runs
from retrocli.sequences import neighbor_rows, pad_id

PROMPT_CHUNKS = 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--model", default=str(bundled_model_dir()))
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=2)
    args = ap.parse_args()

    db = open_db(args.db)
    m = db.chunk_size
    docs = [json.loads(line)["text"] for line in open(args.heldout, encoding="utf-8")]
    windows = []  # (doc, first chunk, char from, char to, last prompt chunk text, next chunk ids)
    for d, text in enumerate(docs):
        ids = db.tokenizer.encode_batch([text])[0]
        for s in range(0, len(ids) // m - PROMPT_CHUNKS):
            end = (s + PROMPT_CHUNKS) * m
            start_char = len(db.tokenizer.decode(ids[: s * m]))
            end_char = len(db.tokenizer.decode(ids[:end]))
            windows.append((d, s, start_char, end_char, db.tokenizer.decode(ids[end - m : end]), ids[end : end + m]))
    vectors = db_embedder(db).embed([w[4] for w in windows])
    nb_ids, _ = ShardedIndex(db).search(vectors, args.k)
    targets = neighbor_rows(db, nb_ids, NEIGHBOR_PAD)
    queries = np.full((len(windows), m), QUERY_PAD, dtype=np.int64)
    for i, w in enumerate(windows):
        queries[i, : len(w[5])] = w[5]
    runs, *_ = longest_runs(queries, np.array([len(w[5]) for w in windows]), targets)
    order = np.argsort(-runs, kind="stable")[: args.candidates]

    rows = []
    for i in order:
        d, s, a, b, _, _ = windows[i]
        prompt = docs[d][a:b]
        with_r = generate(
            db, prompt, args.model, k=args.k,
            sampling=SamplingOptions(max_new_tokens=args.new_tokens, temperature=0.0),
        )
        without = generate(
            db, prompt, args.model, k=args.k, retrieval=False,
            sampling=SamplingOptions(max_new_tokens=args.new_tokens, temperature=0.0),
        )
        # the no-retrieval continuation scored against the neighbours the retrieval run saw
        base = longest_copy(db.tokenizer, pad_id(db), without.token_ids, with_r.retrievals)
        copied = with_r.copy.tokens if with_r.copy else 0
        rows.append((copied - (base.tokens if base else 0), copied, base.tokens if base else 0, int(runs[i]), d,
                     a, b, with_r.copy.text if with_r.copy else ""))
    rows.sort(key=lambda r: (-r[0], -r[1]))
    print("gain  copied  without  next-chunk-run  doc  chars        copied text")
    for gain, copied, base, run, d, a, b, text in rows:
        print(f"{gain:4d}  {copied:6d}  {base:7d}  {run:14d}  {d:3d}  {a}-{b}  {text[:70]!r}")


if __name__ == "__main__":
    main()
