"""`retro index`: hnswlib HNSW indexes over the chunk embeddings, sharded so memory stays bounded.

Shard s holds chunks [s*S, (s+1)*S) under their global ids. A query searches every shard and merges
the per-shard top-k, which is exactly the top-k of the union of what the shards return. Shards are
written as `index/shard-NNNNN.hnsw` (hnswlib's own format, no pickle) via a temp name and rename, and
the manifest records each finished shard, so an interrupted build resumes at the next shard.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import hnswlib
import numpy as np

from retrocli.block_stage import BlockStage
from retrocli.checksums import file_sha256
from retrocli.cluster import dask_client
from retrocli.db import (
    MANIFEST,
    DBLike,
    RetroDB,
    commit_manifest,
    db_location,
    load_embeddings,
    open_db,
    open_task_db,
    read_manifest,
)
from retrocli.errors import RetroError
from retrocli.lock import holds_writer_lock
from retrocli.options import DEFAULT_EF_SEARCH, IndexOptions, check_at_least
from retrocli.progress import NullProgress, Progress
from retrocli.storage import adopt_uploaded, task_location

SPACES = ("l2", "ip", "cosine")
INDEX_DIR = "index"
ADD_BLOCK = 16384


@holds_writer_lock("retro index", "db")
def index_db(
    db: DBLike, options: IndexOptions | None = None, progress: Progress | None = None, dask=None,
) -> RetroDB:
    """Build (or finish building) the HNSW shards of the DB; with `dask` (an address, 'local:N'
    or a distributed.Client) one task per shard on the workers, `options.threads` per task (default 1)."""
    options = options or IndexOptions()
    progress = progress or NullProgress()
    if options.space not in SPACES:
        raise RetroError(f"--space: must be one of {', '.join(SPACES)}, got '{options.space}'")
    check_at_least("--threads", options.threads, allow_none=True)
    if options.M < 2 or options.ef_construction < 1 or options.shard_size < 1:
        raise RetroError("--M must be ≥ 2, --ef-construction and --shard-size ≥ 1")
    db = open_db(db_location(db))
    manifest = db.manifest
    n, dim = db.num_chunks, int(manifest["embedder"]["dim"]) if manifest.get("embedder") else 0
    load_embeddings(db, 0, 0)  # raises a clear error when embed is not complete
    params = {"space": options.space, "M": options.M, "ef_construction": options.ef_construction,
              "shard_size": options.shard_size, "seed": options.seed, "dim": dim}
    state = manifest.get("stages", {}).get("index", {})
    recorded = manifest.get("index") or {}
    if state.get("status") in ("running", "complete"):
        same = all(recorded.get(key) == value for key, value in params.items())
        if state["status"] == "complete" and same:
            return db
        if state["status"] == "running" and not same:
            raise RetroError(
                f"{db.path}: an interrupted index build used other parameters "
                f"({ {k: recorded.get(k) for k in params} }); rerun with those or pass --overwrite"
            )
        if state["status"] == "complete":
            raise RetroError(f"{db.path}: already indexed with other parameters; pass --overwrite to rebuild")
    index_dir = db.path / INDEX_DIR
    index_dir.mkdir(exist_ok=True)
    if state.get("status") != "running":
        recorded = {**params, "shards": []}
        manifest["index"] = recorded
        state = {"status": "running"}
        manifest.setdefault("stages", {})["index"] = state
        commit_manifest(db.path, manifest)
    for leftover in index_dir.glob("*.partial"):  # from a build (or a worker) killed while saving
        leftover.unlink()
    stage = BlockStage("index", state, lambda: commit_manifest(db.path, manifest), n, options.shard_size,
                       "vectors", shard_records=recorded["shards"], min_blocks=1)
    with dask_client(dask) as client:
        # One thread by default: hnswlib's graph then depends only on the vectors, their order and --seed,
        # so a rebuild is byte-identical. More threads insert concurrently, and the graph (hence a few
        # neighbours) depends on their timing.
        threads = options.threads or 1
        # a DB URL goes to the workers as (URL, cache dir): each fetches its shard's embeddings from the
        # store and uploads the shard, which this process fetches before committing it
        location = str(db.path) if client is None else task_location(db.path)
        args = (location, options.space, dim, options.M, options.ef_construction, options.shard_size,
                options.seed, threads)
        # Locally, progress advances per added block; on Dask, per finished shard.
        fetch = None if isinstance(location, str) else lambda record: adopt_uploaded(db.path, [record["file"]])
        stage.run(build_shard, args, progress, client, reports_progress=True, on_result=fetch)
    return open_db(db.path)


def build_shard(
    location: str | tuple[str, str], space: str, dim: int, M: int, ef_construction: int, shard_size: int,
    seed: int, threads: int, task, shard: int,
) -> dict:
    """Build shard `shard` from its embeddings and move it into place; returns its manifest record.
    `location` is the DB's path, or (URL, cache dir) for a DB on object storage: the worker then fetches
    the shard's embedding chunks into its partial copy and uploads the shard file."""
    start = shard * shard_size
    db, mirror = open_task_db(location, "embeddings", start, start + shard_size)
    stop = min(db.num_chunks, start + shard_size)
    final = db.path / INDEX_DIR / shard_name(shard)
    final.parent.mkdir(exist_ok=True)
    write_shard(lambda a, b: load_embeddings(db, a, b), start, stop, 0, final, space, dim, M, ef_construction,
                seed, threads, task)
    relative = f"{INDEX_DIR}/{final.name}"
    if mirror is not None:
        mirror.upload([relative])
    return shard_record(shard, final, relative, start, stop - start)


