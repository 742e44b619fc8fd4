"""`retro dedupe`: a copy of a DB without the documents a leakage report flags (paper §2.1: training
documents with 13-gram Jaccard ≥ 0.8 to a test document are removed). Chunks, sources and embeddings are
copied, nothing is re-embedded, and the index is rebuilt with the DB's own parameters."""

from __future__ import annotations

import copy as copy_module
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

from retrocli.db import (
    CHUNK_ARRAYS,
    EMBED_ARRAYS,
    MANIFEST,
    STORE,
    TOKENIZER_FILE,
    RetroDB,
    check_outside,
    open_db,
    record_stage_arrays,
    remove_db_dir,
    write_json_atomic,
)
from retrocli.errors import RetroError
from retrocli.index import IndexOptions, index_db
from retrocli.leakage import LeakageReport, leakage_report
from retrocli.lock import holds_writer_lock
from retrocli.progress import Progress


def flagged_documents(report: LeakageReport, drop_leaking_chunks: bool) -> set[int]:
    flagged = {p["db_doc"] for p in report.near_duplicates}
    if drop_leaking_chunks and report.overlap is not None:
        ov = report.overlap
        leaking = (ov.r > report.alpha) & (ov.neighbor >= 0)
        db = open_db(report.db)
        flagged |= {int(db.chunk_doc[c]) for c in ov.neighbor[leaking]}
    return flagged


@holds_writer_lock("retro dedupe", "out")
def write_filtered_db(db: RetroDB, out: Path, drop_docs: set[int], progress: Progress | None = None) -> RetroDB:
    """A new DB holding every document of `db` except `drop_docs`: chunks, sources and embeddings are copied
    (nothing is re-embedded) and the index is rebuilt with the same parameters. `db` is not touched."""
    keep_docs = np.array([d for d in range(db.num_docs) if d not in drop_docs], dtype=np.int64)
    if len(keep_docs) == 0:
        raise RetroError("every DB document would be removed; nothing left to write")
    keep_chunk = np.isin(db.chunk_doc, keep_docs)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        src = db.root
        dst = zarr.open_group(str(partial / STORE), mode="w")

        def copy(name, data):
            chunks = src[name].chunks if name in src else (len(data),)
            arr = dst.create_array(name, shape=data.shape, dtype=data.dtype,
                                   chunks=tuple(min(c, max(s, 1)) for c, s in zip(chunks, data.shape)) or None,
                                   fill_value=src[name].fill_value if name in src else 0)
            if data.size:
                arr[...] = data

        new_doc_of = np.full(db.num_docs, -1, dtype=np.int64)
        new_doc_of[keep_docs] = np.arange(len(keep_docs))
        lengths = db.root["chunks/length"][:][keep_chunk]
        copy("chunks/tokens", db.root["chunks/tokens"][:][keep_chunk])
        copy("chunks/length", lengths)
        copy("chunks/doc", new_doc_of[db.chunk_doc[keep_chunk]])
        per_doc = np.diff(db.doc_offsets)[keep_docs]
        copy("docs/chunk_offset", np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64))
        for name in ("docs/file", "docs/position", "docs/external_id"):
            if name in src:
                copy(name, src[name][:][keep_docs])
        copy("files/path", src["files/path"][:])
        manifest = copy_module.deepcopy({k: v for k, v in db.manifest.items() if k != "index"})
        manifest["db_id"] = uuid.uuid4().hex
        manifest["counts"] = {**manifest["counts"], "documents": int(len(keep_docs)),
                              "chunks": int(keep_chunk.sum()),
                              "tokens": int(lengths.astype(np.int64).sum())}
        manifest["derived_from"] = {"db": str(db.path.absolute()), "db_id": db.manifest["db_id"],
                                    "removed_documents": sorted(int(d) for d in drop_docs)}
        manifest["stages"] = {"chunk": {**db.manifest["stages"]["chunk"],
                                        "files": record_stage_arrays(partial / STORE, CHUNK_ARRAYS)}}
        if db.stage("embed") == "complete":
            emb = db.root["embeddings"]
            copy("embeddings", emb[:][keep_chunk])
            manifest["stages"]["embed"] = {**db.manifest["stages"]["embed"], "copied_from": db.manifest["db_id"],
                                           "files": record_stage_arrays(partial / STORE, EMBED_ARRAYS)}
        else:
            manifest.pop("embedder", None)
        (partial / TOKENIZER_FILE).write_text((db.path / TOKENIZER_FILE).read_text(encoding="utf-8"), "utf-8")
        write_json_atomic(partial / MANIFEST, manifest)
        if db.stage("index") == "complete":
            idx = db.manifest["index"]
            index_db(partial, IndexOptions(idx["space"], idx["M"], idx["ef_construction"], idx["shard_size"],
                                           idx.get("seed", 100)), progress=progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        remove_db_dir(out)
    os.replace(partial, out)
    return open_db(out)


def dedupe(
    db_path: str | os.PathLike, test_inputs: list[str | os.PathLike], out: str | os.PathLike,
    drop_leaking_chunks: bool = False, overwrite: bool = False, **report_options,
) -> tuple[RetroDB, LeakageReport, set[int]]:
    out = Path(out)
    db = open_db(db_path)
    check_outside(out, db.path, "--out")
    if report_options.get("work_dir") is not None:
        check_outside(report_options["work_dir"], out, "--work-dir", "the output DB")
    if out.is_symlink():
        raise RetroError(f"--out {out}: is a symbolic link; pass the directory it points to")
    if out.exists() and not overwrite:
        raise RetroError(f"{out}: already exists; pass --overwrite to replace it")
    report = leakage_report(db_path, test_inputs, **report_options)
    drop = flagged_documents(report, drop_leaking_chunks)
    new_db = write_filtered_db(db, out, drop, report_options.get("progress"))
    return new_db, report, drop
