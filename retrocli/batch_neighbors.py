"""`retro neighbors --input X --out NB`: the neighbours of every chunk of a dataset (another DB, a corpus, or
the DB itself), precomputed into zarr arrays block by block (resumable); that is what RETRO training reads
(with --exclude-same-doc, the paper's rule). Also the directory's format, reading it back, and bringing
it to a newer version of the DB (--update).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zarr

from retrocli.artifacts import check_outside, write_json_atomic
from retrocli.block_stage import BlockStage
from retrocli.checksums import record_arrays
from retrocli.chunk import ChunkOptions, chunk_corpus
from retrocli.cluster import dask_client
from retrocli.db import (
    MANIFEST,
    STORE,
    DBLike,
    RetroDB,
    as_db,
    check_same_chunking,
    load_embeddings,
    open_db,
    read_manifest,
)
from retrocli.embed import embed_db
from retrocli.errors import RetroError
from retrocli.index import SearchWidth, ShardedIndex
from retrocli.lock import holds_writer_lock
from retrocli.neighbor_arrays import (
    NEIGHBOR_ARRAYS,
    NEIGHBORS_FORMAT,
    NEIGHBORS_VERSION,
    NeighborArrays,
    open_neighbors,
    query_db_of,
    read_neighbors_manifest,
    store_name,
)
from retrocli.neighbors import check_k, require_searchable, search_excluding
from retrocli.options import (
    DEFAULT_TEXT_FIELD,
    EmbedOptions,
    NeighborOptions,
    check_at_least,
)
from retrocli.progress import NullProgress, Progress
from retrocli.shard_owners import OwnedShards

# Candidates stored per neighbour kept, for --exclude-same-doc (training): a window spans several documents,
# and neighbours from any of them are dropped at batch time.
CANDIDATES_PER_K = 4


def _is_db(path: Path) -> bool:
    """A retro chunk DB (not a neighbours directory, which also has a manifest)."""
    if not (path.is_dir() and (path / MANIFEST).exists()):
        return False
    try:
        read_manifest(path)
        return True
    except RetroError:
        return False


@holds_writer_lock("retro neighbors", "out")
def batch_neighbors(
    db: DBLike,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    options: NeighborOptions | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    max_blocks: int | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    id_field: str | None = None,
    dask=None,
    device: str = "auto",
    update: bool = False,
    replicas: int = 1,
) -> Path:
    """Write the options.k neighbours of every chunk of `inputs` (a DB, or a corpus) to `out`. Resumable.
    options.candidates (≥ k) nearest are stored per chunk; with exclude_same_doc the default is
    CANDIDATES_PER_K·k, so training can drop those from other documents of its window and still
    keep k (see retrocli.train.TrainingData).
    With `dask` (an address, 'local:N' or a distributed.Client) each index shard is placed on `replicas`
    workers, which alone load it; every block of queries is searched by one owner of each shard and the
    per-shard results are merged here, exactly (see retrocli.shard_owners).

    `update`: neighbours in `out` computed on an earlier version of the DB are brought to this version by
    recomputing only the rows that can have changed (see update_neighbors)."""
    options = options or NeighborOptions()
    k, ef, exclude_same_doc = options.k, options.ef, options.exclude_same_doc
    width = SearchWidth(ef, options.nprobe, options.rerank)
    candidates, block_size = options.candidates, options.block_size
    progress = progress or NullProgress()
    check_at_least("--threads", threads, allow_none=True)
    check_at_least("--block-size", block_size)
    db = as_db(db)
    check_k(db, k)
    if candidates is None:
        candidates = min(CANDIDATES_PER_K * k, db.num_chunks) if exclude_same_doc else k
    if candidates < k:
        raise RetroError(f"--candidates: must be at least --k ({k}), got {candidates}")
    check_k(db, candidates)
    require_searchable(db)  # before the queries are chunked or embedded: a refusal costs nothing
    out = Path(out)
    inputs = [Path(p) for p in inputs]
    check_outside(out, db.path, "--out")
    for path in inputs:
        check_outside(out, path, "--out", "the input", may_be_inside=not _is_db(path))
    self_query = len(inputs) == 1 and _is_db(inputs[0]) and \
        read_manifest(inputs[0]).get("db_id") == db.manifest.get("db_id")
    if exclude_same_doc and not self_query:
        raise RetroError("--exclude-same-doc needs --input to be the DB itself (its documents are the DB's)")
    if _is_db(out):
        raise RetroError(f"{out}: --out must be a new directory, not a DB")
    settings = {"db_id": db.manifest["db_id"], "db_version": db.version, "db_content": db.content_id,
                "db": str(db.path.absolute()),
                "input": [str(p.absolute()) for p in inputs], "k": k, "candidates": candidates, **width.settings(db),
                "exclude_same_doc": exclude_same_doc, "block_size": block_size}
    manifest_file = out / MANIFEST
    if out.exists() and overwrite:
        if manifest_file.exists():
            shutil.rmtree(out)
        else:
            raise RetroError(f"{out}: exists and is not a neighbours directory; refusing to overwrite it")
    if manifest_file.exists():
        manifest = read_neighbors_manifest(out)
        if manifest["status"] == "complete" and manifest["settings"] == settings:
            return out
        if manifest["settings"] != settings:
            _check_updatable(out, manifest, db, settings)
            if update and manifest["status"] == "complete":
                return update_neighbors(out, manifest, db, settings, progress)
            had = manifest["settings"].get("db_version", 1)
            raise RetroError(f"{out}: holds neighbours of version {had} of {db.path}, which is now at "
                             f"version {db.version} (documents were added or removed); pass --update to "
                             "recompute the rows that can have changed, or --overwrite")
    elif out.exists() and any(out.iterdir()):
        raise RetroError(f"{out}: exists and is not a neighbours directory")
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"format": NEIGHBORS_FORMAT, "format_version": NEIGHBORS_VERSION, "status": "running",
                    "settings": settings, "done_blocks": []}
        write_json_atomic(manifest_file, manifest)

    # The queries: the DB itself, another DB, or a corpus chunked+embedded like the DB (into out/queries).
    if self_query:
        queries = db
    elif len(inputs) == 1 and _is_db(inputs[0]):
        queries = open_db(inputs[0])
        check_same_chunking(db, queries.path, queries.manifest["tokenizer"]["sha256"], queries.chunk_size)
        if queries.stage("embed") != "complete":  # neighbours never write into an input DB
            recorded = db.manifest["embedder"]
            raise RetroError(f"{queries.path}: --input DB is not embedded; run `retro embed {queries.path} "
                             f"--embedder {recorded['name']} --precision {recorded['precision']}` first")
        _check_same_embedder(db, queries)
    else:
        qpath = out / "queries"
        if not _is_db(qpath):
            chunk_corpus(inputs, qpath, ChunkOptions(db.chunk_size, str(db.path / "tokenizer.json"),
                                                    text_field, id_field), overwrite=True, progress=progress)
        recorded = db.manifest["embedder"]
        options = EmbedOptions(recorded["name"], recorded["precision"], threads=threads)
        queries = embed_db(qpath, options, progress=progress, dask=dask, device=device)
        _check_same_embedder(db, queries)

    n = queries.num_chunks
    store = out / STORE
    if not store.exists():
        root = zarr.open_group(str(store), mode="w")
        chunks = (min(block_size, max(n, 1)), candidates)
        root.create_array("ids", shape=(n, candidates), dtype=np.int64, chunks=chunks, fill_value=-1)
        root.create_array("distances", shape=(n, candidates), dtype=np.float32, chunks=chunks, fill_value=np.inf)
        manifest["num_queries"] = n
        # The test set chunked here is named relative to `out`, so the directory can move; another DB by
        # its path and id, checked when the neighbours are opened.
        inside = queries.path.absolute().parent == out.absolute()
        manifest["query_db"] = queries.path.name if inside else str(queries.path.absolute())
        manifest["query_db_id"] = queries.manifest["db_id"]
        manifest["query_db_content"] = queries.content_id
        manifest["db_chunks"] = db.num_chunks
        manifest["db_lineage"] = _lineage(db)
        write_json_atomic(manifest_file, manifest)
    if dask is None:
        _cached_index(str(db.path), width)  # load and check the shards before the first block
    stage = BlockStage("neighbors", manifest, lambda: write_json_atomic(manifest_file, manifest), n, block_size,
                       "chunks")
    with dask_client(dask) as client:
        args = (str(db.path), str(queries.path), str(store), candidates, width, exclude_same_doc, block_size)
        execute = None
        if client is not None:  # each shard stays on the workers that own it; this process merges and writes
            owners = OwnedShards(client, db, width, replicas)
            execute = lambda todo, _args: _search_blocks_threaded(  # noqa: E731
                owners, db, queries, str(store), candidates, exclude_same_doc, block_size, todo,
                in_flight=2 * len(owners.placement()) + 2)
        stage.run(search_block, args, progress, max_blocks=max_blocks, execute=execute,
                  finish=lambda record: record.update(files=record_arrays(store, list(NEIGHBOR_ARRAYS))))
    return out


_SEARCH_CACHE: dict[tuple, tuple[RetroDB, ShardedIndex]] = {}


def _cached_index(db_path: str, width: SearchWidth) -> tuple[RetroDB, ShardedIndex]:
    """The DB and its loaded shards, kept for the next block: loading every shard costs far more than a
    block's search. One entry, so a long-lived process holds at most one index."""
    db = open_db(db_path)
    key = (db_path, db.content_id, width)  # the content, not the id: a remove must not reuse the old index
    if key not in _SEARCH_CACHE:
        _SEARCH_CACHE.clear()
        _SEARCH_CACHE[key] = (db, ShardedIndex(db, **asdict(width)))
    return _SEARCH_CACHE[key]


