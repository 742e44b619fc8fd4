"""Generation speed: tokens/s with and without retrieval, retrieval cost per chunk (ms and share of
generation time), and KV-cached decoding vs recomputing the whole window every token (what
RETRO-pytorch's generate does) — the anchor, measured in the same run.

    .venv/bin/python bench/bench_generate.py --db DB --model MODEL_DIR [--new-tokens 512]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from retrocli.db import open_db
    from retrocli.embed import db_embedder
    from retrocli.generate import generate
    from retrocli.index import ShardedIndex
    from retrocli.model.checkpoint import load_model
    from retrocli.sequences import neighbor_rows, pad_id

    db = open_db(args.db)
    model, _ = load_model(args.model, db)
    prompt = db.document_text(0)[:400]
    n = args.new_tokens

    start = time.perf_counter()
    plain = generate(db, prompt, args.model, max_new_tokens=n, temperature=0, retrieval=False)
    t_plain = time.perf_counter() - start

    retrieval_seconds = []
    index, embedder = ShardedIndex(db), db_embedder(db)
    embedder.embed(["warm-up"])
    start = time.perf_counter()
    with_retrieval = generate(db, prompt, args.model, max_new_tokens=n, temperature=0,
                              on_retrieval=lambda rec: None)
    t_retr = time.perf_counter() - start
    # time the retrieval step alone on the same chunks: embed + search + [N, F] tokens
    for rec in with_retrieval.retrievals:
        s = time.perf_counter()
        ids, _ = index.search(embedder.embed([rec.chunk_text]), model.config.num_neighbors)
        neighbor_rows(db, ids[0], pad_id(db))
        retrieval_seconds.append(time.perf_counter() - s)
    per_chunk_ms = 1000 * sum(retrieval_seconds) / max(1, len(retrieval_seconds))

    prompt_ids = torch.tensor(db.tokenizer.encode_batch([prompt])[0])
    start = time.perf_counter()
    cached = model.generate(prompt_ids, n, None, temperature=0, use_cache=True)
    t_cached = time.perf_counter() - start
    start = time.perf_counter()
    full = model.generate(prompt_ids, n, None, temperature=0, use_cache=False)
    t_full = time.perf_counter() - start

    print(f"model: {model.num_parameters() / 1e6:.1f}M params, seq_len {model.config.seq_len}, "
          f"k={model.config.num_neighbors}; prompt {len(prompt_ids)} tokens, {n} new tokens, greedy")
    print(f"generate without retrieval: {n / t_plain:6.1f} tokens/s")
    print(f"generate with retrieval:    {n / t_retr:6.1f} tokens/s  ({len(with_retrieval.retrievals)} retrievals)")
    print(f"retrieval per chunk: {per_chunk_ms:.1f} ms (embed + HNSW search + [N, F] tokens); "
          f"{100 * sum(retrieval_seconds) / t_retr:.0f}% of generation time with retrieval")
    print(f"KV cache vs full recomputation per token (anchor, no retrieval): {n / t_cached:.1f} vs "
          f"{n / t_full:.1f} tokens/s, ratio {t_full / t_cached:.1f}; same tokens: {torch.equal(cached, full)}")
    print(f"text differs with retrieval vs without: {plain.text != with_retrieval.text}")


if __name__ == "__main__":
    main()
