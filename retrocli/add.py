"""`retro add`: new documents into a built DB, without touching what is there.

The documents become a segment, `DB/segments/NNNNN` (NNNNN = the version the add commits): a DB directory
of its own, chunked with the DB's tokenizer and chunk size and embedded with its embedder, plus index
shards of its vectors under their global ids. Its documents and chunks take the next ids; no existing
id, chunk, vector or file changes. Nothing is visible until the last step rewrites the DB's manifest
(atomically, one rename) with the segment, its shards, the new counts and version + 1. Killed before
that, the DB is still at the old version; the same command run again resumes the segment (chunking is
redone, finished embedding blocks and shards are kept) and commits it.

Embedding batches hold chunks of one BERT length (retrocli.embed.length_batches), so an added chunk's
vector is the one a rebuild of the whole corpus gives it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from retrocli.checksums import file_sha256
from retrocli.chunk import chunk_corpus, source_identity
from retrocli.corpus import expand_inputs, file_name, record_name
from retrocli.db import (
    LIVING_FORMAT_VERSION,
    MANIFEST,
    SEGMENTS_DIR,
    TOKENIZER_FILE,
    DBLike,
    RetroDB,
    commit_manifest,
    db_location,
    load_embeddings,
    open_db,
    read_manifest,
    stage_status,
)
from retrocli.embed import embed_db
from retrocli.errors import RetroError
from retrocli.index import INDEX_DIR, shard_name, shard_record, trained_file
from retrocli.index_kinds import check_saved, write_shard
from retrocli.lock import holds_writer_lock
from retrocli.options import DEFAULT_BLOCK_SIZE, DEFAULT_EMBED_BATCH, ChunkOptions, EmbedOptions, check_threads
from retrocli.progress import NullProgress, Progress

# For tests of kill -9 at a given step: with RETRO_TEST_PAUSE_ADD_AT=STEP:FILE the process creates FILE
# when it reaches STEP (chunk, embed, index or commit) and waits there to be killed.
PAUSE_ENV = "RETRO_TEST_PAUSE_ADD_AT"


def _pause_point(step: str) -> None:
    wanted, _, marker = os.environ.get(PAUSE_ENV, "").partition(":")
    if wanted == step and marker:
        Path(marker).touch()
        while True:
            time.sleep(1)


@holds_writer_lock("retro add", "db")
def add_documents(
    db: DBLike,
    inputs: list[str | os.PathLike],
    text_field: str | None = None,
    id_field: str | None = None,
    strict: bool | None = None,
    allow_duplicates: bool = False,
    batch_size: int = DEFAULT_EMBED_BATCH,
    threads: int | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """Add the documents of `inputs` to the built DB as one committed version. Returns what was
    added: {version, first_doc, documents, first_chunk, chunks, tokens, seconds}. Corpus options default
    to the ones the DB was chunked with."""
    started = time.time()
    progress = progress or NullProgress()
    check_threads(threads)
    db = open_db(db_location(db))
    if db.stage("index") != "complete":
        raise RetroError(f"{db.path}: is not fully built (index stage {db.stage('index')}); finish it with "
                         f"`retro build-db` before adding documents")
    inside = db.path.resolve()
    for item in inputs:
        resolved = Path(item).resolve()
        if resolved == inside or inside in resolved.parents:
            raise RetroError(f"{item}: lies inside the DB {db.path}; add documents from outside it")
    recorded = db.manifest["stages"]["chunk"].get("options", {})
    options = ChunkOptions(
        chunk_size=db.chunk_size, tokenizer=str(db.path / TOKENIZER_FILE),
        text_field=text_field if text_field is not None else recorded.get("text_field", "text"),
        id_field=id_field if id_field is not None else recorded.get("id_field"),
        strict=strict if strict is not None else bool(recorded.get("strict", False)),
        allow_duplicates=allow_duplicates,
    )
    files = expand_inputs(inputs, allow_duplicates)  # every path checked before any work
    if not allow_duplicates:
        _refuse_known_files(db, files)

    version = db.version + 1
    relative = f"{SEGMENTS_DIR}/{version:05d}"
    segment = db.path / relative
    (db.path / SEGMENTS_DIR).mkdir(exist_ok=True)
    wanted_inputs = [str(Path(p).absolute()) for p in inputs]
    if segment.exists() or segment.is_symlink():
        # left by an add that was killed before its commit: resume it if it is this add, else start over
        try:
            state = read_manifest(segment)["stages"]["chunk"]
            same = state.get("inputs") == wanted_inputs and state.get("options") == options.__dict__
        except (RetroError, KeyError, TypeError):
            same = False
        if not same or segment.is_symlink():
            _remove(segment)
    for leftover in (db.path / SEGMENTS_DIR).iterdir():  # uncommitted work of other versions
        if leftover.name != f"{version:05d}" and leftover.name not in _committed(db):
            _remove(leftover)

    if not (segment / MANIFEST).exists():
        _pause_point("chunk")
        chunk_corpus(inputs, segment, options, progress=progress)
    embedder = db.manifest["embedder"]
    block_size = int(db.manifest["stages"]["embed"].get("block_size", DEFAULT_BLOCK_SIZE))
    if stage_status(read_manifest(segment), "embed") != "complete":
        _pause_point("embed")
    options = EmbedOptions(embedder["name"], embedder["precision"], batch_size, threads, block_size)
    added = embed_db(segment, options, progress=progress, device=device)
    if added.manifest["embedder"]["sha256"] != embedder["sha256"]:
        raise RetroError(f"embedder '{embedder['name']}' here has other weights than the DB was built with")
    _pause_point("index")
    shards = _index_segment(db, added, relative, progress)
    _pause_point("commit")

    manifest = db.manifest
    first_doc, first_chunk = db.num_docs, db.num_chunks
    counts = added.manifest["counts"]
    manifest["segments"] = [*manifest.get("segments", []), {
        "path": relative, "db_id": added.manifest["db_id"],
        "manifest_sha256": file_sha256(segment / MANIFEST),
        "first_doc": first_doc, "first_chunk": first_chunk, "documents": counts["documents"],
        "chunks": counts["chunks"], "tokens": counts["tokens"], "version": version,
    }]
    manifest["index"]["shards"] = [*manifest["index"]["shards"], *shards]
    manifest["counts"] = {**manifest["counts"], "documents": first_doc + counts["documents"],
                          "chunks": first_chunk + counts["chunks"],
                          "tokens": manifest["counts"]["tokens"] + counts["tokens"],
                          "files": manifest["counts"].get("files", 0) + counts.get("files", 0)}
    manifest["version"] = version
    manifest["format_version"] = max(manifest["format_version"], LIVING_FORMAT_VERSION)
    summary = {"version": version, "first_doc": first_doc, "documents": counts["documents"],
               "first_chunk": first_chunk, "chunks": counts["chunks"], "tokens": counts["tokens"],
               "seconds": round(time.time() - started, 3)}
    manifest["history"] = [*manifest.get("history", []), {"version": version, "op": "add",
                                                          "inputs": wanted_inputs, **summary}]
    commit_manifest(db.path, manifest)  # the commit
    return summary


def _known_files(db: RetroDB) -> dict[tuple[str, str], str]:
    """Every file the DB's documents came from, under each key that identifies it: ("name", the name
    recorded), ("path", the real path it stands for, resolved) and ("sha256", its content, where the part
    recorded it); each maps to the recorded name. Escaped names and real paths are kept apart: a real path
    can read like another file's escaped name."""
    known: dict[tuple[str, str], str] = {}
    for part in db.parts:
        names = [str(name) for name in part.files]
        digests = part.root["files/sha256"][:] if "files/sha256" in part.root else [""] * len(names)
        for name, digest in zip(names, digests, strict=True):
            known.setdefault(("name", name), name)
            path = file_name(name)
            known.setdefault(("path", path if "://" in name else os.path.realpath(path)), name)
            if digest:
                known.setdefault(("sha256", str(digest)), name)
    return known


