"""Retrieval cost against batch size, per query chunk: (a) embedding the query chunks with the DB's BERT,
(b) the HNSW search and (c) gathering the neighbours' [N, F] tokens and text as the server answers them
(token rows read in blocks, each block once per batch, none cached from before), for batches of 1, 2, 4 …
1024 query chunks; beside it (d) the model decoding one chunk (m tokens) for as many sequences, per
sequence. The anchor is batch size 1 of each, measured in the same run: a ratio below 1 means batching
pays. Prints a table and draws a PNG.

    .venv/bin/python bench/bench_retrieval_batch.py --db bench-out/full [--model bundled] \
        [--png docs/retrieval_batch.png] [--max-batch 1024] [--model-max-batch 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def timed(fn, min_seconds: float, min_repeats: int = 2) -> float:
    """Best-of-repeats seconds of one call (repeats until min_seconds have passed)."""
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_repeats or spent < min_seconds:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--model", default=None, help="Model directory (default: the bundled model)")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--model-max-batch", type=int, default=256,
                        help="Largest batch for the model's decoding timing (it is the slow part)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="Time each point for at least this long")
    parser.add_argument("--png", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from retrocli.db import open_db
    from retrocli.model.checkpoint import load_model
    from retrocli.neighbors import TokenRows
    from retrocli.retriever import LocalRetriever
    from retrocli.sequences import neighbor_rows

    db = open_db(args.db)
    retriever = LocalRetriever(db)
    model, _ = load_model(args.model, db)
    rng = np.random.default_rng(args.seed)
    sample = rng.choice(db.num_chunks, size=min(args.max_batch, db.num_chunks), replace=False)
    texts = [db.chunk_text(int(c)) for c in sample]
    retriever.embedder.embed(texts[:8])  # warm-up: weights paged in, kernels chosen
    sizes = [1 << i for i in range(11) if 1 << i <= args.max_batch]
    m = db.chunk_size
    full = next(int(c) for c in sample if int(db.chunk_length[int(c)]) == m)
    prompt_row = db.chunk_tokens(full)[:m]
    fixed_rows = neighbor_rows(db, retriever.index.search(retriever.embedder.embed([texts[0]]), args.k)[0][0],
                               retriever.pad)
    rows = []
    for size in sizes:
        batch = texts[:size]
        vectors = retriever.embedder.embed(batch)
        ids, _ = retriever.index.search(vectors, args.k)
        t_embed = timed(lambda b=batch: retriever.embedder.embed(b), args.min_seconds)
        t_search = timed(lambda v=vectors: retriever.index.search(v, args.k), args.min_seconds)
        dists = np.zeros(ids.shape, dtype=np.float32)

        def gather(i=ids, d=dists, b=batch):  # cold: a fresh block cache, each block read once per batch
            retriever.token_rows = TokenRows(db)
            return retriever.gather(b, i, d, args.k)

        t_gather = timed(gather, args.min_seconds)
        t_model = None
        if size <= args.model_max_batch:  # one full chunk of prompt per sequence, its neighbours fixed
            prompt = torch.tensor(np.tile(prompt_row, (size, 1)))
            t_model = timed(lambda p=prompt: model.generate(p, m, lambda chunk: fixed_rows, temperature=0),
                            args.min_seconds, 1)
        rows.append((size, t_embed / size, t_search / size, t_gather / size,
                     None if t_model is None else t_model / size))
        print(f"batch {size:5d}: embed {1000 * t_embed / size:8.3f} ms/query  search {1000 * t_search / size:7.3f}"
              f"  gather {1000 * t_gather / size:7.3f}"
              + ("" if t_model is None else f"  model, one chunk per sequence {1000 * t_model / size:8.2f} ms"),
              flush=True)

    base = rows[0]
    print(f"\nDB {db.num_chunks:,} chunks, k={args.k}, {torch.get_num_threads()} threads; model "
          f"{model.num_parameters() / 1e6:.1f}M params decoding {m} tokens with k neighbours (KV cache)")
    print("| batch | embed ms/query | search ms/query | gather ms/query | retrieval ms/query | vs batch 1 "
          "| model ms/sequence/chunk | vs batch 1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, e, s, g, mdl in rows:
        total, base_total = e + s + g, base[1] + base[2] + base[3]
        model_cells = "– | –" if mdl is None else f"{1000 * mdl:.2f} | {mdl / base[4]:.3f}"
        print(f"| {size} | {1000 * e:.3f} | {1000 * s:.3f} | {1000 * g:.3f} | {1000 * total:.3f} | "
              f"{total / base_total:.3f} | {model_cells} |")

    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = [r[0] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for col, label in ((1, "embed query chunks (BERT)"), (2, "HNSW search"), (3, "gather [N, F] tokens")):
            ax.plot(x, [1000 * r[col] for r in rows], marker="o", label=label)
        ax.plot(x, [1000 * (r[1] + r[2] + r[3]) for r in rows], marker="s", color="black", label="retrieval, total")
        mx = [r[0] for r in rows if r[4] is not None]
        ax.plot(mx, [1000 * r[4] for r in rows if r[4] is not None], marker="^", linestyle="--",
                label=f"model: decode {m} tokens with {args.k} neighbours, per sequence")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (query chunks / sequences)")
        ax.set_ylabel("ms per query chunk (per sequence for the model)")
        ax.set_title(f"Retrieval cost per query vs batch size ({db.num_chunks:,}-chunk DB, CPU)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center", bbox_to_anchor=(0.5, 0.68))  # in the empty band between the curves
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"plot → {args.png}")


if __name__ == "__main__":
    main()
