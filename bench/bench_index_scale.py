"""ivfpq past the RAM wall, and what `retro add` does to it.

1. Drift: quantisers trained on the first 2/3 of the DB's vectors, then all of them added (what `retro
   add` does with 50 % more data), against quantisers trained on everything: recall@10 after re-ranking.
2. Scale: an ivfpq index over --vectors vectors (default 10.1M) made from the DB's real embeddings, each
   with --copies perturbed copies (Gaussian noise of --noise times the median nearest-neighbour distance,
   renormalised), generated block by block from --seed into an fp16 memory map (as a DB stores them): bytes a vector on
   disk and in RAM, build time, peak RSS, recall@10 against exact search, queries/s at batch 1 and 1,024.
   hnswlib is not built at this size here (≈ 19 GB of RAM and hours on 2 cores); its figures scale
   linearly from bench_index_kinds.py.

    .venv/bin/python bench/bench_index_scale.py --db DB [--vectors 10100000] [--nlist 4096] [--skip-scale]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_index_kinds import recall, rss_mb  # the same directory: run as bench/bench_index_scale.py


def exact_top_k(read_block, n, queries, k, block=262_144):
    """Exact squared-L2 top-k over n vectors read block by block."""
    best_d = np.full((len(queries), k), np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    qn = (queries**2).sum(1)[:, None]
    for start in range(0, n, block):
        vectors = read_block(start, min(n, start + block))
        d = (vectors**2).sum(1)[None, :] - 2 * queries @ vectors.T + qn
        ids = np.broadcast_to(np.arange(start, start + len(vectors)), d.shape)
        all_d, all_i = np.concatenate([best_d, d], 1), np.concatenate([best_i, ids], 1)
        part = np.argpartition(all_d, k, axis=1)[:, :k]
        best_d, best_i = np.take_along_axis(all_d, part, 1), np.take_along_axis(all_i, part, 1)
    order = np.argsort(best_d, axis=1)
    return np.take_along_axis(best_i, order, 1)


class Rows:
    """VectorRows' interface over an array (or memory map) of every vector: re-ranking reads only its rows."""

    def __init__(self, array):
        self.array = array

    def take(self, ids):
        flat = ids.reshape(-1)
        order = np.argsort(flat)  # a memory map reads sorted rows faster
        rows = np.empty((len(flat), self.array.shape[1]), dtype=np.float32)
        rows[order] = self.array[flat[order]]
        return rows.reshape(*ids.shape, -1)


