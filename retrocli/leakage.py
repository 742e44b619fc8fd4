"""`retro leakage-report`: how much of a test set already sits in the DB (paper §2.1, §2.6).

Chunk overlap (§2.6): each test chunk C gets its k nearest DB chunks, each with its continuation [N, F],
and r(C) from retrocli.overlap. A chunk leaks when r(C) > α (default 0.125: fewer than 8 of 64 tokens in
a row is "no local leakage", §4.4).

Document near-duplicates (§2.1): 13-gram Jaccard between test and DB documents, estimated with MinHash +
LSH (datasketch) and verified exactly before anything is reported. Documents are compared as LM-token
13-grams; each n-gram is reduced to a 32-bit hash with numpy and fed to datasketch's MinHash, which is
several times faster than hashing each n-gram's bytes with SHA-1 (see bench/bench_leakage.py).
"""

from __future__ import annotations

import functools
import os
import sys
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from datasketch import MinHash, MinHashLSH

from retrocli.db import RetroDB, open_db
from retrocli.errors import RetroError
from retrocli.eval import bpb_summary, chunk_losses
from retrocli.model.checkpoint import load_model
from retrocli.neighbors import check_k, neighbors_of_inputs
from retrocli.options import (
    DEFAULT_ALPHA,
    DEFAULT_EF_SEARCH,
    DEFAULT_EXAMPLES,
    DEFAULT_JACCARD,
    DEFAULT_LEAKAGE_K,
    DEFAULT_NGRAM,
    DEFAULT_NORMALIZE,
    DEFAULT_NUM_PERM,
    DEFAULT_TEXT_FIELD,
)
from retrocli.overlap import ChunkOverlap, check_normalization, compute_overlap, shared_text
from retrocli.progress import NullProgress, Progress

HIST_BINS = 20


# -- near-duplicate documents ----------------------------------------------------------------------------

