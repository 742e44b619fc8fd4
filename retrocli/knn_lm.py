"""kNN-LM (Khandelwal et al. 2019) over a retro DB: a datastore that holds, for every DB token, the model's
hidden state just before it as key and the token as value; at evaluation or generation the next-token
distribution becomes p = λ·p_kNN + (1−λ)·p_LM, where p_kNN is the softmax of −distance / T over the K
nearest keys, spread onto their tokens.

A key is the input of the output layer (after the final norm) of the decoder run without retrieval, over
the DB's documents in windows of seq_len tokens aligned to the DB's chunks (the way eval reads test
documents). Each window's first token has no key (nothing precedes it in the window).

A datastore is a directory:

    manifest.json       format, the model's and the DB's identity, counts, stages and finished blocks
    store.zarr/keys     [N, d] float16, one zarr chunk per block of --block-size keys (resumable)
    store.zarr/values   [N] int32: the token that followed the key's context
    store.zarr/doc      [N] int64: the DB document of that token (for exclusions)
    index/shard-*.hnsw  HNSW (squared L2) over --shard-size keys each, sha256 in the manifest

Both stages record what they finished in the manifest, as the DB's stages do, so a killed build resumes.
The keys stage, when complete, records the size and sha256 of every file of its arrays, and readers go
through the checked store, as for a DB; the manifest names the DB by its content id.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hnswlib
import numpy as np
import torch
import zarr

from retrocli import __version__
from retrocli.artifacts import check_fields, check_files_record, check_outside, read_manifest_file, write_json_atomic
from retrocli.block_stage import BlockStage
from retrocli.checksums import (
    CheckedStore,
    check_files,
    check_groups,
    file_sha256,
    groups_of,
    record_arrays,
)
from retrocli.cluster import dask_client
from retrocli.db import DATASTORE_FORMAT, MANIFEST, SHARD_SCHEMA, STORE, RetroDB, open_db
from retrocli.device import resolve_device
from retrocli.errors import RetroError
from retrocli.index import check_saved_shard, checked_shard_file, merge_top_k
from retrocli.lock import holds_writer_lock
from retrocli.model.checkpoint import load_model, resolve_model
from retrocli.options import (
    DEFAULT_KNN_BLOCK,
    DEFAULT_KNN_EF,
    DEFAULT_KNN_EF_CONSTRUCTION,
    DEFAULT_KNN_M,
    DEFAULT_KNN_SEED,
    DEFAULT_KNN_SHARD,
    DEFAULT_KNN_WINDOWS,
    DEFAULT_LAMBDA_BUCKETS,
    KNN_TEMPERATURE_RANGE,
    check_at_least,
    check_seed,
    knn_temperature_ok,
)
from retrocli.progress import NullProgress, Progress
from retrocli.sequences import chunk_rows, pad_id
from retrocli.verify import StageCheck, VerifyResult, check_shard_files, record_bytes, record_files

DATASTORE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
INDEX_DIR = "index"
DATASTORE_ARRAYS = ("keys", "values", "doc")
ADD_BLOCK = 65536  # keys handed to hnswlib at once while building a shard

# --lambda auto: λ on this grid, T = scale × the median nearest-key distance on the dev documents
LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # 0 … 0.95
TEMPERATURE_SCALES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class DatastoreOptions:
    block_size: int = DEFAULT_KNN_BLOCK
    shard_size: int = DEFAULT_KNN_SHARD
    M: int = DEFAULT_KNN_M
    ef_construction: int = DEFAULT_KNN_EF_CONSTRUCTION
    seed: int = DEFAULT_KNN_SEED
    windows_per_batch: int = DEFAULT_KNN_WINDOWS
    threads: int | None = None  # torch threads for keys, hnswlib threads per shard (default: 1 per shard)


# -- which DB tokens get a key ----------------------------------------------------------------------------

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


# -- hidden states --------------------------------------------------------------------------------------

class FinalHidden:
    """Captures the output layer's input (the final norm's output) of every forward pass while open."""

    def __init__(self, model):
        self.value: torch.Tensor | None = None
        self.handle = model.ln_f.register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output):
        self.value = output.detach()

    def close(self) -> None:
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def model_identity(model_dir) -> dict:
    path = resolve_model(model_dir)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise RetroError(f"{path}: no {WEIGHTS_FILE} (not a retro model directory)")
    return {"path": str(path.absolute()), "sha256": file_sha256(weights)}


# -- building -------------------------------------------------------------------------------------------

def read_datastore_manifest(out: Path, check_shape: bool = True) -> dict | None:
    """The datastore's manifest, None when there is none; check_shape: also its fields' types and ranges
    (see check_datastore_manifest)."""
    file = out / MANIFEST
    if not file.exists():
        return None
    manifest = read_manifest_file(file, "datastore manifest", DATASTORE_FORMAT, DATASTORE_VERSION,
                                  not_this_kind="not a kNN-LM datastore")
    if check_shape:
        check_datastore_manifest(file, manifest)
    return manifest


# The manifest's shape, checked on every read so that no edit reaches a search: field -> (type, required)
_COUNT = (int, True)
DATASTORE_SCHEMA = {
    "model": ({"path": (str, True), "sha256": (str, True), "d_model": _COUNT, "seq_len": _COUNT}, True),
    "db": ({"path": (str, True), "db_id": (str, True), "version": _COUNT, "content_id": (str, True)}, True),
    "options": (dict, True),
    "counts": ({"keys": _COUNT, "windows": _COUNT, "dim": _COUNT}, True),
    "stages": ({"keys": (dict, True), "index": (dict, True)}, True),
}
OLDER_BUILD = "built by an older retrocli (no checksums, no DB content id); rebuild it with " \
    "`retro knn-datastore DB --model MODEL --out {out} --overwrite`"


def check_datastore_manifest(file: Path, manifest: dict) -> None:
    """One line naming the first field of a datastore manifest with the wrong type or an impossible
    value; a complete stage must also hold what readers rely on (checksums, shards, the temperature)."""
    if isinstance(manifest.get("db"), dict) and "content_id" not in manifest["db"]:
        raise RetroError(f"{file}: {OLDER_BUILD.format(out=file.parent)}")
    check_fields(file, manifest, DATASTORE_SCHEMA)
    counts, model = manifest["counts"], manifest["model"]
    if counts["keys"] < 1:
        raise RetroError(f"{file}: field 'counts.keys' must be ≥ 1, not {counts['keys']}")
    if counts["dim"] != model["d_model"]:
        raise RetroError(f"{file}: field 'counts.dim' ({counts['dim']}) differs from the model's d_model "
                         f"({model['d_model']})")
    for stage in ("keys", "index"):
        if manifest["stages"][stage].get("status") not in ("missing", "running", "complete"):
            raise RetroError(f"{file}: field 'stages.{stage}.status' must be missing, running or complete")
    keys, index = manifest["stages"]["keys"], manifest["stages"]["index"]
    if keys["status"] == "complete":
        if "files" not in keys:
            raise RetroError(f"{file}: {OLDER_BUILD.format(out=file.parent)}")
        check_files_record(file, keys["files"], "stages.keys.files")
        if set(keys["files"]) != set(DATASTORE_ARRAYS):
            raise RetroError(f"{file}: field 'stages.keys.files' must record the arrays {', '.join(DATASTORE_ARRAYS)}")
    if index["status"] == "complete":
        scale = index.get("temperature_scale")
        if not knn_temperature_ok(scale):
            low, high = KNN_TEMPERATURE_RANGE
            raise RetroError(f"{file}: field 'stages.index.temperature_scale' must be a number in "
                             f"[{low:g}, {high:g}], not {scale!r}")
        shards = index.get("shards")
        if not isinstance(shards, list) or not shards:
            raise RetroError(f"{file}: field 'stages.index.shards' must be a list of shards")
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict):
                raise RetroError(f"{file}: field 'stages.index.shards[{i}]' must be an object, not {shard!r}")
            check_fields(file, shard, SHARD_SCHEMA | {"sha256": (str, True)}, f"stages.index.shards[{i}].")
        covered = sorted((s["start"], s["count"]) for s in shards)
        if [start for start, _ in covered] != [sum(c for _, c in covered[:i]) for i in range(len(covered))] \
                or sum(c for _, c in covered) != counts["keys"]:
            raise RetroError(f"{file}: field 'stages.index.shards' does not cover the {counts['keys']:,} keys "
                             "exactly, in order")


@holds_writer_lock("retro knn-datastore", "out")
def build_datastore(
    db_path: str | os.PathLike, model_dir, out: str | os.PathLike, options: DatastoreOptions | None = None,
    progress: Progress | None = None, dask=None, device: str = "auto", overwrite: bool = False,
    max_blocks: int | None = None,
) -> Path:
    """Build (or finish building) the kNN-LM datastore of the DB at `db_path` for the model `model_dir`
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
    db = open_db(db_path)
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
    return out


