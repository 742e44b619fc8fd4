"""A kNN-LM datastore on disk, and reading it: for every DB token, the model's hidden state just before it
as key and the token as value.

A key is the input of the output layer (after the final norm) of the decoder run without retrieval, over
the DB's documents in windows of seq_len tokens aligned to the DB's chunks (the way eval reads test
documents). Each window's first token has no key (nothing precedes it in the window).

A datastore is a directory:

    manifest.json       format, the model's and the DB's identity, counts, stages and finished blocks
    store.zarr/keys     [N, d] float16, one zarr chunk per block of --block-size keys (resumable); an
                        ivfpq datastore deletes them once they are indexed (keys_dropped)
    store.zarr/values   [N] int32: the token that followed the key's context
    store.zarr/doc      [N] int64: the DB document of that token (for exclusions)
    index/shard-*.hnsw  HNSW (squared L2) over --shard-size keys each, sha256 in the manifest; or
    index/shard-*.faiss IVF-PQ codes (--kind ivfpq) with index/trained.faiss, the quantisers they share

The keys stage, when complete, records the size and sha256 of every file of its arrays, and readers go
through the checked store, as for a DB; the manifest names the DB by its content id. Built by
retrocli.knn_datastore.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from retrocli.artifacts import check_fields, check_files_record, read_manifest_file
from retrocli.checksums import (
    CheckedStore,
    check_files,
    check_groups,
    file_sha256,
    groups_of,
)
from retrocli.db import DATASTORE_FORMAT, MANIFEST, SHARD_SCHEMA, STORE, TRAINED_SCHEMA, RetroDB
from retrocli.errors import RetroError
from retrocli.index import checked_shard_file, index_files, merge_top_k
from retrocli.index_kinds import KINDS, Shard, load_shard
from retrocli.model.checkpoint import resolve_model
from retrocli.model.retrofit import weight_files
from retrocli.options import (
    DEFAULT_KNN_EF,
    DEFAULT_KNN_NPROBE,
    KNN_TEMPERATURE_RANGE,
    check_at_least,
    knn_temperature_ok,
)
from retrocli.progress import NullProgress, Progress
from retrocli.verify import StageCheck, VerifyResult, check_shard_files, record_bytes, record_files

DATASTORE_VERSION = 1


WEIGHTS_FILE = "model.safetensors"


INDEX_DIR = "index"


DATASTORE_ARRAYS = ("keys", "values", "doc")


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
    """The model's directory and one sha256 of its weights: model.safetensors's own, or for weights split
    into shards (the bundled model), the sha256 of their sha256s in order."""
    path = resolve_model(model_dir)
    files = weight_files(path)
    if not all(file.is_file() for file in files):
        raise RetroError(f"{path}: no {WEIGHTS_FILE} (not a retro model directory)")
    digests = [file_sha256(file) for file in files]
    digest = digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return {"path": str(path.absolute()), "sha256": digest}


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
        arrays = kept_arrays(manifest)
        if set(keys["files"]) != set(arrays):
            raise RetroError(f"{file}: field 'stages.keys.files' must record the arrays {', '.join(arrays)}")
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
        if index.get("kind", "hnsw") not in KINDS:
            raise RetroError(f"{file}: field 'stages.index.kind' must be one of {', '.join(KINDS)}")
        if index.get("kind", "hnsw") == "ivfpq":
            if not isinstance(index.get("trained"), dict):
                raise RetroError(f"{file}: field 'stages.index.trained' must be an object")
            check_fields(file, index["trained"], TRAINED_SCHEMA, "stages.index.trained.")
        covered = sorted((s["start"], s["count"]) for s in shards)
        if [start for start, _ in covered] != [sum(c for _, c in covered[:i]) for i in range(len(covered))] \
                or sum(c for _, c in covered) != counts["keys"]:
            raise RetroError(f"{file}: field 'stages.index.shards' does not cover the {counts['keys']:,} keys "
                             "exactly, in order")


def kept_arrays(manifest: dict) -> tuple[str, ...]:
    """The arrays a datastore holds: an ivfpq one drops its keys once they are indexed."""
    dropped = manifest["stages"]["keys"].get("keys_dropped")
    return tuple(name for name in DATASTORE_ARRAYS if not (dropped and name == "keys"))


class Datastore:
    """A built datastore, opened for search: its manifest's fields checked, its arrays' files against
    their record (a stat each, then each file's sha256 as it is read), every shard loaded after checking
    its sha256; values and documents in memory (12 bytes a key)."""

    def __init__(self, path: str | os.PathLike, ef: int = DEFAULT_KNN_EF, nprobe: int | None = None):
        """nprobe (ivfpq): overrides the value recorded with the datastore."""
        check_at_least("--knn-ef", ef)
        check_at_least("--knn-nprobe", nprobe, allow_none=True)
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
            shapes = {name: root[name].shape for name in kept_arrays(self.manifest)}
            self.values = root["values"][:].astype(np.int64)
            self.docs = root["doc"][:]
        except RetroError:
            raise
        except Exception as err:  # zarr raises several types for missing/corrupt metadata
            raise RetroError(f"{self.path / STORE}: cannot read the datastore's arrays ({err}); {damaged}") from None
        problem = array_shape_problem(self.manifest, shapes)
        if problem:
            raise RetroError(f"{self.path / MANIFEST}: {problem}; {damaged}")
        self.kind = self.manifest["stages"]["index"].get("kind", "hnsw")
        if nprobe is not None and self.kind == "hnsw":
            raise RetroError(f"--knn-nprobe: applies to an ivfpq datastore; {self.path} is hnsw (exact distances)")
        self.nprobe = nprobe or int(self.manifest["options"].get("nprobe", DEFAULT_KNN_NPROBE))
        self.shards: list[tuple[int, int, Shard]] = []
        for record in self.manifest["stages"]["index"]["shards"]:
            file = checked_shard_file(self.path, record, rerun="rerun `retro knn-datastore ... --overwrite`")
            try:
                shard = load_shard(file, self.kind, "l2", self.dim, int(record["count"]))
            except (RuntimeError, ValueError, MemoryError) as err:
                raise RetroError(f"{file}: cannot load index shard ({err})") from None
            self.shards.append((int(record["shard"]), int(record["start"]), shard))

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
        """The k nearest keys (rows, −1 where fewer) and squared L2 distances per query (from the codes on
        an ivfpq datastore), never a key of a document in exclude_docs: first over-fetched and filtered,
        then, for queries left short, searched again skipping those documents inside the index."""
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
        for number, start, shard in self.shards:
            count = shard.count
            live = count if allowed is None else int(allowed[start : start + count].sum())
            kk = min(k, live)
            if kk == 0:
                continue
            if allowed is None:
                labels, distances = shard.search(queries, kk, self.ef if shard.exact else self.nprobe, threads)
            elif not shard.exact:  # faiss tests the bitmap while it scans: nothing allowed is missed
                labels, distances = shard.search(queries, kk, self.nprobe, threads, allowed=allowed)
            else:
                labels, distances = self._filtered(shard.index, queries, kk, allowed, start, count)
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


def verify_datastore(path: str | os.PathLike, progress: Progress | None = None) -> VerifyResult:
    """Check every file of a kNN-LM datastore: its manifest's fields, the keys stage's zarr files against
    their sha256 (and their groups' metadata, and the arrays' shapes against the counts), and the index
    shards against theirs. A manifest that cannot be read or has a wrong field raises RetroError."""
    progress = progress or NullProgress()
    started = time.time()
    where = Path(path)
    manifest = read_datastore_manifest(where)
    keys, index = manifest["stages"]["keys"], manifest["stages"]["index"]
    shards = index_files(index) if index["status"] == "complete" else []
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