def write_shard(
    read_vectors: Callable[[int, int], np.ndarray], start: int, stop: int, first_label: int, final: Path, space: str,
    dim: int, M: int, ef_construction: int, seed: int, threads: int, task=None,
) -> None:
    """An HNSW shard of vectors [start, stop) (read_vectors(a, b) gives rows [a, b) as float32), labelled
    first_label + row, written to `final` via a temp name and checked whole before the rename. The DB's
    index, an added segment's and a kNN-LM datastore's shards are all written here."""
    index = hnswlib.Index(space=space, dim=dim)
    index.init_index(max_elements=max(stop - start, 1), M=M, ef_construction=ef_construction, random_seed=seed)
    for block in range(start, stop, ADD_BLOCK):
        block_stop = min(stop, block + ADD_BLOCK)
        index.add_items(read_vectors(block, block_stop), np.arange(block, block_stop) + first_label,
                        num_threads=threads)
        if task is not None:
            task.advance(block_stop - block)
    tmp = final.with_suffix(f".{os.getpid()}.partial")  # two workers retrying one shard never share a file
    index.save_index(str(tmp))
    check_saved_shard(tmp, space, dim, stop - start)
    os.replace(tmp, final)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.hnsw"


def shard_record(shard: int, final: Path, relative: str, start: int, count: int) -> dict:
    """A shard's manifest record; `relative` is its file's path inside the DB."""
    return {"shard": shard, "file": relative, "start": start, "count": count, "bytes": final.stat().st_size,
            "sha256": file_sha256(final)}


_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) of shard files checked in this process


def check_saved_shard(file: Path, space: str, dim: int, count: int) -> None:
    """hnswlib writes without checking for errors: on a full disk it leaves a truncated file and returns.
    Loading it back (which checks the file's length) is what tells a whole shard from a cut one."""
    reloaded = hnswlib.Index(space=space, dim=dim)
    try:
        reloaded.load_index(str(file), max_elements=max(count, 1))
        whole = reloaded.get_current_count() == count
    except (RuntimeError, ValueError, MemoryError):
        whole = False
    if not whole:
        file.unlink(missing_ok=True)
        raise OSError(errno.ENOSPC, "the index shard was cut short while writing (is the disk full?)", str(file))