def _describes(out: Path, manifest: dict, identity: dict, db_identity: dict, options: DatastoreOptions) -> bool:
    """Whether the manifest found at `out` is a sound one of the datastore being built (to resume it)."""
    try:
        check_datastore_manifest(out / MANIFEST, manifest)
    except RetroError:
        return False
    return manifest["model"]["sha256"] == identity["sha256"] and \
        manifest["db"]["content_id"] == db_identity["content_id"] and \
        manifest["options"] == asdict(options) | {"threads": manifest["options"].get("threads")}


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
        state.update(status="running", shards=[])
        write_json_atomic(out / MANIFEST, manifest)
    (out / INDEX_DIR).mkdir(exist_ok=True)
    for leftover in (out / INDEX_DIR).glob("*.partial"):
        leftover.unlink()
    n, d = manifest["counts"]["keys"], manifest["counts"]["dim"]
    stage = BlockStage("knn index", state, lambda: write_json_atomic(out / MANIFEST, manifest), n,
                       options.shard_size, "keys", shard_records=state["shards"])
    args = (str(out), d, options.shard_size, options.M, options.ef_construction, options.seed, options.threads or 1)
    stage.run(build_key_shard, args, progress, client,
              finish=lambda record: record.update(temperature_scale=_distance_scale(out, d, record["shards"])))


