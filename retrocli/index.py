"""`retro index`: hnswlib HNSW indexes over the chunk embeddings, sharded so memory stays bounded.

Shard s holds chunks [s*S, (s+1)*S) under their global ids. A query searches every shard and merges
the per-shard top-k, which is exactly the top-k of the union of what the shards return. Shards are
written as `index/shard-NNNNN.hnsw` (hnswlib's own format, no pickle) via a temp name and rename, and
the manifest records each finished shard, so an interrupted build resumes at the next shard.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

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
from retrocli.index_kinds import (
    IvfPqParams,
    Shard,
    auto_nlist,
    check_kind,
    check_pq_bytes,
    exact_distances,
    load_shard,
    shard_suffix,
    train_recorded,
    write_shard,
)
from retrocli.lock import holds_writer_lock
from retrocli.options import DEFAULT_EF_SEARCH, IndexOptions, check_at_least
from retrocli.progress import NullProgress, Progress
from retrocli.storage import adopt_uploaded, task_location

SPACES = ("l2", "ip", "cosine")
INDEX_DIR = "index"


def index_params(options: IndexOptions, dim: int) -> dict:
    """What the manifest's index record holds about how it was built (a rebuild compares these)."""
    params = {"kind": options.kind, "space": options.space, "shard_size": options.shard_size,
              "seed": options.seed, "dim": dim}
    if options.kind == "hnsw":
        return {**params, "M": options.M, "ef_construction": options.ef_construction}
    return {**params, "nlist_option": options.nlist, "pq_bytes": options.pq_bytes, "opq": options.opq}


def options_of(recorded: dict) -> IndexOptions:
    """The options an index record was built with (compact rebuilds a DB's index with them)."""
    options = IndexOptions(kind=recorded.get("kind", "hnsw"), space=recorded["space"],
                           shard_size=int(recorded["shard_size"]), seed=int(recorded.get("seed", 100)))
    if options.kind == "hnsw":
        options.M, options.ef_construction = int(recorded["M"]), int(recorded["ef_construction"])
    else:
        options.nlist, options.pq_bytes = int(recorded["nlist_option"]), int(recorded["pq_bytes"])
        options.opq = bool(recorded["opq"])
        options.nprobe, options.rerank = int(recorded["nprobe"]), int(recorded["rerank"])
    return options


def _check_options(options: IndexOptions, dim: int) -> None:
    check_kind(options.kind)
    if options.space not in SPACES:
        raise RetroError(f"--space: must be one of {', '.join(SPACES)}, got '{options.space}'")
    check_at_least("--threads", options.threads, allow_none=True)
    if options.M < 2 or options.ef_construction < 1 or options.shard_size < 1:
        raise RetroError("--M must be ≥ 2, --ef-construction and --shard-size ≥ 1")
    check_at_least("--nlist", options.nlist, low=0)
    check_at_least("--nprobe", options.nprobe)
    check_at_least("--rerank", options.rerank, low=0)
    if options.kind == "ivfpq" and dim:
        check_pq_bytes(dim, options.pq_bytes)


@holds_writer_lock("retro index", "db")
def index_db(
    db: DBLike, options: IndexOptions | None = None, progress: Progress | None = None, dask=None,
) -> RetroDB:
    """Build (or finish building) the index shards of the DB, of `options.kind`; with `dask` (an address,
    'local:N' or a distributed.Client) one task per shard on the workers, `options.threads` per task
    (default 1). An ivfpq index first trains its quantisers on a seeded sample of the embeddings."""
    options = options or IndexOptions()
    progress = progress or NullProgress()
    db = open_db(db_location(db))
    manifest = db.manifest
    n, dim = db.num_chunks, int(manifest["embedder"]["dim"]) if manifest.get("embedder") else 0
    _check_options(options, dim)
    load_embeddings(db, 0, 0)  # raises a clear error when embed is not complete
    params = index_params(options, dim)
    search = {"nprobe": options.nprobe, "rerank": options.rerank} if options.kind == "ivfpq" else {}
    state = manifest.get("stages", {}).get("index", {})
    recorded = manifest.get("index") or {}
    if state.get("status") in ("running", "complete"):
        same = all(recorded.get(key, "hnsw" if key == "kind" else None) == value for key, value in params.items())
        if state["status"] == "complete" and same:
            if any(recorded.get(key) != value for key, value in search.items()):
                recorded.update(search)  # new search defaults: nothing to rebuild
                commit_manifest(db.path, manifest)
            return open_db(db.path)
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
        recorded = {**params, **search, "shards": []}
        manifest["index"] = recorded
        state = {"status": "running"}
        manifest.setdefault("stages", {})["index"] = state
        commit_manifest(db.path, manifest)
    for leftover in index_dir.glob("*.partial"):  # from a build (or a worker) killed while saving
        leftover.unlink()
    threads = options.threads or 1
    if options.kind == "ivfpq" and "trained" not in recorded:
        _train(db, recorded, options, threads, progress)
        commit_manifest(db.path, manifest)
    stage = BlockStage("index", state, lambda: commit_manifest(db.path, manifest), n, options.shard_size,
                       "vectors", shard_records=recorded["shards"], min_blocks=1)
    with dask_client(dask) as client:
        # One thread by default: hnswlib's graph (and faiss's k-means) then depend only on the vectors, their
        # order and --seed, so a rebuild is byte-identical. More threads are faster, and not reproducible.
        # A DB URL goes to the workers as (URL, cache dir): each fetches its shard's embeddings (and the
        # trained quantisers) from the store and uploads the shard, which this process fetches before
        # committing it.
        location = str(db.path) if client is None else task_location(db.path)
        args = (location, recorded, threads)
        # Locally, progress advances per added block; on Dask, per finished shard.
        fetch = None if isinstance(location, str) else lambda record: adopt_uploaded(db.path, [record["file"]])
        stage.run(build_shard, args, progress, client, reports_progress=True, on_result=fetch)
    return open_db(db.path)