def search_block(
    db_path: str, queries_path: str, store: str, k: int, width: SearchWidth, exclude_same_doc: bool,
    block_size: int, block: int,
) -> tuple[int, int]:
    """Search the neighbours of query block `block` and write them to its zarr chunk of `store`."""
    db, index = _cached_index(db_path, width)
    queries = db if queries_path == db_path else open_db(queries_path)
    return _search_block_with(index, db, queries, store, k, exclude_same_doc, block_size, block)


def _search_blocks_threaded(index, db: RetroDB, queries: RetroDB, store: str, k: int, exclude_same_doc: bool,
                            block_size: int, blocks: list[int], in_flight: int) -> Iterator[tuple[int, int]]:
    """_search_block_with for each block, `in_flight` at once (each waits on the cluster), in completion order."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max(1, in_flight)) as pool:
        futures = [pool.submit(_search_block_with, index, db, queries, store, k, exclude_same_doc, block_size, b)
                   for b in blocks]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _search_block_with(index, db: RetroDB, queries: RetroDB, store: str, k: int, exclude_same_doc: bool,
                       block_size: int, block: int) -> tuple[int, int]:
    start, stop = block * block_size, min(queries.num_chunks, (block + 1) * block_size)
    vectors = load_embeddings(queries, start, stop)
    exclude = queries.chunk_doc[start:stop] if exclude_same_doc else None
    ids, dists = search_excluding(index, vectors, k, exclude, db.chunk_doc)
    root = zarr.open_group(store, mode="r+")
    root["ids"][start:stop] = ids
    root["distances"][start:stop] = dists
    return block, stop - start


def _lineage(db: RetroDB) -> dict:
    """What an update relies on staying as it was: the DB's segments and index shards so far (a later
    version only appends to both) and its removed documents (a later version only adds to them)."""
    return {"segments": [s["manifest_sha256"] for s in db.manifest.get("segments", [])],
            "shards": [s.get("sha256") for s in db.manifest.get("index", {}).get("shards", [])],
            "removed": sorted(int(d) for d in db.removed_docs)}


def _check_updatable(out: Path, manifest: dict, db: RetroDB, settings: dict) -> None:
    """Refuse, in one line, neighbours that --update cannot bring to `db`: other settings, another copy of
    the DB (same version, other content), a DB that went back to an older version, or one whose history
    does not extend the one the neighbours were computed on."""
    had = manifest["settings"]
    versions = ("db_version", "db_content")
    if {k: v for k, v in had.items() if k not in versions} != {k: v for k, v in settings.items() if k not in versions}:
        raise RetroError(f"{out}: holds neighbours computed with other settings; pass --overwrite")
    had_version = had.get("db_version", 1)
    if "db_content" not in had:
        raise RetroError(f"{out}: records no DB content id (an older retrocli); pass --overwrite")
    if had_version == db.version:
        raise RetroError(f"{out}: holds neighbours of another copy of {db.path} (version {db.version}, but other "
                         "content); pass --overwrite")
    if had_version > db.version:
        raise RetroError(f"{out}: holds neighbours of version {had_version} of {db.path}, which is at the older "
                         f"version {db.version} (an older copy took its place); pass --overwrite")
    old, new = manifest.get("db_lineage"), _lineage(db)
    if not isinstance(old, dict) or not isinstance(manifest.get("db_chunks"), int):
        return  # neighbours of an older retrocli: update_neighbors refuses them
    extends = all(isinstance(old.get(key), list) and new[key][:len(old[key])] == old[key]
                  for key in ("segments", "shards")) and set(old.get("removed", [])) <= set(new["removed"])
    if not extends or manifest["db_chunks"] > db.num_chunks:
        raise RetroError(f"{out}: holds neighbours of a version of {db.path} that is not an earlier version of "
                         "this DB (another copy took other changes); pass --overwrite")


def update_neighbors(out: Path, manifest: dict, db: RetroDB, settings: dict, progress: Progress) -> Path:
    """Bring neighbours computed on an earlier version of `db` to its current version. A row is recomputed
    when it is a new query (a chunk added to the DB that is its own query set), when one of its stored
    candidates was removed, or when a chunk added since is at least as near as its last stored candidate
    (found by searching only the added shards); every other row keeps its candidates, which a full
    recomputation would give again: the old shards are unchanged, and added chunks lie farther. (With
    removals the over-fetching of shards that hold removed chunks widens HNSW's beam, so with approximate
    search a full recomputation may differ in rows that held no removed chunk; with exact search it
    cannot.) The new arrays go to a new store, committed by the manifest."""
    old_chunks = manifest.get("db_chunks")
    if not isinstance(old_chunks, int) or not isinstance(manifest.get("db_lineage"), dict):
        raise RetroError(f"{out}: records no DB history (an older retrocli); pass --overwrite instead of --update")
    started = time.time()
    old = open_neighbors(out)
    queries = db if manifest.get("query_db_id") == db.manifest["db_id"] else query_db_of(out, old)
    n_old, width = old.ids.shape
    n = queries.num_chunks
    index = ShardedIndex(db, ef=settings["ef"], nprobe=settings.get("nprobe"), rerank=settings.get("rerank"))
    exclude_same_doc, block = settings["exclude_same_doc"], settings["block_size"]
    removed = np.flatnonzero(db.removed_chunks)
    stale = np.isin(old.ids, removed).any(axis=1)
    task = progress.start("neighbors", total=n, unit="chunks")
    if db.num_chunks > old_chunks:
        for start in range(0, n_old, block):
            stop = min(n_old, start + block)
            best_ids, best_d = index.search(load_embeddings(queries, start, stop), 1, from_chunk=old_chunks)
            stale[start:stop] |= (best_ids[:, 0] >= 0) & (best_d[:, 0] <= old.distances[start:stop, -1])
            task.advance(stop - start)
    rows = np.concatenate([np.flatnonzero(stale), np.arange(n_old, n)]).astype(np.int64)
    ids = np.full((n, width), -1, dtype=np.int64)
    dists = np.full((n, width), np.inf, dtype=np.float32)
    ids[:n_old], dists[:n_old] = old.ids, old.distances
    for start in range(0, len(rows), block):
        part = rows[start : start + block]  # ascending, so one bounded read covers the block's rows
        vectors = load_embeddings(queries, int(part[0]), int(part[-1]) + 1)[part - part[0]]
        exclude = queries.chunk_doc[part] if exclude_same_doc else None
        ids[part], dists[part] = search_excluding(index, vectors, width, exclude, db.chunk_doc)
    name = f"store-v{db.version}.zarr"
    store = out / name
    if store.exists():
        shutil.rmtree(store)
    root = zarr.open_group(str(store), mode="w")
    chunks = (min(block, max(n, 1)), width)
    root.create_array("ids", shape=(n, width), dtype=np.int64, chunks=chunks, fill_value=-1)[:] = ids
    root.create_array("distances", shape=(n, width), dtype=np.float32, chunks=chunks, fill_value=np.inf)[:] = dists
    previous = out / store_name(manifest)
    manifest.update(settings=settings, num_queries=n, db_chunks=db.num_chunks, store=name, db_lineage=_lineage(db),
                    query_db_content=queries.content_id,
                    files=record_arrays(store, list(NEIGHBOR_ARRAYS)),
                    update={"from_version": manifest["settings"].get("db_version", 1), "to_version": db.version,
                            "rows_recomputed": int(len(rows)), "rows": int(n),
                            "seconds": round(time.time() - started, 3)})
    write_json_atomic(out / MANIFEST, manifest)  # the commit; then the old store goes
    if previous != store:
        shutil.rmtree(previous, ignore_errors=True)
    task.finish()
    return out


def _check_same_embedder(db: RetroDB, other: RetroDB) -> None:
    a, b = db.manifest.get("embedder") or {}, other.manifest.get("embedder") or {}
    if a.get("sha256") != b.get("sha256") or a.get("pooling") != b.get("pooling"):
        raise RetroError(f"{other.path}: embedded with '{b.get('name')}', not the DB's embedder '{a.get('name')}'")


@contextlib.contextmanager
def neighbors_of_inputs(
    db_path: str | os.PathLike, inputs: list[str | os.PathLike], work_dir: str | os.PathLike | None,
    options: NeighborOptions, **run,
) -> Iterator[tuple[NeighborArrays, RetroDB]]:
    """Batch neighbours of a test set (chunked and embedded like the DB) and the test set as a DB. Kept in
    `work_dir` (resumable) if given, else in a temp dir removed on exit. `options` and `run` (threads,
    progress, ...) go to batch_neighbors."""
    if work_dir is not None:
        check_outside(work_dir, db_path, "--work-dir")
        for path in inputs:
            check_outside(work_dir, path, "--work-dir", "the test set", may_be_inside=True)
    tmp = tempfile.mkdtemp(prefix="retro-test-set-") if work_dir is None else None
    work = Path(tmp) / "neighbors" if tmp else Path(work_dir)
    try:
        batch_neighbors(db_path, inputs, work, options, update=True, **run)  # a work dir follows the DB's versions
        found = open_neighbors(work)
        yield found, query_db_of(work, found)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