SCALE_SAMPLE = 2048


def _distance_scale(out: Path, dim: int, shards: list[dict]) -> float:
    """The median distance from a key to its nearest other key (over the first SCALE_SAMPLE keys): the
    default temperature with a fixed --lambda, so that T is on the scale of the distances."""
    sample = np.asarray(zarr.open_group(str(out / STORE), mode="r")["keys"][:SCALE_SAMPLE], dtype=np.float32)
    results = []
    for record in shards:
        index = hnswlib.Index(space="l2", dim=dim)
        index.load_index(str(out / record["file"]), max_elements=int(record["count"]))
        index.set_ef(DEFAULT_KNN_EF)
        kk = min(2, index.get_current_count())
        labels, distances = index.knn_query(sample, k=kk)
        results.append((record["shard"], labels.astype(np.int64), distances.astype(np.float32)))
    _, dists = merge_top_k(results, len(sample), 2)
    nearest_other = dists[:, 1][np.isfinite(dists[:, 1])]
    positive = nearest_other[nearest_other > 0]
    low, high = KNN_TEMPERATURE_RANGE  # what the manifest may record (keys all but identical: the low end)
    return float(np.clip(np.median(positive), low, high)) if len(positive) else 1.0


def build_key_shard(out: str, dim: int, shard_size: int, M: int, ef_construction: int, seed: int, threads: int,
                    shard: int) -> dict:
    """HNSW over keys [shard·S, (shard+1)·S), labelled with their rows; written via a temp name and checked
    whole before the rename. One thread gives the same graph for the same keys and seed."""
    keys = zarr.open_group(str(Path(out) / STORE), mode="r")["keys"]
    start, stop = shard * shard_size, min(keys.shape[0], (shard + 1) * shard_size)
    index = hnswlib.Index(space="l2", dim=dim)
    index.init_index(max_elements=stop - start, M=M, ef_construction=ef_construction, random_seed=seed)
    for block in range(start, stop, ADD_BLOCK):
        block_stop = min(stop, block + ADD_BLOCK)
        index.add_items(np.asarray(keys[block:block_stop], dtype=np.float32), np.arange(block, block_stop),
                        num_threads=threads)
    final = Path(out) / INDEX_DIR / f"shard-{shard:05d}.hnsw"
    tmp = final.with_suffix(f".{os.getpid()}.partial")
    index.save_index(str(tmp))
    check_saved_shard(tmp, "l2", dim, stop - start)
    os.replace(tmp, final)
    return {"shard": shard, "file": f"{INDEX_DIR}/{final.name}", "start": start, "count": stop - start,
            "bytes": final.stat().st_size, "sha256": file_sha256(final)}


# -- searching ------------------------------------------------------------------------------------------