def _train(db: RetroDB, recorded: dict, options: IndexOptions, threads: int, progress: Progress) -> None:
    """Train the ivfpq quantisers on a seeded sample of the DB's embeddings; records index/trained.faiss."""
    n = db.num_chunks
    nlist = options.nlist or auto_nlist(n)
    if nlist > n:
        raise RetroError(f"--nlist {nlist} is more than the DB's {n:,} chunks")
    params = IvfPqParams(nlist, options.pq_bytes, options.opq, fast_scan=True)
    recorded["trained"] = train_recorded(lambda a, b: load_embeddings(db, a, b), n, options.space, params,
                                         nlist, options.seed, threads, db.path / INDEX_DIR, progress,
                                         "train quantisers")


def trained_file(db_path: Path, recorded: dict) -> Path:
    """The checked trained ivfpq index of an index record (read by shard builds and by add)."""
    return checked_shard_file(db_path, recorded["trained"])


def build_shard(location: str | tuple[str, str], recorded: dict, threads: int, task, shard: int) -> dict:
    """Build shard `shard` from its embeddings and move it into place; returns its manifest record.
    `location` is the DB's path, or (URL, cache dir) for a DB on object storage: the worker then fetches
    the shard's embedding chunks into its partial copy and uploads the shard file."""
    shard_size = int(recorded["shard_size"])
    start = shard * shard_size
    db, mirror = open_task_db(location, "embeddings", start, start + shard_size)
    stop = min(db.num_chunks, start + shard_size)
    kind = recorded.get("kind", "hnsw")
    final = db.path / INDEX_DIR / shard_name(shard, kind)
    final.parent.mkdir(exist_ok=True)
    trained = trained_file(db.path, recorded) if kind == "ivfpq" else None
    write_shard(kind, lambda a, b: load_embeddings(db, a, b), start, stop, 0, final, recorded["space"],
                int(recorded["dim"]), recorded, threads, task, trained=trained)
    relative = f"{INDEX_DIR}/{final.name}"
    if mirror is not None:
        mirror.upload([relative])
    return shard_record(shard, final, relative, start, stop - start)


def shard_name(shard: int, kind: str = "hnsw") -> str:
    return f"shard-{shard:05d}{shard_suffix(kind)}"


def shard_record(shard: int, final: Path, relative: str, start: int, count: int) -> dict:
    """A shard's manifest record; `relative` is its file's path inside the DB."""
    return {"shard": shard, "file": relative, "start": start, "count": count, "bytes": final.stat().st_size,
            "sha256": file_sha256(final)}


_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) of shard files checked in this process


def index_files(recorded: dict) -> list[dict]:
    """Every file record of an index: its shards, and an ivfpq index's trained quantisers."""
    return [*recorded.get("shards", []), *([recorded["trained"]] if "trained" in recorded else [])]


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
RERANK_CACHE_BYTES = 512 * 2**20  # embedding blocks kept for re-ranking (≈ 350k 384-d vectors)


