"""`retro leakage-report`: how much of a test set already sits in the DB (paper §2.1, §2.6).

Chunk overlap (§2.6): each test chunk C gets its k nearest DB chunks, each with its continuation [N, F],
and r(C) from retrocli.overlap. A chunk leaks when r(C) > α (default 0.125: fewer than 8 of 64 tokens in
a row is "no local leakage", §4.4).

Document near-duplicates (§2.1): retrocli.near_duplicates.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from retrocli.batch_neighbors import CANDIDATES_PER_K, neighbors_of_inputs
from retrocli.db import (
    DBLike,
    RetroDB,
    as_db,
)
from retrocli.device import resolve_device
from retrocli.errors import RetroError
from retrocli.eval import bpb_summary, chunk_losses
from retrocli.model.checkpoint import load_model
from retrocli.near_duplicates import drop_near_duplicate_neighbors, near_duplicates
from retrocli.neighbors import check_k
from retrocli.options import (
    DEFAULT_TEXT_FIELD,
    LeakageOptions,
    NeighborOptions,
    check_threads,
)
from retrocli.overlap import ChunkOverlap, check_normalization, compute_overlap, shared_text
from retrocli.progress import Progress

HIST_BINS = 20


# -- the report ------------------------------------------------------------------------------------------

@dataclass
class LeakageReport:
    db: str
    test_inputs: list[str]
    k: int
    alpha: float
    ngram: int
    num_perm: int
    jaccard_threshold: float
    num_test_docs: int
    num_test_chunks: int
    leaking_chunks: int
    leaking_fraction: float
    mean_r: float
    histogram: dict
    documents: list[dict]
    examples: list[dict]
    near_duplicates: list[dict]
    near_duplicate_stats: dict
    timings: dict
    normalize: str = "text"
    normalization: dict = field(default_factory=dict)
    exclude_near_duplicates: bool = False
    bpb: dict | None = None
    db_id: str = ""
    db_version: int = 1  # the DB version the report was computed on (`retro add`/`remove` make new ones)
    db_content: str = ""  # the content id of that version (retrocli.db.content_id)
    overlap: ChunkOverlap | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("overlap")
        return data


def _example(db: RetroDB, test: RetroDB, ov: ChunkOverlap, c: int, normalize: str) -> dict:
    """One leaking chunk, split into before/shared/after text on both sides for highlighting (with
    normalisation: the normalised texts, split where they share the longest run)."""
    q = test.chunk_tokens(c)
    nid = int(ov.neighbor[c])
    s, qs, ts = int(ov.shared[c]), int(ov.q_start[c]), int(ov.t_start[c])
    pair = db.chunk_tokens(nid)
    cont = db.continuation(nid)
    if cont is not None:
        pair = np.concatenate([pair, db.chunk_tokens(cont)])
    dec = db.tokenizer.decode
    if normalize == "text" and qs == ts == 0 and s > 0:  # a normalised match (raw ones keep their offsets)
        test_text, db_text = shared_text(dec(q.tolist()), dec(pair.tolist()))
    else:
        test_text = [dec(q[:qs].tolist()), dec(q[qs:qs + s].tolist()), dec(q[qs + s:].tolist())]
        db_text = [dec(pair[:ts].tolist()), dec(pair[ts:ts + s].tolist()), dec(pair[ts + s:].tolist())]
    return {
        "test_chunk": c, "test_doc": int(ov.test_doc[c]), "test_source": test.source(int(ov.test_doc[c])),
        "r": float(ov.r[c]), "shared_tokens": s, "db_chunk": nid, "db_doc": db.doc_of(nid),
        "db_source": db.source(db.doc_of(nid)), "test_text": test_text, "db_text": db_text,
    }


NORMALIZATION_NOTES = {
    "text": {"overlap": "NFKC, whitespace runs to one space; s(C) in LM tokens of the normalised chunk, "
                        "or the raw-token s(C) where that gives the larger r(C)",
             "near_duplicates": "NFKC, lowercase, punctuation removed, whitespace runs to one space; "
                                "n-grams of the re-tokenized text"},
    "none": {"overlap": "raw LM tokens (the paper's definition)", "near_duplicates": "raw LM tokens"},
}


def leakage_report(
    db: DBLike, test_inputs: list[str | os.PathLike], options: LeakageOptions | None = None,
    work_dir: str | os.PathLike | None = None, text_field: str = DEFAULT_TEXT_FIELD, threads: int | None = None,
    progress: Progress | None = None, model_dir: str | os.PathLike | None = None, dask=None,
    exclude_near_duplicates: bool = False, device: str = "auto",
) -> LeakageReport:
    """Measure chunk overlap and near-duplicate documents of `test_inputs` against the DB. The DB is only
    read; the test set is chunked and embedded into `work_dir` (a temp dir unless given, for resuming).
    With `dask` the test set's embedding, neighbour search and overlap run on the cluster (pass a
    distributed.Client to reuse one cluster for all three); near-duplicates stay in this process."""
    options = options or LeakageOptions()
    k, alpha, examples, ef, normalize = options.k, options.alpha, options.examples, options.ef, options.normalize
    ngram, num_perm, jaccard_threshold = options.ngram, options.num_perm, options.jaccard_threshold
    if not 0 <= alpha <= 1:
        raise RetroError("--alpha: must be between 0 and 1")
    if examples < 0:
        raise RetroError("--examples: must be ≥ 0")
    check_normalization(normalize)
    check_threads(threads)
    db = as_db(db)
    check_k(db, k)
    started = time.time()
    candidates = min(db.num_chunks, CANDIDATES_PER_K * k) if exclude_near_duplicates else k
    where = resolve_device(device)
    search = NeighborOptions(k, ef, candidates=candidates, nprobe=options.nprobe, rerank=options.rerank)
    with neighbors_of_inputs(db.path, test_inputs, work_dir, search,
                             threads=threads, progress=progress, text_field=text_field, dask=dask,
                             device=str(where) if dask is None else device) as (neighbors, test):
        t_neighbors = time.time() - started
        pairs, dup_stats = near_duplicates(db, test, ngram, num_perm, jaccard_threshold, progress, normalize,
                                           dask=dask)
        ids = neighbors.ids[:, :k]
        if exclude_near_duplicates:  # r(C) then measures what retrieval finds outside the duplicated documents
            ids, replaced = drop_near_duplicate_neighbors(db, test, neighbors.ids, pairs, k)
            dup_stats["neighbours_replaced"] = replaced
        started = time.time()
        ov = compute_overlap(db, test, ids, block=512 if dask is None else 4096, progress=progress,
                             dask=dask, normalize=normalize)
        t_overlap = time.time() - started
        report = _assemble(db, test, ov, pairs, dup_stats, test_inputs, k, alpha, examples, ngram, num_perm,
                           jaccard_threshold, normalize)
        report.exclude_near_duplicates = exclude_near_duplicates
        if model_dir is not None:
            model, _ = load_model(model_dir, db)
            model.to(where)
            if model.config.num_neighbors > k:
                raise RetroError(f"--k {k} is below the model's {model.config.num_neighbors} neighbours")
            report.bpb = bpb_summary(chunk_losses(model, db, test, ids, progress=progress), ov.r)
            report.bpb["model"] = str(model_dir)
            report.bpb["copy_head"] = model.copy_head is not None
        report.timings = {"neighbors_seconds": round(t_neighbors, 3), "overlap_seconds": round(t_overlap, 3),
                          "overlap_chunks_per_second": round(len(ov.r) / max(t_overlap, 1e-9), 1),
                          "near_duplicate_seconds": dup_stats["seconds"]}
        return report


def _assemble(db, test, ov, pairs, dup_stats, test_inputs, k, alpha, examples, ngram, num_perm, threshold,
              normalize):
    n = len(ov.r)
    counts, edges = np.histogram(ov.r, bins=HIST_BINS, range=(0.0, 1.0))
    leaking = ov.r > alpha
    documents = []
    for doc in range(test.num_docs):
        sel = ov.test_doc == doc
        rs = ov.r[sel]
        documents.append({"doc": doc, "source": test.source(doc), "chunks": int(sel.sum()),
                          "max_r": float(rs.max()) if len(rs) else 0.0,
                          "mean_r": float(rs.mean()) if len(rs) else 0.0,
                          "longest_run_tokens": int(ov.shared[sel].max()) if len(rs) else 0,
                          "leaking_chunks": int((rs > alpha).sum())})
    documents.sort(key=lambda d: (-d["max_r"], -d["longest_run_tokens"], -d["mean_r"], d["doc"]))
    # The longest copies first: a full 64-token chunk at r = 1 before an 8-token final chunk at r = 1.
    order = np.lexsort((np.arange(n), -ov.r, -ov.shared))
    chosen = [int(c) for c in order if ov.r[c] > alpha][:examples]
    return LeakageReport(
        db=str(db.path), db_id=db.manifest["db_id"], db_version=db.version, db_content=db.content_id,
        test_inputs=[str(p) for p in test_inputs], k=k, alpha=alpha, ngram=ngram,
        num_perm=num_perm, jaccard_threshold=threshold, num_test_docs=test.num_docs, num_test_chunks=n,
        leaking_chunks=int(leaking.sum()), leaking_fraction=float(leaking.mean()) if n else 0.0,
        mean_r=float(ov.r.mean()) if n else 0.0,
        histogram={"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
        documents=documents, examples=[_example(db, test, ov, c, normalize) for c in chosen],
        near_duplicates=[asdict(p) for p in pairs], near_duplicate_stats=dup_stats, timings={}, overlap=ov,
        normalize=normalize, normalization=NORMALIZATION_NOTES[normalize],
    )