class Datastore:
    """A built datastore, opened for search: its manifest's fields checked, its arrays' files against
    their record (a stat each, then each file's sha256 as it is read), every shard loaded after checking
    its sha256; values and documents in memory (12 bytes a key)."""

    def __init__(self, path: str | os.PathLike, ef: int = DEFAULT_KNN_EF):
        check_at_least("--knn-ef", ef)
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise RetroError(f"{self.path}: no kNN-LM datastore there (build one with `retro knn-datastore`)")
        self.manifest = read_datastore_manifest(self.path)
        stages = self.manifest.get("stages", {})
        if any(stages.get(s, {}).get("status") != "complete" for s in ("keys", "index")):
            raise RetroError(f"{self.path}: the datastore is not complete; rerun `retro knn-datastore` to finish it")
        self.ef, self.dim = ef, int(self.manifest["counts"]["dim"])
        records = self.manifest["stages"]["keys"]["files"]
        damaged = f"the datastore is damaged; `retro verify {self.path}` lists every problem"
        problems = check_files(self.path / STORE, records, hash_files=False)
        if problems:
            raise RetroError(f"{problems[0]}; {damaged}")
        try:
            root = zarr.open_group(store=CheckedStore(self.path / STORE, records, damaged), mode="r")
            shapes = {name: root[name].shape for name in DATASTORE_ARRAYS}
            self.values = root["values"][:].astype(np.int64)
            self.docs = root["doc"][:]
        except RetroError:
            raise
        except Exception as err:  # zarr raises several types for missing/corrupt metadata
            raise RetroError(f"{self.path / STORE}: cannot read the datastore's arrays ({err}); {damaged}") from None
        problem = array_shape_problem(self.manifest, shapes)
        if problem:
            raise RetroError(f"{self.path / MANIFEST}: {problem}; {damaged}")
        self.shards = []
        for record in self.manifest["stages"]["index"]["shards"]:
            file = checked_shard_file(self.path, record, rerun="rerun `retro knn-datastore ... --overwrite`")
            index = hnswlib.Index(space="l2", dim=self.dim)
            index.load_index(str(file), max_elements=int(record["count"]))
            self.shards.append((int(record["shard"]), int(record["start"]), index))

    @property
    def num_keys(self) -> int:
        return len(self.values)

    @property
    def temperature_scale(self) -> float:
        """The default T with a fixed λ: the median distance from a key to its nearest other key."""
        return float(self.manifest["stages"]["index"].get("temperature_scale", 1.0))

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def check_model(self, model_dir) -> None:
        """Refuse a datastore whose keys came from other weights."""
        if model_identity(model_dir)["sha256"] != self.manifest["model"]["sha256"]:
            raise RetroError(f"{self.path}: built for other model weights ({self.manifest['model']['path']}); "
                             f"rebuild it with `retro knn-datastore DB --model {model_dir or 'bundled'}`")

    def check_matches(self, model_dir, db: RetroDB) -> None:
        """Refuse a datastore built for other weights or from other DB content (another DB, another
        version, or a copy of the DB that took other changes)."""
        self.check_model(resolve_model(model_dir, db))
        if self.manifest["db"]["content_id"] != db.content_id:
            raise RetroError(f"{self.path}: built from other DB content than {db.path} holds now (another DB, "
                             f"version or copy); rebuild it with `retro knn-datastore {db.path} --model "
                             f"{model_dir or 'bundled'} --out {self.path} --overwrite`")

    def search(self, queries: np.ndarray, k: int, exclude_docs: np.ndarray | None = None,
               threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest keys (rows, −1 where fewer) and squared L2 distances per query, never a key of a
        document in exclude_docs: first over-fetched and filtered, then, for queries left short, searched
        again skipping those documents inside hnswlib."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if exclude_docs is None or len(exclude_docs) == 0:
            return self._search(queries, k, threads)
        excluded = np.isin(self.docs, exclude_docs)
        ids, dists = self._search(queries, min(self.num_keys, 2 * k + 8), threads)
        allowed = (ids >= 0) & ~excluded[np.maximum(ids, 0)]
        rank = np.where(allowed, np.cumsum(allowed, axis=1), k + 1)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_dists = np.full((len(queries), k), np.inf, dtype=np.float32)
        rows, cols = np.nonzero(rank <= k)
        out_ids[rows, rank[rows, cols] - 1], out_dists[rows, rank[rows, cols] - 1] = ids[rows, cols], dists[rows, cols]
        short = np.nonzero(allowed.sum(axis=1) < min(k, int((~excluded).sum())))[0]
        if len(short):
            out_ids[short], out_dists[short] = self._search(queries[short], k, 1, ~excluded)
        return out_ids, out_dists

    def _search(self, queries: np.ndarray, k: int, threads: int, allowed: np.ndarray | None = None):
        """Top-k over every shard, merged; `allowed` (bool per key) restricts the search to those keys."""
        results = []
        for number, start, index in self.shards:
            count = index.get_current_count()
            live = count if allowed is None else int(allowed[start : start + count].sum())
            kk = min(k, live)
            if kk == 0:
                continue
            if allowed is None:
                index.set_ef(max(self.ef, kk))
                labels, distances = index.knn_query(queries, k=kk, num_threads=threads)
            else:
                labels, distances = self._filtered(index, queries, kk, allowed, start, count)
            results.append((number, labels.astype(np.int64), distances.astype(np.float32)))
        return merge_top_k(results, len(queries), k)

    def _filtered(self, index, queries, k: int, allowed: np.ndarray, start: int, count: int):
        """hnswlib's filtered walk, with a wider beam when it comes back short; when even that fails (the
        allowed keys are few and far apart in the graph), an exact scan of the allowed keys."""
        keep = lambda label: bool(allowed[label])  # noqa: E731
        for ef in (max(self.ef, k), max(self.ef, k) * 8):
            index.set_ef(ef)
            try:
                return index.knn_query(queries, k=k, num_threads=1, filter=keep)
            except RuntimeError:
                continue
        labels = start + np.nonzero(allowed[start : start + count])[0]
        vectors = np.asarray(index.get_items(labels), dtype=np.float32)
        dists = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2)
        order = np.argsort(dists, axis=1, kind="stable")[:, :k]
        return labels[order], np.take_along_axis(dists, order, axis=1)