class VectorRows:
    """Rows of the DB's stored (fp16) embeddings, read in blocks of `rows` and kept (as float32) up to `max_bytes`
    (least recently used dropped): re-ranking reads a few hundred scattered rows a query, and a zarr
    chunk decodes whole."""

    def __init__(self, db: RetroDB, rows: int = 4096, max_bytes: int = RERANK_CACHE_BYTES):
        self.db, self.rows, self.max_bytes = db, rows, max_bytes
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0

    def _block(self, number: int) -> np.ndarray:
        block = self._cache.get(number)
        if block is not None:
            self._cache.move_to_end(number)
            return block
        start = number * self.rows
        # float32 once here: converting fp16 on every gather costs more than the distances
        block = np.asarray(self.db.array("embeddings")[start : min(start + self.rows, self.db.num_chunks)],
                           dtype=np.float32)
        self._cache[number] = block
        self._bytes += block.nbytes
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return block

    def take(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows for `ids` (any shape, all ≥ 0), shaped ids.shape + (dim,)."""
        flat = ids.reshape(-1)
        order = np.argsort(flat, kind="stable")
        ordered = flat[order]
        blocks, starts = np.unique(ordered // self.rows, return_index=True)
        out = None
        for number, start, stop in zip(blocks.tolist(), starts.tolist(), [*starts[1:].tolist(), len(flat)]):
            block = self._block(number)
            if out is None:
                out = np.empty((len(flat), block.shape[1]), dtype=np.float32)
            out[order[start:stop]] = block.take(ordered[start:stop] - number * self.rows, axis=0)
        if out is None:
            return np.empty((*ids.shape, 0), dtype=np.float32)
        return out.reshape(*ids.shape, -1)


def rerank_exact(rows: VectorRows, space: str, vectors: np.ndarray, ids: np.ndarray, k: int,
                 block: int = 64):
    """The top-k of candidate ids (−1 = none) by their true distances to the queries, computed from the
    stored embeddings (in blocks of queries, so the gathered candidates stay in cache); ties by id, as
    merge_top_k orders them."""
    valid = ids >= 0
    exact = np.full(ids.shape, np.inf, dtype=np.float32)
    for start in range(0, len(ids), block):
        part = slice(start, start + block)
        if valid[part].any():
            candidates = rows.take(np.where(valid[part], ids[part], 0))
            exact[part] = np.where(valid[part], exact_distances(vectors[part], candidates, space), np.inf)
    order = np.lexsort((np.where(valid, ids, np.iinfo(np.int64).max), exact), axis=1)[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_d = np.take_along_axis(exact, order, axis=1)
    top_ids[~np.isfinite(top_d)] = -1
    return top_ids, top_d


@dataclass(frozen=True)
class SearchWidth:
    """How wide a search looks: HNSW's ef, or on ivfpq the lists visited and the candidates re-ranked (None:
    the values recorded with the index). A read command's --nprobe/--rerank change them for that run only."""

    ef: int = DEFAULT_EF_SEARCH
    nprobe: int | None = None
    rerank: int | None = None

    def __post_init__(self):
        check_at_least("--ef", self.ef)
        check_at_least("--nprobe", self.nprobe, allow_none=True)
        check_at_least("--rerank", self.rerank, low=0, allow_none=True)

    def settings(self, db: RetroDB) -> dict:
        """What a search with this width depends on, for a record of its results: on ivfpq the values in
        force, on hnsw nothing beyond ef (so results recorded before these options existed still match)."""
        meta = db.manifest.get("index", {})
        if meta.get("kind", "hnsw") == "hnsw":
            if self.nprobe is not None or self.rerank is not None:
                option = "--nprobe" if self.nprobe is not None else "--rerank"
                raise RetroError(f"{option}: applies to an ivfpq index; {db.path} has an hnsw index, whose "
                                 "distances are already exact (its search width is --ef)")
            return {"ef": self.ef}
        return {"ef": self.ef, "nprobe": self.nprobe or int(meta["nprobe"]),
                "rerank": int(meta["rerank"]) if self.rerank is None else self.rerank}


