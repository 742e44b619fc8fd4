"""What `retro add` costs against a full rebuild, and whether the result equals the rebuild.

Anchor: `retro build-db BASE NEW --out FULL`, the whole corpus built from scratch, timed in this run. Then a
copy of the DB built from BASE alone gets `retro add DB NEW`, timed, with its peak RSS. Both DBs are then
compared: chunk tokens and sources, embeddings byte for byte, and HNSW recall@10 against exact search for a
sample of chunks as queries.

    .venv/bin/python bench/bench_add.py --base-db DB_OF_BASE --base BASE.jsonl --new NEW.jsonl [--work DIR]

Each command runs as its own process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RETRO = Path(sys.executable).with_name("retro")


def timed(*args) -> tuple[float, int]:
    """Seconds and peak RSS (KB) of one `retro` command run as a child process."""
    start = time.perf_counter()
    proc = subprocess.run([str(RETRO), *map(str, args)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"retro {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def recall_at_10(db, queries: np.ndarray) -> float:
    from retrocli.db import load_embeddings
    from retrocli.index import ShardedIndex

    vectors = load_embeddings(db)
    found, _ = ShardedIndex(db).search(vectors[queries], 10)
    hits = 0
    for row, query in enumerate(queries):
        exact = np.argsort(((vectors - vectors[query]) ** 2).sum(1), kind="stable")[:10]
        hits += len(set(found[row]) & set(exact))
    return hits / (10 * len(queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-db", type=Path, required=True, help="a DB built from --base alone")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--queries", type=int, default=2000, help="chunks sampled as recall queries")
    args = parser.parse_args()
    from retrocli.db import load_embeddings, open_db

    work = args.work or Path(tempfile.mkdtemp(prefix="retro-bench-add-"))
    added, full = work / "added", work / "full"
    for path in (added, full):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(args.base_db, added)
    add_seconds, add_rss = timed("add", added, args.new)
    full_seconds, _ = timed("build-db", args.base, args.new, "--out", full)
    a, f = open_db(added), open_db(full)
    base = open_db(args.base_db)
    same_tokens = bool(np.array_equal(a.tokens_block(0, a.num_chunks)[0], f.tokens_block(0, f.num_chunks)[0]))
    same_sources = all(a.source(d) == f.source(d) for d in range(0, a.num_docs, max(1, a.num_docs // 500)))
    same_vectors = load_embeddings(a).tobytes() == load_embeddings(f).tobytes()
    queries = np.random.default_rng(0).choice(a.num_chunks, min(args.queries, a.num_chunks), replace=False)
    recall_added, recall_full = recall_at_10(a, queries), recall_at_10(f, queries)
    result = {
        "base": {"documents": base.num_docs, "chunks": base.num_chunks},
        "added": {"documents": a.num_docs - base.num_docs, "chunks": a.num_chunks - base.num_chunks},
        "add_seconds": round(add_seconds, 1), "add_peak_rss_mb": round(add_rss / 1024),
        "full_build_seconds": round(full_seconds, 1), "add_over_full": round(add_seconds / full_seconds, 4),
        "added_share_of_chunks": round((a.num_chunks - base.num_chunks) / a.num_chunks, 4),
        "same_tokens": same_tokens, "same_sources": same_sources, "same_embeddings_bytes": same_vectors,
        "recall_at_10_added": round(recall_added, 4), "recall_at_10_rebuilt": round(recall_full, 4),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
