"""Index kinds side by side on one embedded DB: bytes a vector on disk and in RAM, build time and peak RSS,
recall@10 against exact search (after re-ranking), queries/s at batch 1 and 1,024, and recall with 1, 10
and 50 % of the DB excluded. The anchor is hnswlib (`--kind hnsw`, the DB's default), measured in the
same run; every build and every search runs in its own process so RSS is its own.

    .venv/bin/python bench/bench_index_kinds.py --db DB [--queries 1000] [--work bench-out/kinds]

Queries are DB chunks drawn with --seed (each finds itself first, as in bench_retrieval.py). usearch's
HNSW over int8 and ScaNN (tree + 96-byte asymmetric hashing, re-ranked as retrocli re-ranks) are measured
as candidates when their packages are installed (`pip install usearch scann protobuf`); they are not
retrocli kinds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "hnsw": ["--kind", "hnsw"],
    "ivfpq-48": ["--kind", "ivfpq", "--pq-bytes", "48"],
    "ivfpq-48-opq": ["--kind", "ivfpq", "--pq-bytes", "48", "--opq"],
    "ivfpq-32": ["--kind", "ivfpq", "--pq-bytes", "32"],
    "ivfpq-96": ["--kind", "ivfpq", "--pq-bytes", "96"],
}
RERANKS = (0, 50, 100, 200)
EXCLUDED = (0.01, 0.10, 0.50)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def exact_top_k(vectors, queries, k, allowed=None, block=128):
    norms = (vectors**2).sum(1)
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), block):
        q = queries[s : s + block]
        d = norms[None, :] - 2 * q @ vectors.T + (q**2).sum(1)[:, None]
        if allowed is not None:
            d[:, ~allowed] = np.inf
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.take_along_axis(d, part, axis=1).argsort(axis=1)
        out[s : s + block] = np.take_along_axis(part, order, axis=1)
    return out


def recall(found, exact):
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found, exact)]))


def build(db: Path, work: Path, name: str, threads: int) -> dict:
    """Copy the DB without its index, build the kind in a child process; its wall time and peak RSS."""
    target = work / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(db, target, ignore=shutil.ignore_patterns("index", "*.lock"))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.pop("index", None)
    manifest["stages"].pop("index", None)
    (target / "manifest.json").write_text(json.dumps(manifest))
    retro = Path(sys.executable).with_name("retro")
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", str(retro), "index", str(target), *CONFIGS[name],
                          "--threads", str(threads)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    seconds = time.perf_counter() - start
    peak = int(out.stderr.strip().splitlines()[-1]) / 1024
    index = json.loads((target / "manifest.json").read_text())["index"]
    files = [*index["shards"], *([index["trained"]] if "trained" in index else [])]
    return {"path": str(target), "seconds": seconds, "peak_rss_mb": peak,
            "disk_bytes": sum(int(f["bytes"]) for f in index["shards"]),
            "trained_bytes": sum(int(f["bytes"]) for f in files) - sum(int(f["bytes"]) for f in index["shards"])}


def search_child(path: str, queries_file: str, exact_file: str, threads: int) -> dict:
    """In its own process: load the index, then recall, speed and filtered recall."""
    import faiss  # noqa: F401  (the libraries' own code is not the index's RAM)
    import hnswlib  # noqa: F401

    from retrocli.db import load_embeddings, open_db
    from retrocli.index import ShardedIndex

    queries, exact = np.load(queries_file), np.load(exact_file)
    db = open_db(path)
    before = rss_mb()
    index = ShardedIndex(db)
    loaded = rss_mb() - before
    out = {"index_ram_mb": loaded, "ram_bytes_per_vector": loaded * 2**20 / db.num_chunks}
    reranks = RERANKS if not index.exact else (0,)
    for rerank in reranks:
        index.rerank = rerank
        found, _ = index.search(queries, 10, threads=threads)
        out[f"recall@10 rerank={rerank}"] = recall(found, exact)
    index.rerank = 0 if index.exact else int(db.manifest["index"]["rerank"])
    out["rss_with_rerank_cache_mb"] = rss_mb() - before
    single = queries[:200]
    start = time.perf_counter()
    for q in single:
        index.search(q[None, :], 10, threads=1)
    out["qps batch 1"] = len(single) / (time.perf_counter() - start)
    batch = np.concatenate([queries] * (1024 // len(queries) + 1))[:1024]
    start = time.perf_counter()
    index.search(batch, 10, threads=threads)
    out["qps batch 1024"] = 1024 / (time.perf_counter() - start)
    vectors = load_embeddings(db)
    rng = np.random.default_rng(1)
    for share in EXCLUDED:
        excluded = rng.random(db.num_chunks) < share
        index.removed, index.allowed = excluded, ~excluded
        for number, (shard, start_chunk, _) in index.loaded.items():
            index.loaded[number] = (shard, start_chunk, int(excluded[start_chunk : start_chunk + shard.count].sum()))
        found, _ = index.search(queries, 10, threads=threads)
        truth = exact_top_k(vectors, queries, 10, allowed=~excluded)
        out[f"recall@10, {share:.0%} excluded"] = recall(found, truth)
        out[f"leaked, {share:.0%} excluded"] = int(excluded[found[found >= 0]].sum())
    return out


def usearch_candidate(vectors, queries, exact, threads) -> dict | None:
    try:
        from usearch.index import Index
    except ImportError:
        return None
    before = rss_mb()
    start = time.perf_counter()
    index = Index(ndim=vectors.shape[1], metric="l2sq", dtype="i8", connectivity=16)
    index.add(np.arange(len(vectors)), vectors, threads=threads)
    seconds = time.perf_counter() - start
    ram = rss_mb() - before
    found = index.search(queries, 10, threads=threads).keys
    start = time.perf_counter()
    for q in queries[:200]:
        index.search(q, 10, threads=1)
    qps1 = 200 / (time.perf_counter() - start)
    start = time.perf_counter()
    index.search(np.concatenate([queries] * 2)[:1024], 10, threads=threads)
    return {"seconds": seconds, "ram_bytes_per_vector": ram * 2**20 / len(vectors),
            "recall@10 rerank=0": recall(found.astype(np.int64), exact), "qps batch 1": qps1,
            "qps batch 1024": 1024 / (time.perf_counter() - start),
            "usearch bytes per vector": index.memory_usage / len(vectors)}


def scann_candidate(vectors, queries, exact, threads, rerank=100) -> dict | None:
    """ScaNN's tree + asymmetric hashing, 96-byte codes (2 dims a 4-bit block), its top `rerank` re-ranked
    with the stored vectors as retrocli re-ranks."""
    try:
        from scann import scann_ops_pybind
    except ImportError:
        return None
    from retrocli.index import rerank_exact

    class Rows:
        def take(self, ids):
            return vectors[ids.reshape(-1)].reshape(*ids.shape, -1)

    before = rss_mb()
    start = time.perf_counter()
    searcher = (scann_ops_pybind.builder(vectors, rerank, "squared_l2")
                .tree(num_leaves=1024, num_leaves_to_search=128, training_sample_size=65536)
                .score_ah(2, anisotropic_quantization_threshold=0.2).build())
    seconds = time.perf_counter() - start
    ram = rss_mb() - before

    def search(batch):
        ids, _ = searcher.search_batched(batch, final_num_neighbors=rerank)
        return rerank_exact(Rows(), "l2", batch, np.asarray(ids, dtype=np.int64), 10)[0]

    raw, _ = searcher.search_batched(queries, final_num_neighbors=10)
    found = search(queries)
    start = time.perf_counter()
    for q in queries[:200]:
        search(q[None, :])
    qps1 = 200 / (time.perf_counter() - start)
    start = time.perf_counter()
    search(np.concatenate([queries] * 2)[:1024])
    return {"seconds": seconds, "ram_bytes_per_vector (incl. the dataset ScaNN keeps)": ram * 2**20 / len(vectors),
            "recall@10 rerank=0": recall(np.asarray(raw, dtype=np.int64), exact),
            f"recall@10 rerank={rerank}": recall(found, exact), "qps batch 1": qps1,
            "qps batch 1024": 1024 / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="an embedded DB (its index, if any, is not touched)")
    parser.add_argument("--work", default="bench-out/kinds")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--search-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.search_child:
        print(json.dumps(search_child(*args.search_child, args.threads)))
        return

    from retrocli.db import load_embeddings, open_db

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    db = open_db(args.db)
    vectors = load_embeddings(db)
    rng = np.random.default_rng(args.seed)
    queries = vectors[np.sort(rng.choice(len(vectors), args.queries, replace=False))]
    start = time.perf_counter()
    exact = exact_top_k(vectors, queries, 10)
    exact_qps = len(queries) / (time.perf_counter() - start)
    np.save(work / "queries.npy", queries)
    np.save(work / "exact.npy", exact)
    print(f"DB {args.db}: {db.num_chunks:,} vectors of {vectors.shape[1]}-d; {len(queries)} queries; "
          f"exact search (numpy, the recall reference) {exact_qps:.0f} q/s; threads {args.threads}")
    results = {}
    for name in filter(None, args.configs.split(",")):
        built = build(Path(args.db), work, name, threads=1)
        child = subprocess.run([sys.executable, __file__, "--db", args.db, "--threads", str(args.threads),
                                "--search-child", built["path"], str(work / "queries.npy"), str(work / "exact.npy")],
                               capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(child.stderr)
        results[name] = {**built, **json.loads(child.stdout.strip().splitlines()[-1])}
        results[name]["disk_bytes_per_vector"] = built["disk_bytes"] / db.num_chunks
        print(name, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results[name].items()}),
              flush=True)
    for name, measure in (("usearch-i8 (candidate)", usearch_candidate), ("scann-ah96 (candidate)", scann_candidate)):
        candidate = measure(vectors, queries, exact, args.threads)
        if candidate:
            results[name] = candidate
            print(name, json.dumps({k: round(v, 4) for k, v in candidate.items()}), flush=True)
    anchor = results.get("hnsw")
    if anchor:
        print("\nratios against hnsw (the anchor, same run):")
        for name, r in results.items():
            ratios = {key: r[key] / anchor[key] for key in ("ram_bytes_per_vector", "qps batch 1", "qps batch 1024",
                                                            "seconds") if key in r and anchor.get(key)}
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}×" for k, v in ratios.items()))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
