"""What a reproducible index costs: `retro index` with its default of one build thread (byte-identical
rebuilds) against the same build on every core (the anchor, measured in this run), and whether each
setting rebuilds byte-identically.

    .venv/bin/python bench/bench_index.py --db DB
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def build(source: Path, work: Path, name: str, threads: int | None) -> tuple[float, bytes, object]:
    from retrocli.db import load_embeddings
    from retrocli.index import ShardedIndex, index_db
    from retrocli.options import IndexOptions

    dest = work / name
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("index"))
    manifest = dest / "manifest.json"
    import json

    data = json.loads(manifest.read_text())
    data.pop("index", None)
    data["stages"].pop("index", None)
    manifest.write_text(json.dumps(data))
    start = time.perf_counter()
    db = index_db(dest, IndexOptions(threads=threads))
    seconds = time.perf_counter() - start
    shards = b"".join((dest / s["file"]).read_bytes() for s in db.manifest["index"]["shards"])
    sample = load_embeddings(db, 0, min(db.num_chunks, 2000))
    ids, _ = ShardedIndex(db).search(sample, 10, threads=os.cpu_count() or 1)
    return seconds, shards, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-index-", dir=Path(args.db).parent) as tmp:
        work = Path(tmp)
        one_a = build(Path(args.db), work, "one-a", None)
        one_b = build(Path(args.db), work, "one-b", None)
        all_a = build(Path(args.db), work, "all-a", cores)
        all_b = build(Path(args.db), work, "all-b", cores)
    print(f"default (1 thread): {one_a[0]:.1f} s and {one_b[0]:.1f} s; byte-identical: {one_a[1] == one_b[1]}; "
          f"queries (of {len(one_a[2])}) with other neighbours: {int((one_a[2] != one_b[2]).any(1).sum())}")
    print(f"anchor ({cores} threads): {all_a[0]:.1f} s and {all_b[0]:.1f} s; byte-identical: {all_a[1] == all_b[1]}; "
          f"queries with other neighbours: {int((all_a[2] != all_b[2]).any(1).sum())}")
    print(f"build time, default / anchor: {min(one_a[0], one_b[0]) / min(all_a[0], all_b[0]):.2f}")


if __name__ == "__main__":
    main()
