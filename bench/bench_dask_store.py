"""build-db on Dask with the DB and corpus on object storage and no shared filesystem, against the same
Dask build to a local path (the anchor, same cluster, same run): wall time per stage, what each worker
fetched into its own cache, what the client's copy holds, and that the arrays are identical.

    .venv/bin/python bench/bench_dask_store.py --corpus examples/subset/train.jsonl [--workers 2]

The store is moto's S3-compatible server on 127.0.0.1 (the dev extras), so the figures are the cost of
the object-store path itself (listing, PUT/GET, the client fetching each block), not of a network.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

ARRAYS = ("chunks/tokens", "chunks/length", "chunks/doc", "docs/chunk_offset", "embeddings")


def tree_bytes(path: Path) -> tuple[int, int]:
    files = [f for f in path.rglob("*") if f.is_file()] if path.exists() else []
    return len(files), sum(f.stat().st_size for f in files)


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="A corpus file (JSONL)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=None, help="default: chunks / workers")
    args = parser.parse_args()

    proc, endpoint = start_moto()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    import distributed
    import s3fs

    from retrocli.build_db import build_db
    from retrocli.chunk import ChunkOptions, chunk_corpus
    from retrocli.options import EmbedOptions, IndexOptions
    from retrocli.storage import fetch_db, local_db, local_inputs, mirror_path

    work = Path(tempfile.mkdtemp(prefix="bench-dask-store-"))
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put_file(args.corpus, "bench/corpus/train.jsonl")
    corpus_url, db_url = "s3://bench/corpus/train.jsonl", "s3://bench/db"
    chunks = chunk_corpus([args.corpus], work / "count", ChunkOptions()).num_chunks
    shard_size = args.shard_size or -(-chunks // args.workers)
    options = dict(embed_options=EmbedOptions(block_size=args.block_size),
                   index_options=IndexOptions(shard_size=shard_size))

    cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        workers = sorted(client.scheduler_info()["workers"])
        caches = [work / f"worker-{i}" for i in range(len(workers))]
        for worker, cache in zip(workers, caches):
            client.run(lambda path=str(cache): os.environ.update(RETRO_CACHE_DIR=path), workers=[worker])
        # warm-up: each worker loads the BERT once, so neither build pays for it
        build_db([args.corpus], work / "warm", dask=client, **options)

        started = time.perf_counter()
        local = build_db([args.corpus], work / "local", dask=client, **options)
        local_seconds = time.perf_counter() - started

        client_cache = work / "client"
        started = time.perf_counter()
        with local_db(db_url, client_cache, write="bench") as path:
            remote = build_db(local_inputs([corpus_url], client_cache), path, dask=client, **options)
        remote_seconds = time.perf_counter() - started
    finally:
        client.close()
        cluster.close()

    reader = fetch_db(db_url, work / "reader")
    a = zarr.open_group(str(local.path / "store.zarr"), mode="r")
    b = zarr.open_group(str(reader / "store.zarr"), mode="r")
    identical = all(np.array_equal(a[name][:], b[name][:]) for name in ARRAYS)
    shards_same = [s["sha256"] for s in local.manifest["index"]["shards"]] == \
        [s["sha256"] for s in remote.manifest["index"]["shards"]]
    proc.terminate()

    db_files, db_bytes = tree_bytes(reader)
    print(f"corpus {args.corpus}: {chunks:,} chunks, {args.workers} workers, block {args.block_size}, "
          f"shard {shard_size:,}")
    stages = ("chunk", "embed", "index")
    for name in stages:
        t_local = local.manifest["stages"][name]["seconds"]
        t_remote = remote.manifest["stages"][name]["seconds"]
        print(f"  {name:6s} local path {t_local:7.1f} s   s3:// {t_remote:7.1f} s   ratio {t_remote / t_local:5.2f}x")
    print(f"  wall   local path {local_seconds:7.1f} s   s3:// {remote_seconds:7.1f} s   "
          f"ratio {remote_seconds / local_seconds:5.2f}x (anchor: the same Dask build to a local path)")
    print(f"  DB: {db_files} files, {db_bytes / 1e6:.1f} MB; client copy holds "
          f"{tree_bytes(mirror_path(db_url, client_cache))[1] / db_bytes:.2f}x of it")
    for i, cache in enumerate(caches):
        files, size = tree_bytes(mirror_path(db_url, cache, partial=True))
        corpus_files, corpus_size = tree_bytes(mirror_path("s3://bench/corpus", cache))
        print(f"  worker {i}: partial copy {files} files, {size / 1e6:.1f} MB ({size / db_bytes:.2f}x of the DB); "
              f"corpus fetched {corpus_size / 1e6:.2f} MB")
    print(f"  arrays identical: {identical}; shard files identical: {shards_same}")


if __name__ == "__main__":
    main()