def array_shape_problem(manifest: dict, shapes: dict[str, tuple]) -> str | None:
    """What is wrong with the arrays' shapes against the manifest's counts, or None."""
    n, d = manifest["counts"]["keys"], manifest["counts"]["dim"]
    expected = {"keys": (n, d), "values": (n,), "doc": (n,)}
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            return f"array {name} has shape {list(shape)}, the manifest's counts say {list(expected[name])}"
    return None


# -- the interpolation ----------------------------------------------------------------------------------

def knn_target_probs(dists: np.ndarray, values: np.ndarray, targets: np.ndarray, temperature: float) -> np.ndarray:
    """p_kNN(target) per query: softmax(−d / T) over its neighbours (inf = none), summed over those whose
    value is the target; 0 where a query has no neighbour."""
    logits = np.where(np.isfinite(dists), -dists / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(top), top, 0))
    total = weights.sum(axis=1)
    hit = (weights * (values == targets[:, None])).sum(axis=1)
    return np.where(total > 0, hit / np.maximum(total, 1e-300), 0.0)


def mixed_bits(bits_lm: np.ndarray, p_knn: np.ndarray, lam) -> np.ndarray:
    """−log₂(λ·p_kNN + (1−λ)·p_LM), with p_LM = 2^−bits_lm."""
    return -np.log2(lam * p_knn + (1 - lam) * np.exp2(-bits_lm))


def knn_distribution(dists: np.ndarray, values: np.ndarray, temperature: float, vocab_size: int) -> torch.Tensor:
    """p_kNN over the vocabulary for one query (for sampling): the neighbours' softmax weights added onto
    their tokens."""
    p = torch.zeros(vocab_size, dtype=torch.float64)
    finite = np.isfinite(dists)
    if not finite.any():
        return p
    logits = -dists[finite].astype(np.float64) / temperature
    weights = np.exp(logits - logits.max())
    p.index_add_(0, torch.from_numpy(values[finite].astype(np.int64)), torch.from_numpy(weights / weights.sum()))
    return p


