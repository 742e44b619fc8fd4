"""build-db with `--dask local:W` vs the single-process build (the anchor, same corpus, same run): every
stage (chunk, embed, index, batch neighbours, the near-duplicate pass), the merged search of shards owned
by workers against one shard searched alone, and the scaling model those runs give.

    .venv/bin/python bench/bench_dask.py --corpus examples/data/train.jsonl \
        --heldout examples/data/heldout.jsonl [--workers 2] [--limit-docs N]

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

from retrocli.options import EmbedOptions, NeighborOptions


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
    parser.add_argument("--heldout", default=None, help="A test corpus for the near-duplicate pass")
    parser.add_argument("--queries", type=int, default=4096, help="Query vectors for the merged-search timing")
    args = parser.parse_args()

    import distributed

    from retrocli.batch_neighbors import batch_neighbors
    from retrocli.build_db import build_db
    from retrocli.chunk import ChunkOptions, chunk_corpus
    from retrocli.db import load_embeddings, open_db
    from retrocli.index import SearchWidth, ShardedIndex
    from retrocli.near_duplicates import near_duplicates
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.options import IndexOptions
    from retrocli.shard_owners import OwnedShards

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
        build_db(
            [corpus], work / "local", index_options=IndexOptions(shard_size=shard_size),
            embed_options=EmbedOptions(block_size=args.block_size),
        )
        local_wall = time.perf_counter() - start
        local = stage_seconds(work / "local")

        start = time.perf_counter()
        cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
        startup = time.perf_counter() - start
        # pieces of a quarter of a worker's share, so one large JSONL file is spread over the workers
        piece = max(1 << 20, corpus.stat().st_size // (4 * args.workers))
        chunk_corpus([corpus], work / "dask", ChunkOptions(), dask=client, piece_bytes=piece)
        build_db(
            [corpus], work / "dask", index_options=IndexOptions(shard_size=shard_size, threads=1), dask=client,
            embed_options=EmbedOptions(block_size=args.block_size, threads=1),
        )
        dask_wall = time.perf_counter() - start
        remote = stage_seconds(work / "dask")

        # batch neighbours of the DB itself (what training reads): local search vs shards owned by workers
        timings = {}
        for name, cluster_arg in (("local", None), ("dask", client)):
            t = time.perf_counter()
            batch_neighbors(
                work / "local", [work / "local"], work / f"nb-{name}", dask=cluster_arg,
                options=NeighborOptions(k=2, exclude_same_doc=True),
            )
            timings[name] = time.perf_counter() - t
        nb_equal = np.array_equal(open_neighbors(work / "nb-local").ids, open_neighbors(work / "nb-dask").ids)

        # one search call of Q queries: one shard alone (the anchor), every shard here, every shard on its owner
        db = open_db(work / "local")
        queries = load_embeddings(db, 0, min(args.queries, n)).astype(np.float32)
        one = ShardedIndex(db, shards=[0])
        merged_local = ShardedIndex(db)
        owned = OwnedShards(client, db, SearchWidth(merged_local.ef))
        owned.search(queries[:8], 10)  # owners load their shards before the timing
        search = {}
        for name, index in (("one shard", one), ("all shards, this process", merged_local),
                            (f"all shards, owned by {args.workers} workers", owned)):
            t = time.perf_counter()
            index.search(queries, 10)
            search[name] = time.perf_counter() - t
        placement = owned.placement()

        dups = None
        if args.heldout:
            test = chunk_corpus([Path(args.heldout)], work / "heldout", ChunkOptions())
            t = time.perf_counter()
            local_pairs, _ = near_duplicates(db, test)
            t_local = time.perf_counter() - t
            t = time.perf_counter()
            dask_pairs, _ = near_duplicates(db, test, dask=client)
            dups = (t_local, time.perf_counter() - t, len(local_pairs),
                    [p.__dict__ for p in local_pairs] == [p.__dict__ for p in dask_pairs])
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
        print(f"neighbors (self, k=2, --exclude-same-doc): single process {timings['local']:.1f}s, dask with owned "
              f"shards {timings['dask']:.1f}s ({timings['dask'] / timings['local']:.2f}x); ids identical: {nb_equal}")
        print(f"search of {len(queries):,} queries, k=10, against one shard alone (the anchor):")
        for name, seconds in search.items():
            print(f"  {name:38} {seconds:7.2f}s {seconds / search['one shard']:6.2f}x")
        print(f"  placement: {placement}")
        if dups:
            print(f"near-duplicate pass vs the held-out pages: single process {dups[0]:.1f}s, dask {dups[1]:.1f}s "
                  f"({dups[1] / dups[0]:.2f}x); {dups[2]} pairs, identical: {dups[3]}")
        print(f"scaling model: embed ~ {startup:.1f}s start-up + {load:.1f}s load + chunks / ({per_worker:.1f} x W)")
        for workers in (8, 64, 400):
            hours = (startup + load + 1e9 / (per_worker * workers)) / 3600
            print(f"  1B chunks on {workers:>3} single-core workers like these: embed ~{hours:,.1f} h")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
