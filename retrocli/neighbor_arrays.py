"""Precomputed neighbours on disk (what `retro neighbors --input X --out NB` writes and training reads):

    NB/manifest.json   format, settings, the DB's and the queries' identity, status, checksums of the arrays
    NB/store.zarr      ids [Q, K] int64 (-1: none) and distances [Q, K] float32, one row per query chunk
                       (store-vN.zarr after `--update` brought them to version N of the DB)
    NB/queries/        the query set as a DB, when it was a corpus chunked and embedded here

Reading them needs neither torch nor the index: `retro verify` and training open them through here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from retrocli.artifacts import check_files_record, read_manifest_file
from retrocli.checksums import CheckedStore
from retrocli.db import MANIFEST, STORE, RetroDB, open_db
from retrocli.errors import RetroError

NEIGHBORS_FORMAT = "retrocli-neighbors"


NEIGHBORS_VERSION = 1


NEIGHBOR_ARRAYS = ("ids", "distances")


def store_name(manifest: dict) -> str:
    """The zarr store the manifest names: store.zarr, or store-vN.zarr after an update to version N."""
    name = manifest.get("store", STORE)
    if not re.fullmatch(r"store(-v[0-9]+)?\.zarr", str(name)):
        raise RetroError(f"neighbours manifest names an unsafe store {name!r}")
    return name


def read_neighbors_manifest(path: Path) -> dict:
    file = path / MANIFEST
    manifest = read_manifest_file(file, "neighbours manifest", NEIGHBORS_FORMAT, NEIGHBORS_VERSION,
                                  {"status": (str, True), "settings": (dict, True), "files": (dict, False)},
                                  not_this_kind="not a neighbours directory")
    if manifest["status"] not in ("running", "complete"):
        raise RetroError(f"{file}: field 'status' must be running or complete, not {manifest['status']!r}")
    return manifest


@dataclass
class NeighborArrays:
    ids: np.ndarray
    distances: np.ndarray
    manifest: dict


def open_neighbors(path: str | os.PathLike) -> NeighborArrays:
    """Read a finished batch-neighbours directory: ids and distances [num_chunks, k], -1 for missing."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise RetroError(f"{path}: not a neighbours directory (no {MANIFEST})")
    manifest = read_neighbors_manifest(path)
    if manifest["status"] != "complete":
        raise RetroError(f"{path}: batch neighbours are incomplete; rerun the same `retro neighbors` command")
    rerun = "rerun the same `retro neighbors` command with --overwrite"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(NEIGHBOR_ARRAYS):
        raise RetroError(f"{path / MANIFEST}: records no checksums for its arrays (an older retrocli); {rerun}")
    check_files_record(path / MANIFEST, files, "files")
    try:
        store = path / store_name(manifest)
        root = zarr.open_group(store=CheckedStore(store, files, f"the neighbours are damaged; {rerun}"), mode="r")
        return NeighborArrays(root["ids"][:], root["distances"][:], manifest)
    except RetroError:
        raise
    except Exception as err:  # zarr raises several types for missing/corrupt metadata
        raise RetroError(f"{path / STORE}: cannot read the neighbours ({err}); {rerun}") from None


def query_db_of(path: str | os.PathLike, neighbors: NeighborArrays) -> RetroDB:
    """The DB whose chunks were the queries: `path`/queries for a chunked test set (it must stay inside
    `path`), else the DB recorded by path, which must still be the one with the recorded id."""
    path, recorded = Path(path), neighbors.manifest.get("query_db")
    if not isinstance(recorded, str) or not recorded:
        raise RetroError(f"{path / MANIFEST}: field 'query_db' is missing")
    query_path = path / recorded if not Path(recorded).is_absolute() else Path(recorded)
    if not Path(recorded).is_absolute() and path.resolve() not in query_path.resolve().parents:
        raise RetroError(f"{path / MANIFEST}: query_db '{recorded}' lies outside {path}; refusing to read it")
    queries = open_db(query_path)
    recorded_content = neighbors.manifest.get("query_db_content")
    if queries.manifest["db_id"] != neighbors.manifest.get("query_db_id") or \
            (recorded_content is not None and recorded_content != queries.content_id):
        raise RetroError(f"{query_path}: is not the DB these neighbours were computed for (its content differs); "
                         f"rerun `retro neighbors` with --overwrite")
    return queries
