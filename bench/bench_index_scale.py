"""ivfpq past the RAM wall, and what `retro add` does to it.

1. Drift: quantisers trained on the first 2/3 of the DB's vectors, then all of them added (what `retro
   add` does with 50 % more data), against quantisers trained on everything: recall@10 after re-ranking.
2. Scale: --vectors vectors (default 10.1M) made from the DB's real embeddings, each with perturbed copies
   (Gaussian noise of --noise times the median nearest-neighbour distance, renormalised), generated block
   by block from --seed into an fp16 memory map (as a DB stores them).
   - The anchor, on the first --anchor-vectors (default 1M) of them: hnswlib (M 32, ef_construction 200,
     searched at ef 128) and ivfpq (auto --nlist, each --nprobe) built over the same vectors, in this run.
   - ivfpq over all of them with each --nlist (default: auto, as `retro index` picks), searched at each
     --nprobe.
   Each: bytes a vector on disk and in RAM, build time, recall@10 against exact search (after re-ranking
   --rerank candidates on ivfpq), queries/s at batch 1 and 1,024 (re-ranking included). hnswlib is not
   built over all of them: at ≈ 1.9 KB a vector that is ≈ 19 GB of RAM and hours on 2 cores. Its queries/s
   only fall as it grows, so its figure at the anchor size bounds its figure at the full size from above.

    .venv/bin/python bench/bench_index_scale.py --db DB [--vectors 10100000] [--nlist 4096 16384] \
        [--nprobe 8 16 32 64] [--anchor-vectors 1000000] [--skip-drift] [--skip-scale]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_index_kinds import recall  # the same directory: run as bench/bench_index_scale.py


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


LOAD_RSS = """
import sys
from bench_index_kinds import rss_mb
from retrocli.index_kinds import load_shard
import faiss, hnswlib  # noqa: F401 - imported before the baseline
file, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = rss_mb()
shard = load_shard(__import__("pathlib").Path(file), kind, "l2", 384, n)
print((rss_mb() - before) * 2**20 / n)
"""


def loaded_ram(file: Path, kind: str, n: int) -> float:
    """Bytes a vector that loading the shard adds to a fresh process's RSS (in this process the build's
    freed pages would be reused and hide it)."""
    here = str(Path(__file__).parent)
    result = subprocess.run([sys.executable, "-c", LOAD_RSS, str(file), kind, str(n)], capture_output=True,
                            text=True, check=True, env={**os.environ, "PYTHONPATH": here})
    return float(result.stdout.strip().splitlines()[-1])


def build_ivfpq(array, n, nlist, pq_bytes, seed, threads, train_rows, work: Path) -> tuple[dict, object]:
    from retrocli.index_kinds import IvfPqParams, load_shard, read_rows, train_ivfpq, write_shard

    def read_block(a, b):
        return np.asarray(array[a:b], dtype=np.float32)

    out = {}
    start = time.perf_counter()
    sample = read_rows(read_block, train_rows, n)
    train_ivfpq(sample, "l2", IvfPqParams(nlist, pq_bytes, False, fast_scan=True), nlist, seed, threads,
                work / "trained.faiss")
    out["train_seconds"] = time.perf_counter() - start
    write_shard("ivfpq", read_block, 0, n, 0, work / "shard.faiss", "l2", 384, {}, threads,
                trained=work / "trained.faiss")
    out["build_seconds"] = time.perf_counter() - start
    out["disk_bytes_per_vector"] = (work / "shard.faiss").stat().st_size / n
    out["ram_bytes_per_vector"] = loaded_ram(work / "shard.faiss", "ivfpq", n)
    return out, load_shard(work / "shard.faiss", "ivfpq", "l2", 384, n)


def build_hnsw(array, n, threads, work: Path) -> tuple[dict, object]:
    from retrocli.index_kinds import load_shard, write_shard

    start = time.perf_counter()
    write_shard("hnsw", lambda a, b: np.asarray(array[a:b], dtype=np.float32), 0, n, 0, work / "shard.hnsw",
                "l2", 384, {"M": 32, "ef_construction": 200, "seed": 1}, threads)
    out = {"build_seconds": time.perf_counter() - start,
           "disk_bytes_per_vector": (work / "shard.hnsw").stat().st_size / n}
    out["ram_bytes_per_vector"] = loaded_ram(work / "shard.hnsw", "hnsw", n)
    return out, load_shard(work / "shard.hnsw", "hnsw", "l2", 384, n)


def searched(shard, array, queries, exact, width, rerank, threads) -> dict:
    """recall@10 and queries/s at batch 1 and 1,024; on ivfpq the top `rerank` are re-ranked exactly
    (0: the codes' order), as ShardedIndex does."""
    from retrocli.index import rerank_exact

    rows = Rows(array)

    def search(q):
        if shard.exact or not rerank:
            return shard.search(q, 10, width, threads)[0]
        candidates, _ = shard.search(q, rerank, width, threads)
        return rerank_exact(rows, "l2", q, candidates, 10)[0]

    out = {"recall@10": recall(search(queries), exact)}
    t = time.perf_counter()
    for q in queries[:100]:
        search(q[None, :])
    out["qps batch 1"] = 100 / (time.perf_counter() - t)
    batch = np.concatenate([queries] * (1024 // len(queries) + 1))[:1024]
    t = time.perf_counter()
    search(batch)
    out["qps batch 1024"] = 1024 / (time.perf_counter() - t)
    return out


def report(name: str, result: dict) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:,.4f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in result.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--vectors", type=int, default=10_100_000)
    parser.add_argument("--nlist", type=int, nargs="+", help="lists of the full-size index (default: auto)")
    parser.add_argument("--pq-bytes", type=int, default=48)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--rerank", type=int, default=100)
    parser.add_argument("--anchor-vectors", type=int, default=1_000_000, help="0: no hnswlib anchor")
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
        drift = {}
        for name, trained_on in (("everything", n), ("added", first)):
            _, shard = build_ivfpq(real, n, nlist, args.pq_bytes, 1, 1, train_sample_rows(trained_on, nlist, 1), work)
            drift[name] = [searched(shard, real, queries, exact, 128, rerank, 1)["recall@10"] for rerank in (0, 100)]
        print(f"drift ({n:,} vectors, nlist {nlist}, PQ{args.pq_bytes}): trained on all: "
              f"recall@10 {drift['everything'][0]:.4f} raw / {drift['everything'][1]:.4f} "
              f"re-ranked; trained on the first {first:,} then the other {n - first:,} added: "
              f"{drift['added'][0]:.4f} / {drift['added'][1]:.4f}", flush=True)
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

    anchor_n = min(args.anchor_vectors, total)
    if anchor_n:
        queries = np.asarray(vectors[np.sort(rng.choice(anchor_n, args.queries, replace=False))], dtype=np.float32)
        exact = exact_top_k(read_block, anchor_n, queries, 10)
        built, shard = build_hnsw(vectors, anchor_n, args.threads, work)
        anchor = {**built, **searched(shard, vectors, queries, exact, 128, 0, 1)}
        report(f"anchor: hnsw over the first {anchor_n:,}", anchor)
        del shard
        nlist = auto_nlist(anchor_n)
        built, shard = build_ivfpq(vectors, anchor_n, nlist, args.pq_bytes, 1, args.threads,
                                   train_sample_rows(anchor_n, nlist, 1), work)
        report(f"ivfpq over the first {anchor_n:,} (nlist {nlist}): built", built)
        print(f"  against the anchor: RAM {built['ram_bytes_per_vector'] / anchor['ram_bytes_per_vector']:.3f}×",
              flush=True)
        for nprobe in args.nprobe:
            result = searched(shard, vectors, queries, exact, nprobe, args.rerank, 1)
            report(f"  nprobe {nprobe}, re-ranked", result)
            print(f"    against the anchor: q/s batch 1 {result['qps batch 1'] / anchor['qps batch 1']:.2f}×, "
                  f"batch 1024 {result['qps batch 1024'] / anchor['qps batch 1024']:.2f}×", flush=True)
        del shard

    queries = np.asarray(vectors[np.sort(rng.choice(total, args.queries, replace=False))], dtype=np.float32)
    start = time.perf_counter()
    exact = exact_top_k(read_block, total, queries, 10)
    print(f"scale: {total:,} vectors ({n:,} real + perturbed copies, noise σ={sigma:.4f}); exact search of "
          f"{args.queries} queries {time.perf_counter() - start:.0f} s", flush=True)
    for nlist in args.nlist or [auto_nlist(total)]:
        built, shard = build_ivfpq(vectors, total, nlist, args.pq_bytes, 1, args.threads,
                                   train_sample_rows(total, nlist, 1), work)
        report(f"ivfpq over {total:,} (nlist {nlist}): built", built)
        for nprobe in args.nprobe:
            result = {**searched(shard, vectors, queries, exact, nprobe, 0, 1),
                      **{f"{k}, re-ranked": v for k, v in
                         searched(shard, vectors, queries, exact, nprobe, args.rerank, 1).items()}}
            report(f"  nprobe {nprobe}", result)
            if anchor_n:
                print(f"    against the anchor's at {anchor_n:,}: batch 1 "
                      f"{result['qps batch 1, re-ranked'] / anchor['qps batch 1']:.2f}×, batch 1024 "
                      f"{result['qps batch 1024, re-ranked'] / anchor['qps batch 1024']:.2f}×", flush=True)
        del shard
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(the vectors are a {total * 384 * 2 / 2**30:.1f} GiB fp16 memory map in the page cache, not counted)")


if __name__ == "__main__":
    main()
