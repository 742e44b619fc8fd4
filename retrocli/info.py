"""`retro info`: what a DB holds, as a dict (for --json) that the CLI renders as a table."""

from __future__ import annotations

from retrocli.db import (
    DBLike,
    db_location,
    open_db,
)
from retrocli.verify import stage_health


def db_info(db: DBLike) -> dict:
    db = open_db(db_location(db), check_files=False)  # a damaged DB is shown as such, not refused
    manifest = db.manifest
    return {
        "path": str(db.path),
        "db_id": manifest.get("db_id"),
        "format_version": manifest["format_version"],
        "chunk_size": db.chunk_size,
        "counts": manifest["counts"],
        "version": db.version,
        "live": {"documents": db.num_live_docs, "chunks": int(db.num_chunks - db.removed_chunks.sum())},
        "removed": {"documents": len(db.removed_docs), "chunks": int(db.removed_chunks.sum())},
        "segments": len(manifest.get("segments", [])),
        "tokenizer": manifest["tokenizer"],
        # A complete stage whose recorded files are missing or of another size reads "damaged".
        "stages": stage_health(db.path, manifest),
        "corpus": manifest["stages"]["chunk"].get("corpus", {}),
        "embedder": manifest.get("embedder"),
        "index": manifest.get("index"),
        "disk_bytes": db.disk_usage(),
    }
