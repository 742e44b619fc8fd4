"""`retro knn-datastore`: build a kNN-LM datastore (format: retrocli.datastore) from a DB and a model. Two
resumable stages, each run block by block by retrocli.block_stage: the keys (the model over the DB's
documents, a block of keys at a time) and the HNSW shards over them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr

from retrocli import __version__
from retrocli.artifacts import check_outside, write_json_atomic
from retrocli.block_stage import BlockStage
from retrocli.checksums import (
    record_arrays,
)
from retrocli.cluster import dask_client
from retrocli.datastore import (
    DATASTORE_ARRAYS,
    DATASTORE_VERSION,
    INDEX_DIR,
    FinalHidden,
    check_datastore_manifest,
    model_identity,
    read_datastore_manifest,
)
from retrocli.db import (
    DATASTORE_FORMAT,
    MANIFEST,
    STORE,
    DBLike,
    RetroDB,
    as_db,
    open_db,
)
from retrocli.device import resolve_device
from retrocli.errors import RetroError
from retrocli.index import checked_shard_file, merge_top_k, shard_name, shard_record
from retrocli.index_kinds import (
    IvfPqParams,
    auto_knn_pq_bytes,
    auto_nlist,
    check_pq_bytes,
    load_shard,
    train_recorded,
    write_shard,
)
from retrocli.lock import holds_writer_lock
from retrocli.model.checkpoint import load_model, resolve_model
from retrocli.options import (
    DEFAULT_KNN_EF,
    KNN_TEMPERATURE_RANGE,
    DatastoreOptions,
    check_at_least,
    check_seed,
)
from retrocli.progress import NullProgress, Progress
from retrocli.sequences import chunk_rows, pad_id

IVFPQ_ONLY = ("pq_bytes", "nprobe")  # options that shape only an ivfpq datastore


@dataclass
class KeyPlan:
    """The windows keys come from, in DB order: window w covers chunks [starts[w], stops[w]) of document
    docs[w], and its keys are rows [offsets[w], offsets[w+1]) of the datastore."""

    starts: np.ndarray
    stops: np.ndarray
    docs: np.ndarray
    offsets: np.ndarray

    @property
    def num_keys(self) -> int:
        return int(self.offsets[-1])


def plan_keys(db: RetroDB, seq_len: int) -> KeyPlan:
    """Every live document cut into windows of seq_len // m chunks; a window of n real tokens gives n − 1
    keys (its tokens after the first)."""
    per_window = max(1, seq_len // db.chunk_size)
    first, last = db.doc_offsets[:-1], db.doc_offsets[1:]
    windows = -(-(last - first) // per_window)
    if db.removed_docs:
        windows[np.fromiter(db.removed_docs, dtype=np.int64)] = 0
    docs = np.repeat(np.arange(len(first)), windows)
    index_in_doc = np.arange(len(docs)) - np.repeat(np.cumsum(windows) - windows, windows)
    starts = first[docs] + index_in_doc * per_window
    stops = np.minimum(starts + per_window, last[docs])
    token_ends = np.concatenate([[0], np.cumsum(db.chunk_length)])
    keys = np.maximum(token_ends[stops] - token_ends[starts] - 1, 0)
    return KeyPlan(starts, stops, docs, np.concatenate([[0], np.cumsum(keys)]).astype(np.int64))


@holds_writer_lock("retro knn-datastore", "out")
def build_datastore(
    db: DBLike, model_dir, out: str | os.PathLike, options: DatastoreOptions | None = None,
    progress: Progress | None = None, dask=None, device: str = "auto", overwrite: bool = False,
    max_blocks: int | None = None,
) -> Path:
    """Build (or finish building) the kNN-LM datastore of the DB for the model `model_dir`
    at `out`: keys in resumable blocks, then the HNSW shards. `dask` runs both as tasks (workers reach
    the DB, the model and `out` at the same paths). max_blocks stops after that many new key blocks."""
    options = options or DatastoreOptions()
    progress = progress or NullProgress()
    for name in ("block_size", "shard_size", "windows_per_batch", "ef_construction"):
        check_at_least(f"--{name.replace('_', '-')}", getattr(options, name))
    check_at_least("--M", options.M, 2)
    check_at_least("--threads", options.threads, allow_none=True)
    check_seed(options.seed)
    out = Path(out)
    db = as_db(db)
    model_dir = resolve_model(model_dir, db)
    check_outside(out, db.path, "--out", "the DB")
    if out.exists() and not out.is_dir():
        raise RetroError(f"--out {out}: is a file, not a directory")
    model, _ = load_model(model_dir, db)
    identity = {**model_identity(model_dir), "d_model": model.config.d_model, "seq_len": model.config.seq_len}
    db_identity = {"path": str(db.path.absolute()), "db_id": db.manifest["db_id"], "version": db.version,
                   "content_id": db.content_id}
    plan = plan_keys(db, model.config.seq_len)
    n, d = plan.num_keys, model.config.d_model
    if options.kind == "ivfpq":  # checked now, not after hours of keys
        options = replace(options, pq_bytes=options.pq_bytes or auto_knn_pq_bytes(d))
        check_pq_bytes(d, options.pq_bytes)
    if n == 0:
        raise RetroError(f"{db.path}: no document has two tokens in a row; nothing to store")
    # an older or damaged manifest of ours is not the same datastore: replaced with --overwrite
    manifest = read_datastore_manifest(out, check_shape=False) if out.exists() else None
    # a directory of ours without its manifest (a build killed while replacing one) may be written over
    if out.exists() and manifest is None and {p.name for p in out.iterdir()} - {STORE, INDEX_DIR}:
        raise RetroError(f"{out}: exists and is not a kNN-LM datastore; refusing to write there")
    same = manifest is not None and _describes(out, manifest, identity, db_identity, options)
    if manifest is not None and not same and not overwrite:
        raise RetroError(f"{out}: a datastore for another model, DB content or options (or an older or "
                         "damaged one) is there; pass --overwrite to replace it")
    if manifest is None or not same:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)  # from here the old datastore is gone: never half-read
        root = zarr.open_group(str(out / STORE), mode="w")
        root.create_array("keys", shape=(n, d), dtype=np.float16, chunks=(options.block_size, d), fill_value=0)
        root.create_array("values", shape=(n,), dtype=np.int32, chunks=(options.block_size,), fill_value=0)
        root.create_array("doc", shape=(n,), dtype=np.int64, chunks=(options.block_size,), fill_value=0)
        for old in (out / INDEX_DIR).glob("*") if (out / INDEX_DIR).is_dir() else ():
            old.unlink()
        manifest = {
            "format": DATASTORE_FORMAT, "format_version": DATASTORE_VERSION, "created_by": f"retrocli {__version__}",
            "model": identity, "db": db_identity, "options": asdict(options),
            "counts": {"keys": n, "windows": len(plan.docs), "dim": d},
            "stages": {"keys": {"status": "running", "done_blocks": []}, "index": {"status": "missing"}},
        }
        write_json_atomic(out / MANIFEST, manifest)
    where = resolve_device(device)
    with dask_client(dask) as client:
        if manifest["stages"]["keys"]["status"] != "complete":
            if not _compute_keys(db, model_dir, out, manifest, options, progress, client, str(where), max_blocks):
                return out
        if manifest["stages"]["index"]["status"] != "complete":
            _build_index(out, manifest, options, progress, client)
    drop_indexed_keys(out, manifest)
    return out


def _describes(out: Path, manifest: dict, identity: dict, db_identity: dict, options: DatastoreOptions) -> bool:
    """Whether the manifest found at `out` is a sound one of the datastore being built (to resume it)."""
    try:
        check_datastore_manifest(out / MANIFEST, manifest)
    except RetroError:
        return False
    recorded = asdict(DatastoreOptions()) | manifest["options"]
    wanted = asdict(options) | {"threads": manifest["options"].get("threads")}
    if recorded["kind"] == wanted["kind"] == "hnsw":  # the ivfpq options shape nothing an hnsw store holds
        for name in IVFPQ_ONLY:
            recorded.pop(name), wanted.pop(name)
    return manifest["model"]["sha256"] == identity["sha256"] and \
        manifest["db"]["content_id"] == db_identity["content_id"] and recorded == wanted


def _compute_keys(db, model_dir, out: Path, manifest: dict, options: DatastoreOptions, progress, client,
                  device: str, max_blocks: int | None) -> bool:
    stage = BlockStage("knn keys", manifest["stages"]["keys"], lambda: write_json_atomic(out / MANIFEST, manifest),
                       manifest["counts"]["keys"], options.block_size, "keys")
    args = (str(db.path), str(resolve_model(model_dir)), str(out), options.block_size, options.windows_per_batch,
            options.threads if client is None else options.threads or 1, device if client is None else "auto")
    return stage.run(key_block, args, progress, client, max_blocks,
                     finish=lambda record: record.update(files=record_arrays(out / STORE, list(DATASTORE_ARRAYS))))


_TASK_STATE: dict[tuple, tuple] = {}  # in a worker: (DB, model) -> (db, model, plan), loaded once


def key_block(db_path: str, model_dir: str, out: str, block_size: int, windows_per_batch: int,
              threads: int | None, device: str, block: int) -> tuple[int, int]:
    """Keys, values and documents of datastore rows [block·B, (block+1)·B): the windows that overlap
    them run through the decoder (those cut by the block's edges in both of their blocks)."""
    if threads:
        torch.set_num_threads(threads)
    state_key = (db_path, model_dir, device)
    if state_key not in _TASK_STATE:
        _TASK_STATE.clear()
        db = open_db(db_path)
        model, _ = load_model(model_dir, db)
        model.to(resolve_device(device))
        _TASK_STATE[state_key] = (db, model, plan_keys(db, model.config.seq_len))
    db, model, plan = _TASK_STATE[state_key]
    lo, hi = block * block_size, min(plan.num_keys, (block + 1) * block_size)
    first = int(np.searchsorted(plan.offsets, lo, side="right")) - 1
    last = int(np.searchsorted(plan.offsets, hi, side="left"))
    d, pad, m = model.config.d_model, pad_id(db), db.chunk_size
    keys = np.zeros((hi - lo, d), dtype=np.float16)
    values = np.zeros(hi - lo, dtype=np.int32)
    docs = np.zeros(hi - lo, dtype=np.int64)
    target = model.wte.weight.device
    with FinalHidden(model) as hidden, torch.no_grad():
        for group_start in range(first, last, windows_per_batch):
            group = range(group_start, min(last, group_start + windows_per_batch))
            width = max(int(plan.stops[w] - plan.starts[w]) for w in group) * m
            tokens = np.full((len(group), width), pad, dtype=np.int64)
            real = np.zeros((len(group), width), dtype=bool)
            for row, w in enumerate(group):
                t, r = chunk_rows(db, int(plan.starts[w]), int(plan.stops[w]), pad)
                tokens[row, : t.size], real[row, : r.size] = t.reshape(-1), r.reshape(-1)
            model(torch.from_numpy(tokens).to(target), None, token_mask=torch.from_numpy(real).to(target),
                  need_logits=False)
            states = hidden.value.float().cpu().numpy()
            for row, w in enumerate(group):
                where = np.nonzero(real[row])[0]  # real tokens are contiguous from the window's start
                a, b = int(plan.offsets[w]), int(plan.offsets[w + 1])
                take = slice(max(a, lo) - a, min(b, hi) - a)  # this window's keys that fall in the block
                rows = slice(max(a, lo) - lo, min(b, hi) - lo)
                keys[rows] = states[row, where[:-1]][take]
                values[rows] = tokens[row, where[1:]][take]
                docs[rows] = plan.docs[w]
    root = zarr.open_group(str(Path(out) / STORE), mode="r+")
    root["keys"][lo:hi] = keys
    root["values"][lo:hi] = values
    root["doc"][lo:hi] = docs
    return block, hi - lo


def _build_index(out: Path, manifest: dict, options: DatastoreOptions, progress, client) -> None:
    state = manifest["stages"]["index"]
    if state["status"] != "running":
        state.update(status="running", shards=[], kind=options.kind)
        write_json_atomic(out / MANIFEST, manifest)
    (out / INDEX_DIR).mkdir(exist_ok=True)
    for leftover in (out / INDEX_DIR).glob("*.partial"):
        leftover.unlink()
    n, d = manifest["counts"]["keys"], manifest["counts"]["dim"]
    threads = options.threads or 1
    if options.kind == "ivfpq" and "trained" not in state:
        _train(out, state, options, n, threads, progress)
        write_json_atomic(out / MANIFEST, manifest)
    stage = BlockStage("knn index", state, lambda: write_json_atomic(out / MANIFEST, manifest), n,
                       options.shard_size, "keys", shard_records=state["shards"])
    params = {"M": options.M, "ef_construction": options.ef_construction, "seed": options.seed,
              "trained": state.get("trained")}
    args = (str(out), d, options.shard_size, options.kind, params, threads)
    stage.run(build_key_shard, args, progress, client,
              finish=lambda record: record.update(temperature_scale=_distance_scale(out, d, record, options)))


def _train(out: Path, state: dict, options: DatastoreOptions, n: int, threads: int, progress) -> None:
    """ivfpq: train the quantisers on a seeded sample of the keys (index/trained.faiss)."""
    keys = zarr.open_group(str(out / STORE), mode="r")["keys"]
    nlist = auto_nlist(n)
    state["trained"] = train_recorded(lambda a, b: np.asarray(keys[a:b], dtype=np.float32), n, "l2",
                                      IvfPqParams(nlist, options.pq_bytes, False), nlist, options.seed, threads,
                                      out / INDEX_DIR, progress, "knn train quantisers")


def drop_indexed_keys(out: Path, manifest: dict) -> None:
    """An ivfpq datastore searches the codes alone: once indexed, the fp16 keys (most of its bytes) go.
    The manifest stops recording them first, so a kill in between leaves only unrecorded files."""
    keys = manifest["stages"]["keys"]
    index = manifest["stages"]["index"]
    if index.get("kind", "hnsw") != "ivfpq" or index["status"] != "complete":
        return
    if not keys.get("keys_dropped"):
        keys["files"] = {name: record for name, record in keys["files"].items() if name != "keys"}
        keys["keys_dropped"] = True
        write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(out / STORE / "keys", ignore_errors=True)


SCALE_SAMPLE = 2048


def _distance_scale(out: Path, dim: int, state: dict, options: DatastoreOptions) -> float:
    """The median distance from a key to its nearest other key (over the first SCALE_SAMPLE keys): the
    default temperature with a fixed --lambda, so that T is on the scale of the distances (the codes'
    distances on an ivfpq datastore, which are the ones its searches return)."""
    sample = np.asarray(zarr.open_group(str(out / STORE), mode="r")["keys"][:SCALE_SAMPLE], dtype=np.float32)
    kind = state.get("kind", "hnsw")
    width = DEFAULT_KNN_EF if kind == "hnsw" else options.nprobe
    results = []
    for record in state["shards"]:
        shard = load_shard(out / record["file"], kind, "l2", dim, int(record["count"]))
        labels, distances = shard.search(sample, min(2, shard.count), width, 1)
        results.append((record["shard"], labels, distances))
    _, dists = merge_top_k(results, len(sample), 2)
    nearest_other = dists[:, 1][np.isfinite(dists[:, 1])]
    positive = nearest_other[nearest_other > 0]
    low, high = KNN_TEMPERATURE_RANGE  # what the manifest may record (keys all but identical: the low end)
    return float(np.clip(np.median(positive), low, high)) if len(positive) else 1.0


def build_key_shard(out: str, dim: int, shard_size: int, kind: str, params: dict, threads: int, shard: int) -> dict:
    """An index shard over keys [shard·S, (shard+1)·S), labelled with their rows; written via a temp name and
    checked whole before the rename. One thread gives the same file for the same keys and seed."""
    keys = zarr.open_group(str(Path(out) / STORE), mode="r")["keys"]
    start, stop = shard * shard_size, min(keys.shape[0], (shard + 1) * shard_size)
    final = Path(out) / INDEX_DIR / shard_name(shard, kind)
    trained = checked_shard_file(Path(out), params["trained"]) if kind == "ivfpq" else None
    write_shard(kind, lambda a, b: np.asarray(keys[a:b], dtype=np.float32), start, stop, 0, final, "l2", dim,
                params, threads, trained=trained)
    return shard_record(shard, final, f"{INDEX_DIR}/{final.name}", start, stop - start)