class ShardedIndex:
    """All shards of a DB, loaded for search. Exact merge of per-shard top-k. Chunks of removed documents
    are never returned: a shard with a few of them is searched for k + (their number) and they are
    dropped; with more, the index's filtered search skips them. On a quantised kind (ivfpq) every shard
    returns its top `rerank` by approximate distance, and the merged candidates are re-ranked with the
    stored embeddings, so the distances returned are always the true ones."""

    def __init__(self, db: RetroDB, ef: int = DEFAULT_EF_SEARCH, shards: Iterable[int] | None = None,
                 nprobe: int | None = None, rerank: int | None = None):
        """shards: load only these shard numbers (a Dask worker's own); None loads every shard.
        nprobe, rerank (ivfpq): override the settings recorded with the index."""
        width = SearchWidth(ef, nprobe, rerank)
        if db.stage("index") != "complete":
            raise RetroError(f"{db.path}: index stage is not complete; run `retro index {db.path}`")
        meta = db.manifest["index"]
        self.db, self.db_path = db, db.path
        self.kind = meta.get("kind", "hnsw")
        in_force = width.settings(db)  # refuses ivfpq's options on an hnsw index
        self.space, self.dim = meta["space"], int(meta["dim"])
        self.size = db.num_chunks
        self.ef = ef
        self.nprobe, self.rerank = in_force.get("nprobe", ef), in_force.get("rerank", 0)
        self.removed = db.removed_chunks
        self.records = {int(s["shard"]): s for s in meta["shards"]}
        # shard number -> (loaded shard, first chunk, removed chunks in it), in shard order
        self.loaded: dict[int, tuple[Shard, int, int]] = {}
        self._rows: VectorRows | None = None
        check_shard_coverage(db.path, db.manifest)
        self.load(self.records if shards is None else shards)

    @property
    def exact(self) -> bool:
        return self.kind == "hnsw"

    @cached_property
    def allowed(self) -> np.ndarray:
        """bool [N]: the live chunks, made only when a shard has removed ones to filter out."""
        return ~self.removed

    def candidates(self, k: int) -> int:
        """How many each shard returns for a top-k: k, or the re-ranked candidates on a quantised kind."""
        return k if self.exact or not self.rerank else max(k, self.rerank)

    def load(self, shards: Iterable[int]) -> None:
        """Load (after checking) the given shards that are not loaded yet."""
        for number in sorted(set(shards) - self.loaded.keys()):
            if number not in self.records:
                raise RetroError(f"{self.db_path}: the index has no shard {number}")
            shard = self.records[number]
            file = checked_shard_file(self.db_path, shard)
            try:
                loaded = load_shard(file, self.kind, self.space, self.dim, int(shard["count"]))
            except (RuntimeError, ValueError, MemoryError) as err:
                raise RetroError(f"{file}: cannot load index shard ({err})") from None
            if loaded.count != shard["count"]:
                raise RetroError(f"{file}: index shard is corrupt (holds {loaded.count} "
                                 f"vectors, manifest says {shard['count']})")
            start = int(shard["start"])
            self.loaded[number] = (loaded, start, int(self.removed[start : start + shard["count"]].sum()))
        self.loaded = dict(sorted(self.loaded.items()))

    def search(self, vectors: np.ndarray, k: int, threads: int = 1,
               from_chunk: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids (int64) and distances (float32) per query; -1 / inf where fewer than k exist.
        from_chunk: search only the shards that start there or later (the chunks added since)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        wide = self.candidates(k)
        ids, dists = merge_top_k(self.search_shards(vectors, k, threads, from_chunk), len(vectors), wide)
        return self.finish(vectors, ids, dists, k)

    def finish(self, vectors: np.ndarray, ids: np.ndarray, dists: np.ndarray, k: int):
        """The final top-k of the merged candidates: re-ranked by true distance on a quantised kind."""
        if self.exact or not self.rerank:
            return ids[:, :k], dists[:, :k]
        if self._rows is None:
            self._rows = VectorRows(self.db)
        return rerank_exact(self._rows, self.space, vectors, ids, k)

    def search_shards(self, vectors: np.ndarray, k: int, threads: int = 1,
                      from_chunk: int = 0) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Each loaded shard's own top candidates, as (shard, ids, distances); merge_top_k combines them
        and `finish` cuts (or re-ranks) them to the top-k."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) == 0 or k == 0:
            return []
        k = self.candidates(k)
        results = []
        for number, (shard, start, removed) in self.loaded.items():
            if start < from_chunk:
                continue
            labels, distances = self._search_shard(shard, removed, vectors, k, threads)
            if labels is not None:
                results.append((number, labels, distances))
        return results

    def _search_shard(self, shard: Shard, removed: int, vectors: np.ndarray, k: int, threads: int):
        """One shard's top-k live chunks per query (ids −1 and distance inf where it has fewer)."""
        live = shard.count - removed
        kk = min(k, live)
        if kk <= 0:
            return None, None
        width = self.ef if self.exact else self.nprobe
        if removed == 0:
            return shard.search(vectors, kk, width, threads)
        if removed > FILTER_ABOVE or not shard.exact:
            try:  # faiss filters while it scans; hnswlib's filtered walk can come back short
                return shard.search(vectors, kk, width, threads, allowed=self.allowed)
            except RuntimeError:  # the filtered walk found fewer than k: fetch past the removed ones
                pass
        wide = min(kk + removed, shard.count)
        labels, distances = shard.search(vectors, wide, max(width, wide), threads)
        keep = (labels >= 0) & ~self.removed[np.maximum(labels, 0)]
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