@dataclass
class Interpolation:
    """How p_kNN and p_LM are mixed: λ (or one λ per bucket of nearest-key distance) and T."""

    temperature: float
    lam: float
    bucket_edges: list[float] | None = None  # upper edges of the distance buckets but the last
    bucket_lambdas: list[float] | None = None

    def lambdas(self, nearest: np.ndarray) -> np.ndarray:
        """λ per query from its nearest-key distance (inf = no neighbour: λ = 0)."""
        if self.bucket_edges is None:
            lam = np.full(len(nearest), self.lam)
        else:
            lam = np.asarray(self.bucket_lambdas)[np.searchsorted(self.bucket_edges, nearest, side="left")]
        return np.where(np.isfinite(nearest), lam, 0.0)

    def bits(self, bits_lm: np.ndarray, dists: np.ndarray, values: np.ndarray, targets: np.ndarray) -> np.ndarray:
        p = knn_target_probs(dists, values, targets, self.temperature)
        return mixed_bits(bits_lm, p, self.lambdas(dists[:, 0] if dists.shape[1] else np.full(len(p), np.inf)))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def tune_interpolation(
    bits_lm: np.ndarray, dists: np.ndarray, values: np.ndarray, targets: np.ndarray,
    buckets: int = DEFAULT_LAMBDA_BUCKETS, temperature: float | None = None,
) -> tuple[Interpolation, Interpolation]:
    """On dev tokens: T (unless given) and λ minimising the total bits, then one λ per bucket of
    nearest-key distance (quantiles of the dev tokens', `buckets` of them) at that T. Returns (global,
    bucketed)."""
    nearest = dists[:, 0]
    found = np.isfinite(nearest)
    if not found.any():
        return Interpolation(temperature or 1.0, 0.0), Interpolation(temperature or 1.0, 0.0, [], [0.0])
    scale = float(np.median(nearest[found])) or 1.0
    temperatures = [temperature] if temperature else [s * scale for s in TEMPERATURE_SCALES]
    best = None
    for t in temperatures:
        p = knn_target_probs(dists, values, targets, t)
        for lam in LAMBDA_GRID:
            total = float(mixed_bits(bits_lm[found], p[found], lam).sum())
            if best is None or total < best[0]:
                best = (total, t, lam, p)
    _, t, lam, p = best
    edges = np.unique(np.quantile(nearest[found], [i / buckets for i in range(1, buckets)])).tolist()
    which = np.searchsorted(edges, nearest, side="left")
    per_bucket = []
    for b in range(len(edges) + 1):
        mask = found & (which == b)
        totals = [float(mixed_bits(bits_lm[mask], p[mask], g).sum()) for g in LAMBDA_GRID]
        per_bucket.append(LAMBDA_GRID[int(np.argmin(totals))] if mask.any() else lam)
    return Interpolation(t, lam), Interpolation(t, lam, [float(e) for e in edges], per_bucket)


def is_dev_document(text: str) -> bool:
    """--lambda auto tunes on the held-out documents this says yes to (about half, by a hash of the text,
    so the split never depends on order) and reports on the others."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 2 == 0


def verify_datastore(path: str | os.PathLike, progress: Progress | None = None) -> VerifyResult:
    """Check every file of a kNN-LM datastore: its manifest's fields, the keys stage's zarr files against
    their sha256 (and their groups' metadata, and the arrays' shapes against the counts), and the index
    shards against theirs. A manifest that cannot be read or has a wrong field raises RetroError."""
    progress = progress or NullProgress()
    started = time.time()
    where = Path(path)
    manifest = read_datastore_manifest(where)
    keys, index = manifest["stages"]["keys"], manifest["stages"]["index"]
    shards = index.get("shards", []) if index["status"] == "complete" else []
    files = keys.get("files", {}) if keys["status"] == "complete" else {}
    total = record_bytes(files) + sum(s["bytes"] for s in shards)
    task = progress.start("verify", total=max(total, 1), unit="bytes")
    checks = []
    if keys["status"] != "complete":
        checks.append(StageCheck("keys", keys["status"]))
    else:
        problems = check_groups(where / STORE, groups_of(files)) + check_files(where / STORE, files,
                                                                               on_file=task.advance)
        if not problems:
            shapes = {}
            for name in files:
                meta = where / STORE / name / "zarr.json"
                shapes[name] = json.loads(meta.read_text(encoding="utf-8"))["shape"]  # matched its sha256
            problem = array_shape_problem(manifest, shapes)
            problems += [f"{where / MANIFEST}: {problem}"] if problem else []
        checks.append(StageCheck("keys", "damaged" if problems else "complete",
                                 files=record_files(files), bytes=record_bytes(files), problems=problems))
    if index["status"] != "complete":
        checks.append(StageCheck("index", index["status"]))
    else:
        check = StageCheck("index", "complete", files=len(shards))
        rerun = f"rerun `retro knn-datastore ... --out {where} --overwrite`"
        check_shard_files(where, shards, check, task, rerun)
        checks.append(check)
    task.finish()
    return VerifyResult(str(where), not any(c.problems for c in checks), checks, time.time() - started)