def build_and_search(array, n, queries, exact, nlist, pq_bytes, seed, threads, train_rows, work: Path,
                     rerank=100, nprobe=128):
    from retrocli.index import rerank_exact
    from retrocli.index_kinds import IvfPqParams, load_shard, read_rows, train_ivfpq, write_shard

    def read_block(a, b):
        return np.asarray(array[a:b], dtype=np.float32)

    out = {}
    start = time.perf_counter()
    sample = read_rows(read_block, train_rows, n)
    train_ivfpq(sample, "l2", IvfPqParams(nlist, pq_bytes, False), nlist, seed, threads, work / "trained.faiss")
    out["train_seconds"] = time.perf_counter() - start
    write_shard("ivfpq", read_block, 0, n, 0, work / "shard.faiss", "l2", 384, {}, threads,
                trained=work / "trained.faiss")
    out["build_seconds"] = time.perf_counter() - start
    out["disk_bytes_per_vector"] = (work / "shard.faiss").stat().st_size / n
    before = rss_mb()
    shard = load_shard(work / "shard.faiss", "ivfpq", "l2", 384, n)
    out["ram_bytes_per_vector"] = (rss_mb() - before) * 2**20 / n
    rows = Rows(array)
    found, _ = shard.search(queries, 10, nprobe, threads)
    out["recall@10 rerank=0"] = recall(found, exact)
    candidates, _ = shard.search(queries, rerank, nprobe, threads)
    found, _ = rerank_exact(rows, "l2", queries, candidates, 10)
    out[f"recall@10 rerank={rerank}"] = recall(found, exact)
    t = time.perf_counter()
    for q in queries[:100]:
        candidates, _ = shard.search(q[None, :], rerank, nprobe, 1)
        rerank_exact(rows, "l2", q[None, :], candidates, 10)
    out["qps batch 1 (1 thread, incl. rerank)"] = 100 / (time.perf_counter() - t)
    batch = np.concatenate([queries] * (1024 // len(queries) + 1))[:1024]
    t = time.perf_counter()
    shard.search(batch, rerank, nprobe, threads)
    out["qps batch 1024 (search only)"] = 1024 / (time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--vectors", type=int, default=10_100_000)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--pq-bytes", type=int, default=48)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-drift", action="store_true")
    args = parser.parse_args()

    from retrocli.db import load_embeddings, open_db
    from retrocli.index_kinds import auto_nlist, train_sample_rows

    db = open_db(args.db)
    real = load_embeddings(db)
    n = len(real)
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="retro-scale-"))
    if not args.skip_drift:
        queries = real[rng.choice(n, 1000, replace=False)]
        exact = exact_top_k(lambda a, b: real[a:b], n, queries, 10)
        nlist = auto_nlist(n)
        first = (2 * n) // 3
        everything = build_and_search(real, n, queries, exact, nlist, args.pq_bytes, 1, 1,
                                      train_sample_rows(n, nlist, 1), work)
        added = build_and_search(real, n, queries, exact, nlist, args.pq_bytes, 1, 1,
                                 train_sample_rows(first, nlist, 1), work)
        print(f"drift ({n:,} vectors, nlist {nlist}, PQ{args.pq_bytes}): trained on all: "
              f"recall@10 {everything['recall@10 rerank=0']:.4f} raw / {everything['recall@10 rerank=100']:.4f} "
              f"re-ranked; trained on the first {first:,} then the other {n - first:,} added: "
              f"{added['recall@10 rerank=0']:.4f} / {added['recall@10 rerank=100']:.4f}", flush=True)
    if args.skip_scale:
        return
    # perturbed copies: noise on the scale of the real nearest-neighbour distances
    sample = real[rng.choice(n, 512, replace=False)]
    nearest = exact_top_k(lambda a, b: real[a:b], n, sample, 2)[:, 1]
    sigma = args.noise * float(np.median(np.linalg.norm(real[nearest] - sample, axis=1))) / np.sqrt(real.shape[1])
    total = args.vectors

    # written once as fp16 (as a DB stores embeddings) to a memory map: re-ranking reads rows from it
    store = work / "vectors.f16"
    vectors = np.lib.format.open_memmap(store, mode="w+", dtype=np.float16, shape=(total, real.shape[1]))
    t = time.perf_counter()
    for start in range(0, total, 65536):
        stop = min(total, start + 65536)
        gen = np.random.default_rng([args.seed, start // 65536])
        rows = real[np.arange(start, stop) % n]
        copies = np.arange(start, stop) >= n
        rows = rows + copies[:, None] * sigma * gen.standard_normal(rows.shape, dtype=np.float32)
        vectors[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    vectors.flush()
    print(f"scale: wrote {total:,} fp16 vectors in {time.perf_counter() - t:.0f} s", flush=True)

    def read_block(a, b):
        return np.asarray(vectors[a:b], dtype=np.float32)

    queries = np.asarray(vectors[np.sort(rng.choice(total, args.queries, replace=False))], dtype=np.float32)
    start = time.perf_counter()
    exact = exact_top_k(read_block, total, queries, 10)
    print(f"scale: {total:,} vectors ({n:,} real + perturbed copies, noise σ={sigma:.4f}); exact search of "
          f"{args.queries} queries {time.perf_counter() - start:.0f} s", flush=True)
    result = build_and_search(vectors, total, queries, exact, args.nlist, args.pq_bytes, 1, args.threads,
                              train_sample_rows(total, args.nlist, 1), work)
    for key, value in result.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(the vectors are a {total * 384 * 2 / 2**30:.1f} GiB fp16 memory map in the page cache, not counted)")


if __name__ == "__main__":
    main()
