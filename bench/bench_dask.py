"""build-db with `--dask local:W` vs the single-process build (the anchor, same corpus, same run), plus
the scaling model those two runs give.

    .venv/bin/python bench/bench_dask.py --corpus examples/data/train.jsonl [--workers 2] [--limit-docs N]

On a 2-core machine no speed-up is expected: the point is the overhead (cluster start-up, per-task
scheduling, one BERT copy per worker) and that the results match. The model: a stage of T1 single-core
seconds in B blocks takes about start + T1 / W + B * overhead / W on W single-core workers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def stage_seconds(db_path: Path) -> dict[str, float]:
    stages = json.loads((db_path / "manifest.json").read_text())["stages"]
    return {name: float(stages[name].get("seconds", 0.0)) for name in ("chunk", "embed", "index")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="A corpus file (JSONL)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-docs", type=int, default=None, help="Use only the first N documents")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=None, help="default: chunks / workers (one shard each)")
    args = parser.parse_args()

    import distributed

    from retrocli.build_db import build_db
    from retrocli.chunk import ChunkOptions, chunk_corpus
    from retrocli.db import open_db
    from retrocli.index import IndexOptions

    work = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    corpus = Path(args.corpus)
    if args.limit_docs:
        lines = corpus.read_text(encoding="utf-8").splitlines()[: args.limit_docs]
        corpus = work / "corpus.jsonl"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        # Chunk once to learn the size, so both runs use the same shard layout.
        probe = chunk_corpus([corpus], work / "probe", ChunkOptions())
        n = probe.num_chunks
        shard_size = args.shard_size or -(-n // args.workers)
        shutil.rmtree(work / "probe")

        start = time.perf_counter()
        build_db([corpus], work / "local", block_size=args.block_size,
                 index_options=IndexOptions(shard_size=shard_size))
        local_wall = time.perf_counter() - start
        local = stage_seconds(work / "local")

        start = time.perf_counter()
        cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
        startup = time.perf_counter() - start
        build_db([corpus], work / "dask", block_size=args.block_size,
                 index_options=IndexOptions(shard_size=shard_size, threads=1), threads=1, dask=client)
        dask_wall = time.perf_counter() - start
        remote = stage_seconds(work / "dask")
        client.close()
        cluster.close()

        a = zarr.open_group(str(work / "local" / "store.zarr"), mode="r")["embeddings"][:].astype(np.float32)
        b = zarr.open_group(str(work / "dask" / "store.zarr"), mode="r")["embeddings"][:].astype(np.float32)
        tokens_equal = np.array_equal(
            zarr.open_group(str(work / "local" / "store.zarr"), mode="r")["chunks/tokens"][:],
            zarr.open_group(str(work / "dask" / "store.zarr"), mode="r")["chunks/tokens"][:],
        )
        # What each worker pays once before its first block: imports plus the model, in a fresh process.
        script = ("import time; t = time.perf_counter(); from retrocli.embed import Embedder; Embedder(); "
                  "print(time.perf_counter() - t)")
        load = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout.split()[-1])
        blocks = -(-n // args.block_size)
        embed_work = max(remote["embed"] - load, 1e-9)  # worker-seconds per worker after the model load
        per_worker = n / (embed_work * args.workers)
        print(f"corpus {corpus.name}: {open_db(work / 'local').num_docs:,} docs, {n:,} chunks, "
              f"{blocks} embed blocks of {args.block_size}, {-(-n // shard_size)} shard(s)")
        print(f"{'stage':8} {'single process':>15} {'dask local:' + str(args.workers):>15} {'ratio':>7}")
        for name in ("chunk", "embed", "index"):
            ratio = remote[name] / max(local[name], 1e-9)
            print(f"{name:8} {local[name]:14.1f}s {remote[name]:14.1f}s {ratio:6.2f}x")
        print(f"{'wall':8} {local_wall:14.1f}s {dask_wall:14.1f}s {dask_wall / local_wall:6.2f}x "
              f"(dask includes {startup:.1f}s cluster start-up)")
        print(f"embed throughput: single process {n / local['embed']:.1f} chunks/s (2 threads); dask "
              f"{n / remote['embed']:.1f} chunks/s ({args.workers} workers x 1 thread), {per_worker:.1f} chunks/s "
              f"per worker after its {load:.1f}s model load")
        print(f"chunk tokens identical: {tokens_equal}; embeddings max |diff| {np.abs(a - b).max():.2e} "
              "(1 vs 2 torch threads)")
        print(f"scaling model: embed ~ {startup:.1f}s start-up + {load:.1f}s load + chunks / ({per_worker:.1f} x W)")
        for workers in (8, 64, 400):
            hours = (startup + load + 1e9 / (per_worker * workers)) / 3600
            print(f"  1B chunks on {workers:>3} single-core workers like these: embed ~{hours:,.1f} h")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