def ngram_window_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """64-bit polynomial hash of every n-gram of a token sequence, in order (window i = tokens[i:i+n];
    none if the sequence is shorter than n)."""
    tokens = np.asarray(tokens, dtype=np.uint64)
    h = np.zeros(max(0, len(tokens) - n + 1) if n else 0, dtype=np.uint64)
    if len(h) == 0:
        return h
    windows = np.lib.stride_tricks.sliding_window_view(tokens, n)
    with np.errstate(over="ignore"):
        for col in range(n):
            h = h * np.uint64(1099511628211) + windows[:, col] + np.uint64(0x9E3779B97F4A7C15)
    return h


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Unique 32-bit hashes of a token sequence's n-grams (none if it is shorter than n)."""
    h = ngram_window_hashes(tokens, n)
    # fold to 32 bits: datasketch's legacy MinHash scheme is 32-bit
    return np.unique(((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32))


def minhash_of(hashes: np.ndarray, num_perm: int, seed: int = 1):
    mh = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
    if len(hashes):
        mh.update_batch(hashes.tolist())
    return mh


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


@functools.lru_cache(maxsize=1)
def _punctuation_table() -> dict[int, None]:
    return {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P")}


def dedupe_normalize(text: str) -> str:
    """What near-duplicate n-grams are taken over with --normalize text, as text-dedup and datatrove do:
    NFKC, lowercase, punctuation removed, whitespace runs to one space."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_punctuation_table())
    return " ".join(text.split())


def normalized_doc_tokens(db: RetroDB, batch: int = 64) -> Iterator[np.ndarray]:
    """Every document of `db`, normalised for near-duplicates and re-tokenized with the DB's tokenizer."""
    tok = db.tokenizer.tokenizer
    for start in range(0, db.num_docs, batch):
        texts = [dedupe_normalize(db.document_text(d)) for d in range(start, min(db.num_docs, start + batch))]
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            yield np.array(enc.ids, dtype=np.int64)


def doc_tokens(db: RetroDB, doc: int, tokens: np.ndarray | None = None, lengths: np.ndarray | None = None):
    chunks = db.doc_chunks(doc)
    if tokens is None:
        tokens, lengths = db.tokens_block(chunks.start, chunks.stop)
        offset = chunks.start
    else:
        offset = 0
    return np.concatenate([tokens[c - offset, : lengths[c - offset]] for c in chunks]) if len(chunks) else \
        np.zeros(0, dtype=np.int64)


@dataclass
class DuplicatePair:
    db_doc: int
    db_source: str
    test_doc: int
    test_source: str
    jaccard: float
    estimated: float


def candidate_index(threshold: float, num_perm: int) -> MinHashLSH:
    """MinHash-LSH for candidate pairs (every reported pair is verified exactly). Near 1 datasketch finds
    no banding with two or more bands for this many permutations; lower the LSH threshold until it does,
    which only adds candidates."""
    lsh_threshold = threshold
    while True:
        try:
            return MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
        except ValueError:
            if lsh_threshold <= 0.5:
                raise RetroError(f"--num-perm {num_perm}: too few permutations for MinHash-LSH") from None
            lsh_threshold = round(lsh_threshold - 0.05, 2)


def near_duplicates(db: RetroDB, test: RetroDB, ngram: int = DEFAULT_NGRAM, num_perm: int = DEFAULT_NUM_PERM,
                    threshold: float = DEFAULT_JACCARD, progress: Progress | None = None,
                    normalize: str = "none") -> tuple[list[DuplicatePair], dict]:
    """Every (DB doc, test doc) pair with exact n-gram Jaccard ≥ threshold among MinHash-LSH candidates.
    normalize "text": n-grams of the documents' normalised text (dedupe_normalize) re-tokenized; "none":
    of their LM tokens as stored. A document shorter than n tokens has no n-gram: it is skipped (and
    counted), never reported as a duplicate of another short one."""
    progress = progress or NullProgress()
    check_normalization(normalize)
    if not 0 < threshold <= 1:
        raise RetroError("--jaccard-threshold: must be in (0, 1]")
    if ngram < 1 or num_perm < 16:
        raise RetroError("--ngram must be ≥ 1 and --num-perm ≥ 16")
    started = time.time()
    lsh = candidate_index(threshold, num_perm)
    task = progress.start("near-dups", total=db.num_docs + test.num_docs, unit="docs")

    def documents(of: RetroDB) -> Iterator[np.ndarray]:
        if normalize == "text":
            return normalized_doc_tokens(of)
        tokens, lengths = of.tokens_block(0, of.num_chunks)
        return (doc_tokens(of, doc, tokens, lengths) for doc in range(of.num_docs))

    db_hashes: dict[int, np.ndarray] = {}
    db_minhash = {}
    skipped = {"db": 0, "test": 0}
    for doc, doc_ids in enumerate(documents(db)):
        hashes = ngram_hashes(doc_ids, ngram)
        task.advance()
        if len(hashes) == 0:
            skipped["db"] += 1
            continue
        mh = minhash_of(hashes, num_perm)
        lsh.insert(doc, mh, check_duplication=False)
        db_minhash[doc], db_hashes[doc] = mh, hashes
    candidates = verified = 0
    pairs: list[DuplicatePair] = []
    for tdoc, t_ids in enumerate(documents(test)):
        t_hashes = ngram_hashes(t_ids, ngram)
        task.advance()
        if len(t_hashes) == 0:
            skipped["test"] += 1
            continue
        t_mh = minhash_of(t_hashes, num_perm)
        for doc in sorted(lsh.query(t_mh)):
            candidates += 1
            exact = jaccard(db_hashes[doc], t_hashes)
            if exact >= threshold:
                verified += 1
                pairs.append(DuplicatePair(doc, db.source(doc), tdoc, test.source(tdoc), exact,
                                           float(t_mh.jaccard(db_minhash[doc]))))
    task.finish()
    seconds = time.time() - started
    return pairs, {"candidates": candidates, "verified": verified, "seconds": round(seconds, 3),
                   "short_documents_skipped": skipped,
                   "docs_per_second": round((db.num_docs + test.num_docs) / max(seconds, 1e-9), 1)}


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
    bpb: dict | None = None
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
    db_path: str | os.PathLike, test_inputs: list[str | os.PathLike], k: int = DEFAULT_LEAKAGE_K,
    alpha: float = DEFAULT_ALPHA, examples: int = DEFAULT_EXAMPLES, ngram: int = DEFAULT_NGRAM,
    num_perm: int = DEFAULT_NUM_PERM, jaccard_threshold: float = DEFAULT_JACCARD, ef: int = DEFAULT_EF_SEARCH,
    work_dir: str | os.PathLike | None = None, text_field: str = DEFAULT_TEXT_FIELD,
    threads: int | None = None, progress: Progress | None = None, model_dir: str | os.PathLike | None = None,
    dask=None, normalize: str = DEFAULT_NORMALIZE,
) -> LeakageReport:
    """Measure chunk overlap and near-duplicate documents of `test_inputs` against the DB. The DB is only
    read; the test set is chunked and embedded into `work_dir` (a temp dir unless given, for resuming).
    With `dask` the test set's embedding, neighbour search and overlap run on the cluster (pass a
    distributed.Client to reuse one cluster for all three); near-duplicates stay in this process."""
    if not 0 <= alpha <= 1:
        raise RetroError("--alpha: must be between 0 and 1")
    if examples < 0:
        raise RetroError("--examples: must be ≥ 0")
    check_normalization(normalize)
    db = open_db(db_path)
    check_k(db, k)
    started = time.time()
    with neighbors_of_inputs(db.path, test_inputs, work_dir, k=k, ef=ef, threads=threads, progress=progress,
                             text_field=text_field, dask=dask) as (neighbors, test):
        t_neighbors = time.time() - started
        started = time.time()
        ov = compute_overlap(db, test, neighbors.ids, block=512 if dask is None else 4096, progress=progress,
                             dask=dask, normalize=normalize)
        t_overlap = time.time() - started
        pairs, dup_stats = near_duplicates(db, test, ngram, num_perm, jaccard_threshold, progress, normalize)
        report = _assemble(db, test, ov, pairs, dup_stats, test_inputs, k, alpha, examples, ngram, num_perm,
                           jaccard_threshold, normalize)
        if model_dir is not None:
            model, _ = load_model(model_dir, db)
            if model.config.num_neighbors > k:
                raise RetroError(f"--k {k} is below the model's {model.config.num_neighbors} neighbours")
            report.bpb = bpb_summary(chunk_losses(model, db, test, neighbors.ids, progress=progress), ov.r)
            report.bpb["model"] = str(model_dir)
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
        db=str(db.path), test_inputs=[str(p) for p in test_inputs], k=k, alpha=alpha, ngram=ngram,
        num_perm=num_perm, jaccard_threshold=threshold, num_test_docs=test.num_docs, num_test_chunks=n,
        leaking_chunks=int(leaking.sum()), leaking_fraction=float(leaking.mean()) if n else 0.0,
        mean_r=float(ov.r.mean()) if n else 0.0,
        histogram={"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
        documents=documents, examples=[_example(db, test, ov, c, normalize) for c in chosen],
        near_duplicates=[asdict(p) for p in pairs], near_duplicate_stats=dup_stats, timings={}, overlap=ov,
        normalize=normalize, normalization=NORMALIZATION_NOTES[normalize],
    )
