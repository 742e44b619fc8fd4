"""`retro dedupe`: a copy of a DB without the documents a leakage report flags (paper §2.1: training
documents with 13-gram Jaccard ≥ 0.8 to a test document are removed). Chunks, sources and embeddings are
copied, nothing is re-embedded, and the index is rebuilt with the DB's own parameters."""

from __future__ import annotations

import os
from pathlib import Path

from retrocli.artifacts import check_outside
from retrocli.compact import write_filtered_db
from retrocli.db import (
    DBLike,
    RetroDB,
    as_db,
    open_db,
)
from retrocli.leakage import LeakageReport, leakage_report
from retrocli.staging import check_target


def flagged_documents(report: LeakageReport, drop_leaking_chunks: bool) -> set[int]:
    flagged = {p["db_doc"] for p in report.near_duplicates}
    if drop_leaking_chunks and report.overlap is not None:
        ov = report.overlap
        leaking = (ov.r > report.alpha) & (ov.neighbor >= 0)
        db = open_db(report.db)
        flagged |= {int(db.chunk_doc[c]) for c in ov.neighbor[leaking]}
    return flagged


def dedupe(
    db: DBLike, test_inputs: list[str | os.PathLike], out: str | os.PathLike,
    drop_leaking_chunks: bool = False, overwrite: bool = False, **report_options,
) -> tuple[RetroDB, LeakageReport, set[int]]:
    out = Path(out)
    db = as_db(db)
    check_outside(out, db.path, "--out")
    if report_options.get("work_dir") is not None:
        check_outside(report_options["work_dir"], out, "--work-dir", "the output DB")
    check_target(out, overwrite)  # before the leakage report: a refusal after it would waste the work
    report = leakage_report(db, test_inputs, **report_options)
    drop = flagged_documents(report, drop_leaking_chunks)
    new_db = write_filtered_db(db, out, drop, report_options.get("progress"))
    return new_db, report, drop
