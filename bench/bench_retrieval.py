"""Retrieval quality and speed on a built DB: recall@k of `neighbors` vs exact brute-force search over
the same embeddings (the anchor, computed in this run), batch-neighbours throughput, and the DB's
per-stage build times from its manifest.

    .venv/bin/python bench/bench_retrieval.py --db DB [--queries 2000] [--ef 128]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from retrocli.options import NeighborOptions


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, float]:
    """Brute-force squared-L2 top-k, in blocks so memory stays small; returns ids and queries/s."""
    norms = (vectors**2).sum(1)
    out = np.empty((len(queries), k), dtype=np.int64)
    start = time.perf_counter()
    for s in range(0, len(queries), block):
        q = queries[s : s + block]
        d = norms[None, :] - 2 * q @ vectors.T + (q**2).sum(1)[:, None]
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.take_along_axis(d, part, axis=1).argsort(axis=1)
        out[s : s + block] = np.take_along_axis(part, order, axis=1)
    return out, len(queries) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ef", type=int, default=None, help="default: retrocli's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from retrocli.batch_neighbors import batch_neighbors
    from retrocli.db import load_embeddings, open_db
    from retrocli.index import ShardedIndex
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.options import DEFAULT_EF_SEARCH

    ef = args.ef or DEFAULT_EF_SEARCH
    db = open_db(args.db)
    vectors = load_embeddings(db)
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(db.num_chunks, size=min(args.queries, db.num_chunks), replace=False))
    queries = vectors[sample]
    exact, exact_qps = exact_top_k(vectors, queries, args.k)
    index = ShardedIndex(db, ef=ef)
    start = time.perf_counter()
    found, _ = index.search(queries, args.k, threads=1)
    hnsw_qps = len(queries) / (time.perf_counter() - start)
    recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, exact)])
    idx = db.manifest["index"]
    print(f"DB: {db.num_chunks:,} chunks, dim {vectors.shape[1]}, hnsw {idx['space']} M={idx['M']} "
          f"ef_construction={idx['ef_construction']}, {len(idx['shards'])} shard(s)")
    print(f"recall@{args.k} vs exact brute force ({len(queries)} sampled DB chunks as queries, ef={ef}): {recall:.4f}")
    print(f"search, 1 thread: hnsw {hnsw_qps:,.0f} q/s vs brute-force numpy {exact_qps:,.0f} q/s "
          f"(ratio {hnsw_qps / exact_qps:.1f})")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nb"
        start = time.perf_counter()
        batch_neighbors(db.path, [db.path], out, options=NeighborOptions(k=2, ef=ef, exclude_same_doc=True))
        seconds = time.perf_counter() - start
        ids = open_neighbors(out).ids
        print(f"batch neighbours of the whole DB (k=2, --exclude-same-doc): {db.num_chunks / seconds:,.0f} "
              f"chunks/s ({seconds:.1f}s), missing {(ids < 0).sum()}")
        shutil.rmtree(out)
    stages = db.manifest["stages"]
    print("build-db stage times: " + ", ".join(f"{name} {st.get('seconds', 0):.1f}s" for name, st in stages.items()))
    print(f"peak RSS of this benchmark: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