def _refuse_known_files(db: RetroDB, files: list[Path]) -> None:
    """One line for the first file the DB holds already, by name, resolved path or content."""
    known = _known_files(db)
    for file in files:
        for key in (("name", record_name(file)), ("path", source_identity(file)), ("sha256", file_sha256(file))):
            if key in known:
                same = "" if known[key] == record_name(file) else f" (as {known[key]})"
                raise RetroError(f"{file}: is already in {db.path}{same}; pass --allow-duplicates to add it again")


def _committed(db: RetroDB) -> set[str]:
    return {Path(record["path"]).name for record in db.manifest.get("segments", [])}


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def _index_segment(db: RetroDB, segment: RetroDB, relative: str, progress: Progress) -> list[dict]:
    """Index shards of the segment's vectors, labelled with their global chunk ids, of the DB's index kind
    and parameters, in `segment/index/`; returns their manifest records. A shard already there whole is
    kept. An ivfpq index is not retrained: the vectors are added to the DB's trained quantisers."""
    params = db.manifest["index"]
    kind, space, dim = params.get("kind", "hnsw"), params["space"], int(params["dim"])
    shard_size = int(params["shard_size"])
    trained = trained_file(db.path, params) if kind == "ivfpq" else None
    first_chunk, n = db.num_chunks, segment.num_chunks
    next_shard = 1 + max((int(s["shard"]) for s in params["shards"]), default=-1)
    directory = segment.path / INDEX_DIR
    directory.mkdir(exist_ok=True)
    task = progress.start("index", total=n, unit="vectors")
    records = []
    for i, start in enumerate(range(0, n, shard_size)):
        stop = min(n, start + shard_size)
        final = directory / shard_name(i, kind)
        try:
            if not final.exists():
                raise RuntimeError("not built yet")
            check_saved(final, kind, stop - start, space, dim)  # whole: kept from an interrupted add
        except (OSError, RuntimeError):
            write_shard(kind, lambda a, b: load_embeddings(segment, a, b), start, stop, first_chunk, final, space,
                        dim, params, 1, trained=trained)
        task.advance(stop - start)
        records.append(shard_record(next_shard + i, final, f"{relative}/{INDEX_DIR}/{final.name}",
                                    first_chunk + start, stop - start))
    task.finish()
    return records
