"""`retro info`: what a DB holds, as a dict (for --json) that the CLI renders as a table."""

from __future__ import annotations

import os

from retrocli.db import RetroDB, open_db


def db_info(path: str | os.PathLike) -> dict:
    db: RetroDB = open_db(path)
    manifest = db.manifest
    return {
        "path": str(db.path),
        "db_id": manifest.get("db_id"),
        "format_version": manifest["format_version"],
        "chunk_size": db.chunk_size,
        "counts": manifest["counts"],
        "tokenizer": manifest["tokenizer"],
        "stages": {
            name: stage.get("status", "missing") for name, stage in manifest.get("stages", {}).items()
        },
        "corpus": manifest["stages"]["chunk"].get("corpus", {}),
        "embedder": manifest.get("embedder"),
        "index": manifest.get("index"),
        "disk_bytes": db.disk_usage(),
    }
