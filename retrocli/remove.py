"""`retro remove`: tombstone documents so that no search returns their chunks again.

Removal is one committed version: the manifest's `removed.documents` grows and `version` goes up by one,
in one atomic rename. Nothing is re-embedded or re-indexed; the index skips removed chunks at search time
(retrocli.index.ShardedIndex), training treats them as held out, and `retro compact` writes a DB without
them. Ids of the other documents and chunks never move.
"""

from __future__ import annotations

import fnmatch
import time

import numpy as np

from retrocli.db import (
    LIVING_FORMAT_VERSION,
    DBLike,
    RetroDB,
    commit_manifest,
    db_location,
    open_db,
)
from retrocli.errors import RetroError
from retrocli.lock import holds_writer_lock


def match_documents(db: RetroDB, sources: list[str] = (), docs: list[int] = ()) -> list[int]:
    """Document ids named by `docs` and by `sources`, shell-style globs matched against each document's
    source (`id (file:line)`, as `retro neighbors` prints it) and its absolute file:line."""
    found = set()
    for doc in docs:
        if not 0 <= int(doc) < db.num_docs:
            raise RetroError(f"--doc {doc}: no such document (the DB has {db.num_docs:,}, ids 0 to {db.num_docs - 1})")
        found.add(int(doc))
    for pattern in sources:
        hits = [d for d in range(db.num_docs)
                if fnmatch.fnmatchcase(db.source(d), pattern)
                or fnmatch.fnmatchcase(db.location(d, relative=False), pattern)]
        if not hits:
            raise RetroError(f"--source '{pattern}': matches no document of {db.path}")
        found.update(hits)
    return sorted(found)


@holds_writer_lock("retro remove", "db")
def remove_documents(db: DBLike, sources: list[str] = (), docs: list[int] = ()) -> dict:
    """Remove the documents named by `sources` (globs) and `docs` (ids) from the DB, as one
    committed version. Returns {version, removed, already_removed, live_documents, removed_chunks}."""
    if not sources and not docs:
        raise RetroError("name the documents to remove with --source GLOB or --doc ID")
    db = open_db(db_location(db))
    wanted = match_documents(db, list(sources), list(docs))
    new = [d for d in wanted if d not in db.removed_docs]
    removed = sorted(db.removed_docs | set(new))
    if len(removed) == db.num_docs:
        raise RetroError(f"{db.path}: this would remove every document; build a new DB instead")
    summary = {"version": db.version, "removed": new, "already_removed": len(wanted) - len(new),
               "live_documents": db.num_docs - len(removed)}
    if new:
        manifest = db.manifest
        manifest["version"] = db.version + 1
        manifest["format_version"] = max(manifest["format_version"], LIVING_FORMAT_VERSION)
        manifest["removed"] = {"documents": removed}
        summary["version"] = manifest["version"]
        manifest["history"] = [*manifest.get("history", []), {
            "version": manifest["version"], "op": "remove", "documents": new, "at": round(time.time(), 3)}]
        commit_manifest(db.path, manifest)  # the commit
    summary["removed_chunks"] = int(np.isin(db.chunk_doc, removed).sum())
    return summary
