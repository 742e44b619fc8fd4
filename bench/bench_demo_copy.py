"""The demo's "after retro add" copy over every held-out page, not one: how reliably a model copies a page
that has just been added to the DB.

examples/demo.sh adds one held-out page to the DB and prompts with its first 7 chunks (448 tokens); the
retrieval for the 7th chunk then returns that chunk with its continuation, so the text to write next is in
the neighbours. One greedy continuation of one page is a noisy figure. This runs the same steps on a copy
of the DB with every held-out page of at least 8 chunks added, for each --model, and reports the longest
run each continuation shares with a retrieved chunk (the demo's "copied"), with and without retrieval, as
the mean over pages and the share of pages where the copy reaches 32 tokens. The first model is the anchor.

The longest run hangs on single greedy choices, so each model is also scored teacher-forced on the same
pages' 8th chunk (the text the added page holds next): mean p(next token) with and without retrieval, the
share of the mass the copy head leaves to the LM (its sink), top-1 accuracy, the tokens predicted right
before the first miss, and why each miss happened: the LM's choice outweighed the copy of the right token,
or the copy head itself favoured another token.

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
import torch

from retrocli.add import add_documents
from retrocli.db import open_db
from retrocli.generate import generate, longest_copy
from retrocli.model.checkpoint import load_model
from retrocli.options import SamplingOptions
from retrocli.retriever import LocalRetriever
from retrocli.sequences import pad_id

PROMPT_CHUNKS = 7  # as examples/demo.sh
NEW_TOKENS = 48
LONG_COPY = 32


def teacher_forced(db, retriever, model_dir: str, pages: list[list[int]], k: int | None) -> dict:
    """Score each page's chunk PROMPT_CHUNKS (its neighbours: the page's own previous chunk and this one)."""
    model, _ = load_model(Path(model_dir), db)
    model.eval()
    k = k or model.config.num_neighbors
    m = db.chunk_size
    last = {}  # the copy head's CopyWeights in the last forward with retrieval: its split of the mass
    head_weights = model.copy_head.weights if model.copy_head is not None else None

    def recording_weights(*args, **kwargs):
        last["weights"] = head_weights(*args, **kwargs)
        return last["weights"]

    if head_weights is not None:
        model.copy_head.weights = recording_weights
    p_with, p_without, sink, top1, first_miss = [], [], [], [], []
    misses = {"lm_overrules": 0, "copies_another_token": 0}
    at = torch.arange(PROMPT_CHUNKS * m - 1, (PROMPT_CHUNKS + 1) * m - 1)  # positions predicting the chunk
    for ids in pages:
        got = retriever.retrieve([ids[u * m: (u + 1) * m] for u in range(PROMPT_CHUNKS + 1)], k)
        idx = torch.tensor([ids])
        with torch.no_grad():
            log_p, _ = model(idx, torch.from_numpy(np.stack([g.rows for g in got]))[None])
            log_p_lm, _ = model(idx, None)
        if model.copy_head is None:
            log_p, log_p_lm = torch.log_softmax(log_p, -1), torch.log_softmax(log_p_lm, -1)
        target = idx[0, at + 1]
        p_with.append(log_p[0, at].gather(-1, target[:, None]).exp().mean().item())
        p_without.append(log_p_lm[0, at].gather(-1, target[:, None]).exp().mean().item())
        hits = (log_p[0, at].argmax(-1) == target).numpy()
        top1.append(hits.mean())
        first_miss.append(int(np.argmin(hits)) if not hits.all() else len(hits))
        if last:  # copy positions start at m-1, one block of m per chunk
            offset = at - (m - 1)
            w = last["weights"]
            sink.append(w.sink[offset // m, offset % m].mean().item())
            for i in np.flatnonzero(~hits):
                # a miss: either the copy head's favourite token (its weights pooled by the token they give)
                # is not the page's, or the LM's own choice outweighed the copy of the right one
                block, row = int(offset[i]) // m, int(offset[i]) % m
                pooled = torch.zeros(log_p.shape[-1], dtype=w.copy.dtype).index_add_(
                    0, w.next_ids[block], w.copy[block, row])
                wrong = pooled.argmax().item() != target[i].item() and pooled.max() > pooled[target[i]]
                misses["copies_another_token" if wrong else "lm_overrules"] += 1
    return {"p_next_with": float(np.mean(p_with)), "p_next_without": float(np.mean(p_without)),
            "lm_share": float(np.mean(sink)) if sink else None, "top1": float(np.mean(top1)),
            "right_before_first_miss": float(np.mean(first_miss)), "misses": misses if last else None}


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
        prompts, pages = [], []
        for line in open(args.heldout, encoding="utf-8"):
            ids = db.tokenizer.encode_batch([json.loads(line)["text"]])[0]
            if len(ids) >= (PROMPT_CHUNKS + 1) * m:
                prompts.append(db.tokenizer.decode(ids[: PROMPT_CHUNKS * m]))
                pages.append(ids[: (PROMPT_CHUNKS + 1) * m])
        retriever = LocalRetriever(db)  # one index and embedder for every generation
        results = []
        for model in args.model:
            copied, without = [], []
            for prompt in prompts:
                with_r = generate(
                    None, prompt, model, k=args.k, retriever=retriever,
                    sampling=SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0.0),
                )
                plain = generate(
                    None, prompt, model, k=args.k, retriever=retriever, retrieval=False,
                    sampling=SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0.0),
                )
                base = longest_copy(db.tokenizer, pad_id(db), plain.token_ids, with_r.retrievals)
                copied.append(with_r.copy.tokens if with_r.copy else 0)
                without.append(base.tokens if base else 0)
            copied, without = np.array(copied), np.array(without)
            results.append({"model": model, "pages": len(prompts), "mean_copied": float(copied.mean()),
                            "mean_without": float(without.mean()), "mean_gain": float((copied - without).mean()),
                            f"share_copied_{LONG_COPY}": float((copied >= LONG_COPY).mean()),
                            "copied": copied.tolist(), **teacher_forced(db, retriever, model, pages, args.k)})
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
    print(f"teacher-forced on each page's chunk {PROMPT_CHUNKS + 1}:")
    print(f"{'model':<40} {'p(next)':>8} {'no retr.':>9} {'LM share':>9} {'top-1':>6} {'to 1st miss':>12} "
          f"{'misses: LM overrules / copies another token':>44}")
    for res in results:
        share = f"{res['lm_share']:.3f}" if res["lm_share"] is not None else "-"
        misses = f"{res['misses']['lm_overrules']} / {res['misses']['copies_another_token']}" if res["misses"] else "-"
        print(f"{res['model'][-40:]:<40} {res['p_next_with']:8.3f} {res['p_next_without']:9.3f} {share:>9} "
              f"{res['top1']:6.3f} {res['right_before_first_miss']:12.1f} {misses:>44}")


if __name__ == "__main__":
    main()