def check_shard_coverage(db_path: Path, manifest: dict) -> None:
    """The shards must cover the DB's chunks exactly, in order, with the embedder's dimension."""
    meta, chunks = manifest["index"], int(manifest["counts"]["chunks"])
    embedder_dim = int((manifest.get("embedder") or {}).get("dim", meta["dim"]))
    if int(meta["dim"]) != embedder_dim:
        raise RetroError(f"{db_path}: the index is {meta['dim']}-d but the embedder gives {embedder_dim}-d "
                         f"vectors; rerun `retro index {db_path} --overwrite`")
    try:
        covered = sorted((int(s["start"]), int(s["count"])) for s in meta.get("shards") or [])
    except (KeyError, TypeError, ValueError):
        covered = []
    expected_starts = [sum(c for _, c in covered[:i]) for i in range(len(covered))]
    if not covered or [s for s, _ in covered] != expected_starts or sum(c for _, c in covered) != chunks:
        raise RetroError(f"{db_path}: the manifest's index shards do not cover the DB's {chunks:,} chunks; "
                         f"rerun `retro index {db_path} --overwrite`")


def checked_shard_file(db_path: Path, shard: dict, cached: bool = True, rerun: str | None = None) -> Path:
    """The shard's file, after checking it lies inside the DB (or another directory of ours, such as a
    kNN-LM datastore) and matches its recorded sha256: hnswlib trusts its input (one changed header byte
    can crash the process), so nothing unchecked reaches it. `rerun`: what the errors tell the user to do."""
    rerun = rerun or f"rerun `retro index {db_path} --overwrite`"
    root = db_path.resolve()
    file = (db_path / str(shard.get("file", ""))).resolve()
    if root not in file.parents:
        raise RetroError(f"{db_path / MANIFEST}: index shard file '{shard.get('file')}' lies outside the DB; "
                         "refusing to read it")
    if not file.is_file():
        raise RetroError(f"{file}: index shard missing; {rerun}")
    if "sha256" not in shard:
        raise RetroError(f"{file}: the manifest records no checksum for this shard (an older build); {rerun}")
    stat = file.stat()
    if stat.st_size != shard["bytes"]:
        raise RetroError(f"{file}: index shard is corrupt (size differs from the manifest); {rerun}")
    key = (str(file), stat.st_size, stat.st_mtime_ns, shard["sha256"])
    if key not in _VERIFIED or not cached:
        if file_sha256(file) != shard["sha256"]:
            raise RetroError(f"{file}: index shard is corrupt (sha256 differs from the manifest); {rerun}")
        _VERIFIED.add(key)
    return file


def merge_top_k(results: list[tuple[int, np.ndarray, np.ndarray]], queries: int, k: int):
    """The exact top-k of per-shard top-k lists (shard, ids, distances), wherever they were searched;
    -1 / inf where fewer than k exist. The stable sort on (distance, id) keeps ties the same across
    shardings and across the order results arrive in."""
    ids = np.full((queries, k), -1, dtype=np.int64)
    dists = np.full((queries, k), np.inf, dtype=np.float32)
    if not results or queries == 0 or k == 0:
        return ids, dists
    cat_ids = np.concatenate([r[1] for r in results], axis=1)
    cat_dists = np.concatenate([r[2] for r in results], axis=1)
    order = np.lexsort((cat_ids, cat_dists), axis=1)[:, :k]
    width = order.shape[1]
    ids[:, :width] = np.take_along_axis(cat_ids, order, axis=1)
    dists[:, :width] = np.take_along_axis(cat_dists, order, axis=1)
    return ids, dists


FILTER_ABOVE = 64  # removed chunks in a shard beyond which a search filters instead of over-fetching


