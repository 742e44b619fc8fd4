"""`retro compact`: a copy of a DB without its removed documents, and the filtered copy `retro dedupe`
writes. Chunks, sources and stored vectors are copied (nothing is re-embedded), every added segment is
folded in, and the index is rebuilt with the DB's own parameters. The input DB is only read."""

from __future__ import annotations

import copy as copy_module
import os
import uuid
from pathlib import Path

import numpy as np
import zarr

from retrocli.artifacts import check_outside, write_json_atomic
from retrocli.chunk import SOURCE_ARRAYS
from retrocli.db import (
    BUILT_FORMAT_VERSION,
    CHUNK_ARRAYS,
    DOCS_PER_ZARR_CHUNK,
    EMBED_ARRAYS,
    MANIFEST,
    ROWS_PER_ZARR_CHUNK,
    STORE,
    TOKENIZER_FILE,
    DBLike,
    RetroDB,
    as_db,
    open_db,
    record_stage_arrays,
)
from retrocli.errors import RetroError
from retrocli.index import index_db, options_of
from retrocli.lock import holds_writer_lock
from retrocli.progress import Progress
from retrocli.staging import check_target, staged

_PER_DOC = ("docs/file", "docs/position", "docs/external_id")


@holds_writer_lock("retro compact", "out")
def write_filtered_db(db: RetroDB, out: Path, drop_docs: set[int], progress: Progress | None = None) -> RetroDB:
    """A new DB holding every document of `db` except `drop_docs` (and its removed ones), in one part:
    chunks, sources and embeddings are copied (nothing is re-embedded) and the index is rebuilt with the
    same parameters. `db` is not touched."""
    drop = set(drop_docs) | set(db.removed_docs)
    keep_docs = np.array([d for d in range(db.num_docs) if d not in drop], dtype=np.int64)
    if len(keep_docs) == 0:
        raise RetroError("every DB document would be removed; nothing left to write")
    keep_chunk = np.isin(db.chunk_doc, keep_docs)
    with staged(out, "retro compact", [db.path]) as partial:
        dst = zarr.open_group(str(partial / STORE), mode="w")

        def copy(name, data, rows_per_chunk):
            chunks = (min(rows_per_chunk, max(len(data), 1)), *data.shape[1:])
            text = data.dtype.kind in "UO"
            arr = dst.create_array(name, shape=data.shape, dtype=str if text else data.dtype, chunks=chunks,
                                   fill_value="" if text else 0)
            if data.size:
                arr[...] = data

        new_doc_of = np.full(db.num_docs, -1, dtype=np.int64)
        new_doc_of[keep_docs] = np.arange(len(keep_docs))
        lengths = db.array("chunks/length")[:][keep_chunk]
        copy("chunks/tokens", db.array("chunks/tokens")[:][keep_chunk], ROWS_PER_ZARR_CHUNK)
        copy("chunks/length", lengths, ROWS_PER_ZARR_CHUNK)
        copy("chunks/doc", new_doc_of[db.chunk_doc[keep_chunk]], ROWS_PER_ZARR_CHUNK)
        per_doc = np.diff(db.doc_offsets)[keep_docs]
        copy("docs/chunk_offset", np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64), DOCS_PER_ZARR_CHUNK)
        table = db.doc_table()
        has_ids = any("docs/external_id" in part.root for part in db.parts)
        for name in _PER_DOC:
            if name != "docs/external_id" or has_ids:
                copy(name, table[name][keep_docs], DOCS_PER_ZARR_CHUNK)
        copy("files/path", table["files/path"], 65536)
        digests = [part.root["files/sha256"][:] if "files/sha256" in part.root else np.full(len(part.files), "")
                   for part in db.parts]  # in the order doc_table() merges files/path
        if any((d != "").any() for d in digests):
            copy("files/sha256", np.concatenate(digests).astype(object), 65536)
        manifest = copy_module.deepcopy({k: v for k, v in db.manifest.items()
                                         if k not in ("index", "segments", "removed", "version", "history")})
        manifest["db_id"] = uuid.uuid4().hex
        manifest["format_version"] = BUILT_FORMAT_VERSION
        manifest["counts"] = {**manifest["counts"], "documents": int(len(keep_docs)),
                              "chunks": int(keep_chunk.sum()),
                              "tokens": int(lengths.astype(np.int64).sum()), "files": len(table["files/path"])}
        manifest["derived_from"] = {"db": str(db.path.absolute()), "db_id": db.manifest["db_id"],
                                    "db_version": db.version, "removed_documents": sorted(int(d) for d in drop)}
        manifest["stages"] = {"chunk": {**db.manifest["stages"]["chunk"],
                                        "files": record_stage_arrays(partial / STORE,
                                                                     CHUNK_ARRAYS + SOURCE_ARRAYS)}}
        if db.stage("embed") == "complete":
            copy("embeddings", db.array("embeddings")[:][keep_chunk], db.parts[0].root["embeddings"].chunks[0])
            manifest["stages"]["embed"] = {**db.manifest["stages"]["embed"], "copied_from": db.manifest["db_id"],
                                           "files": record_stage_arrays(partial / STORE, EMBED_ARRAYS)}
        else:
            manifest.pop("embedder", None)
        (partial / TOKENIZER_FILE).write_text((db.path / TOKENIZER_FILE).read_text(encoding="utf-8"), "utf-8")
        write_json_atomic(partial / MANIFEST, manifest)
        if db.stage("index") == "complete":
            index_db(partial, options_of(db.manifest["index"]), progress=progress)
    return open_db(out)


def compact_db(db: DBLike, out: str | os.PathLike, overwrite: bool = False,
               progress: Progress | None = None) -> RetroDB:
    """Write `out`: the DB without its removed documents, its segments folded in."""
    out = Path(out)
    db = as_db(db)
    check_outside(out, db.path, "--out")
    check_target(out, overwrite)  # before any work: a refusal after it would leave nothing but lost time
    return write_filtered_db(db, out, set(), progress)
