"""The demo's "after retro add" copy over every held-out page, not one: how reliably a model copies a page
that has just been added to the DB.

examples/demo.sh adds one held-out page to the DB and prompts with its first 7 chunks (448 tokens); the
retrieval for the 7th chunk then returns that chunk with its continuation, so the text to write next is in
the neighbours. One greedy continuation of one page is a noisy figure. This runs the same steps on a copy
of the DB with every held-out page of at least 8 chunks added, for each --model, and reports the longest
run each continuation shares with a retrieved chunk (the demo's "copied"), with and without retrieval, as
the mean over pages and the share of pages where the copy reaches 32 tokens. The first model is the anchor.

    .venv/bin/python bench/bench_demo_copy.py --db demo-out/db --heldout examples/subset/heldout.jsonl \
        --model retrocli/assets/model --model bundled-work/model [--k 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from retrocli.add import add_documents
from retrocli.db import open_db
from retrocli.generate import generate, longest_copy
from retrocli.retriever import LocalRetriever
from retrocli.sequences import pad_id

PROMPT_CHUNKS = 7  # as examples/demo.sh
NEW_TOKENS = 48
LONG_COPY = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="a DB without the held-out pages (the demo's)")
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--model", action="append", required=True, help="repeat; the first is the anchor")
    ap.add_argument("--k", type=int, default=None, help="neighbours fed (default: each model's own)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "db"
        shutil.copytree(args.db, db_path)
        add_documents(db_path, [args.heldout])
        db = open_db(db_path)
        m = db.chunk_size
        prompts = []
        for line in open(args.heldout, encoding="utf-8"):
            ids = db.tokenizer.encode_batch([json.loads(line)["text"]])[0]
            if len(ids) >= (PROMPT_CHUNKS + 1) * m:
                prompts.append(db.tokenizer.decode(ids[: PROMPT_CHUNKS * m]))
        retriever = LocalRetriever(db)  # one index and embedder for every generation
        results = []
        for model in args.model:
            copied, without = [], []
            for prompt in prompts:
                with_r = generate(None, prompt, model, NEW_TOKENS, temperature=0.0, k=args.k, retriever=retriever)
                plain = generate(None, prompt, model, NEW_TOKENS, temperature=0.0, k=args.k, retriever=retriever,
                                 retrieval=False)
                base = longest_copy(db.tokenizer, pad_id(db), plain.token_ids, with_r.retrievals)
                copied.append(with_r.copy.tokens if with_r.copy else 0)
                without.append(base.tokens if base else 0)
            copied, without = np.array(copied), np.array(without)
            results.append({"model": model, "pages": len(prompts), "mean_copied": float(copied.mean()),
                            "mean_without": float(without.mean()), "mean_gain": float((copied - without).mean()),
                            f"share_copied_{LONG_COPY}": float((copied >= LONG_COPY).mean()),
                            "copied": copied.tolist()})
    anchor = results[0]["mean_gain"]
    for res in results:
        res["gain_vs_anchor"] = res["mean_gain"] / anchor if anchor else None
    if args.json:
        print(json.dumps({"k": args.k, "new_tokens": NEW_TOKENS, "results": results}, indent=2))
        return
    print(f"{len(prompts)} held-out pages added, prompted with their first {PROMPT_CHUNKS} chunks, "
          f"{NEW_TOKENS} new tokens, k = {args.k or 'each model default'}")
    print(f"{'model':<40} {'copied':>7} {'without':>8} {'gain':>6} {'>= ' + str(LONG_COPY):>6} {'vs anchor':>10}")
    for res in results:
        ratio = f"{res['gain_vs_anchor']:.2f}x" if res["gain_vs_anchor"] is not None else "-"
        print(f"{res['model'][-40:]:<40} {res['mean_copied']:7.1f} {res['mean_without']:8.1f} "
              f"{res['mean_gain']:6.1f} {100 * res[f'share_copied_{LONG_COPY}']:5.0f}% {ratio:>10}")
    print("copied per page:", {Path(r["model"]).name: r["copied"] for r in results})


if __name__ == "__main__":
    main()