class ShardedIndex:
    """All shards of a DB, loaded for search. Exact merge of per-shard top-k. Chunks of removed documents
    are never returned: a shard with a few of them is searched for k + (their number) and they are
    dropped; with more, hnswlib's filtered search skips them."""

    def __init__(self, db: RetroDB, ef: int = DEFAULT_EF_SEARCH, shards: Iterable[int] | None = None):
        """shards: load only these shard numbers (a Dask worker's own); None loads every shard."""
        check_at_least("--ef", ef)
        if db.stage("index") != "complete":
            raise RetroError(f"{db.path}: index stage is not complete; run `retro index {db.path}`")
        meta = db.manifest["index"]
        self.db_path = db.path
        self.space, self.dim = meta["space"], int(meta["dim"])
        self.size = db.num_chunks
        self.ef = ef
        self.removed = db.removed_chunks
        self.records = {int(s["shard"]): s for s in meta["shards"]}
        # shard number -> (hnswlib index, first chunk, removed chunks in it), in shard order
        self.loaded: dict[int, tuple[hnswlib.Index, int, int]] = {}
        check_shard_coverage(db.path, db.manifest)
        self.load(self.records if shards is None else shards)

    def load(self, shards: Iterable[int]) -> None:
        """Load (after checking) the given shards that are not loaded yet."""
        for number in sorted(set(shards) - self.loaded.keys()):
            if number not in self.records:
                raise RetroError(f"{self.db_path}: the index has no shard {number}")
            shard = self.records[number]
            file = checked_shard_file(self.db_path, shard)
            index = hnswlib.Index(space=self.space, dim=self.dim)
            try:
                index.load_index(str(file), max_elements=shard["count"])
            except (RuntimeError, ValueError, MemoryError) as err:
                raise RetroError(f"{file}: cannot load index shard ({err})") from None
            if index.get_current_count() != shard["count"]:
                raise RetroError(f"{file}: index shard is corrupt (holds {index.get_current_count()} "
                                 f"vectors, manifest says {shard['count']})")
            start = int(shard["start"])
            self.loaded[number] = (index, start, int(self.removed[start : start + shard["count"]].sum()))
        self.loaded = dict(sorted(self.loaded.items()))

    def search(self, vectors: np.ndarray, k: int, threads: int = 1,
               from_chunk: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids (int64) and distances (float32) per query; -1 / inf where fewer than k exist.
        from_chunk: search only the shards that start there or later (the chunks added since)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return merge_top_k(self.search_shards(vectors, k, threads, from_chunk), len(vectors), k)

    def search_shards(self, vectors: np.ndarray, k: int, threads: int = 1,
                      from_chunk: int = 0) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Each loaded shard's own top-k, as (shard, ids, distances); merge_top_k combines them."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) == 0 or k == 0:
            return []
        results = []
        for number, (index, start, removed) in self.loaded.items():
            if start < from_chunk:
                continue
            labels, distances = self._search_shard(index, removed, vectors, k, threads)
            if labels is not None:
                results.append((number, labels, distances))
        return results

    def _search_shard(self, index, removed: int, vectors: np.ndarray, k: int, threads: int):
        """One shard's top-k live chunks per query (ids −1 and distance inf where it has fewer)."""
        live = index.get_current_count() - removed
        kk = min(k, live)
        if kk <= 0:
            return None, None
        if removed == 0:
            index.set_ef(max(self.ef, kk))
            labels, distances = index.knn_query(vectors, k=kk, num_threads=threads)
            return labels.astype(np.int64), distances.astype(np.float32)
        if removed > FILTER_ABOVE:
            mask = self.removed
            index.set_ef(max(self.ef, kk))
            try:
                labels, distances = index.knn_query(vectors, k=kk, num_threads=1,
                                                    filter=lambda label: not mask[label])
                return labels.astype(np.int64), distances.astype(np.float32)
            except RuntimeError:  # the filtered walk found fewer than k: fetch past the removed ones
                pass
        wide = min(kk + removed, index.get_current_count())
        index.set_ef(max(self.ef, wide))
        labels, distances = index.knn_query(vectors, k=wide, num_threads=threads)
        labels, distances = labels.astype(np.int64), distances.astype(np.float32)
        keep = ~self.removed[labels]
        # stable: live results keep their order; removed ones go last, then are cut off
        order = np.argsort(~keep, axis=1, kind="stable")[:, :kk]
        got_ids = np.take_along_axis(labels, order, axis=1)
        got_d = np.take_along_axis(distances, order, axis=1)
        dead = ~np.take_along_axis(keep, order, axis=1)
        got_ids[dead], got_d[dead] = -1, np.inf
        return got_ids, got_d


@holds_writer_lock("retro index --overwrite", "db_path")
def remove_index(db_path: Path) -> None:
    """For --overwrite: forget the index stage and delete its files."""
    import shutil

    manifest = read_manifest(db_path)
    manifest.pop("index", None)
    manifest.get("stages", {}).pop("index", None)
    commit_manifest(db_path, manifest)
    shutil.rmtree(db_path / INDEX_DIR, ignore_errors=True)
