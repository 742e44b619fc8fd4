"""Near-duplicate documents (paper §2.1): 13-gram Jaccard between test and DB documents, estimated with
MinHash + LSH (datasketch) and verified exactly before anything is reported.

Documents are compared as LM-token 13-grams; each n-gram is reduced to a 32-bit hash with numpy and fed to
datasketch's MinHash, which is several times faster than hashing each n-gram's bytes with SHA-1 (see
bench/bench_leakage.py). With normalisation ("text", the default) the n-grams are taken over the
documents' NFKC, lowercased, punctuation-free text re-tokenized, so a copy reformatted or re-cased is
still found. Used by the leakage report, and by eval and leakage-report --exclude-near-duplicates.
"""

from __future__ import annotations

import functools
import sys
import time
import unicodedata
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH

from retrocli.cluster import dask_client, run_blocks
from retrocli.db import RetroDB, open_db
from retrocli.errors import RetroError
from retrocli.options import DEFAULT_JACCARD, DEFAULT_NGRAM, DEFAULT_NORMALIZE, DEFAULT_NUM_PERM
from retrocli.overlap import check_normalization
from retrocli.progress import NullProgress, Progress


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


def document_hashes(of: RetroDB, doc: int, ngram: int, normalize: str, rows=None) -> np.ndarray:
    """A document's n-gram hashes, as near-duplicate detection compares them (rows: the DB's tokens and
    lengths, read once by the caller)."""
    ids = doc_tokens(of, doc, *(rows or (None, None)))
    if normalize == "text":  # normalised text, re-tokenized: a reformatted or re-cased copy still matches
        text = dedupe_normalize(of.tokenizer.decode(ids.tolist()))
        ids = np.array(of.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    return ngram_hashes(ids, ngram)


def near_duplicates(db: RetroDB, test: RetroDB, ngram: int = DEFAULT_NGRAM, num_perm: int = DEFAULT_NUM_PERM,
                    threshold: float = DEFAULT_JACCARD, progress: Progress | None = None,
                    normalize: str = DEFAULT_NORMALIZE, dask=None) -> tuple[list[DuplicatePair], dict]:
    """Every (DB doc, test doc) pair with exact n-gram Jaccard ≥ threshold among MinHash-LSH candidates.
    normalize "text": n-grams of the documents' normalised text (dedupe_normalize) re-tokenized; "none":
    of their LM tokens as stored. A document shorter than n tokens has no n-gram: it is skipped (and
    counted), never reported as a duplicate of another short one.

    With `dask` (a distributed.Client) the same pairs come from a distributed pass: MinHash signatures per
    block of documents, LSH band keys grouped by a shuffle, and exact verification of the candidates in
    blocks; no process holds every signature."""
    progress = progress or NullProgress()
    check_normalization(normalize)
    if not 0 < threshold <= 1:
        raise RetroError("--jaccard-threshold: must be in (0, 1]")
    if ngram < 1 or num_perm < 16:
        raise RetroError("--ngram must be ≥ 1 and --num-perm ≥ 16")
    started = time.time()
    lsh = candidate_index(threshold, num_perm)
    task = progress.start("near-dups", total=db.num_docs + test.num_docs, unit="docs")
    if dask is not None:
        with dask_client(dask) as client:
            return _near_duplicates_on_dask(client, db, test, lsh, ngram, num_perm, threshold, normalize, progress,
                                            started)
    db_rows, test_rows = db.tokens_block(0, db.num_chunks), test.tokens_block(0, test.num_chunks)  # read once

    def doc_hashes(of: RetroDB, rows: tuple[np.ndarray, np.ndarray], doc: int) -> np.ndarray:
        return document_hashes(of, doc, ngram, normalize, rows)

    skipped = {"db": 0, "test": 0}

    def signature(of: RetroDB, rows, doc: int, side: str) -> tuple[np.ndarray, MinHash | None]:
        hashes = doc_hashes(of, rows, doc)
        task.advance()
        if len(hashes) == 0:  # shorter than n: no n-gram, so no signature (never a duplicate of another)
            skipped[side] += 1
            return hashes, None
        return hashes, minhash_of(hashes, num_perm)

    db_minhash = {}
    for doc in range(db.num_docs):
        _, mh = signature(db, db_rows, doc, "db")
        if mh is not None:
            lsh.insert(doc, mh, check_duplication=False)
            db_minhash[doc] = mh
    candidates = verified = 0
    pairs: list[DuplicatePair] = []
    db_hashes: dict[int, np.ndarray] = {}  # only for candidates: all of them would not fit a large DB
    for tdoc in range(test.num_docs):
        t_hashes, t_mh = signature(test, test_rows, tdoc, "test")
        if t_mh is None:
            continue
        for doc in sorted(lsh.query(t_mh)):
            candidates += 1
            if doc not in db_hashes:
                db_hashes[doc] = doc_hashes(db, db_rows, doc)
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


# -- the same pass on Dask ---------------------------------------------------------------------------

DOCS_PER_TASK = 2048
PAIRS_PER_TASK = 4096
_OPENED: dict[str, RetroDB] = {}


def _opened(path: str) -> RetroDB:
    if path not in _OPENED:
        if len(_OPENED) > 4:
            _OPENED.clear()
        _OPENED[path] = open_db(path)
    return _OPENED[path]


def band_keys(db_path: str, side: str, ngram: int, num_perm: int, normalize: str, bands: int, rows: int,
              docs: tuple[int, int]) -> dict:
    """A task: for each document of the range, one (band, key) per LSH band of its MinHash (a short
    document has none), as entries (band, key, side, doc)."""
    of = _opened(db_path)
    entries, skipped = [], 0
    for doc in range(*docs):
        hashes = document_hashes(of, doc, ngram, normalize)
        if len(hashes) == 0:
            skipped += 1
            continue
        values = minhash_of(hashes, num_perm).hashvalues
        entries.extend((band, values[band * rows : (band + 1) * rows].tobytes(), side, doc) for band in range(bands))
    return {"entries": entries, "skipped": skipped, "side": side}


def _pairs_of_bucket(bucket) -> list[tuple[int, int]]:
    """Every (DB doc, test doc) pair that shares this band key."""
    _, members = bucket
    db_docs = {doc for _, _, side, doc in members if side == "db"}
    test_docs = {doc for _, _, side, doc in members if side == "test"}
    return [(d, t) for d in db_docs for t in test_docs]


def verify_pairs(db_path: str, test_path: str, ngram: int, num_perm: int, normalize: str, threshold: float,
                 pairs: list[tuple[int, int]]) -> list[tuple[int, int, float, float]]:
    """A task: exact Jaccard of each candidate pair; those at or above threshold, with the MinHash estimate."""
    db, test = _opened(db_path), _opened(test_path)
    kept = []
    for doc, tdoc in pairs:
        a, b = document_hashes(db, doc, ngram, normalize), document_hashes(test, tdoc, ngram, normalize)
        exact = jaccard(a, b)
        if exact >= threshold:
            estimate = float(minhash_of(b, num_perm).jaccard(minhash_of(a, num_perm)))
            kept.append((doc, tdoc, exact, estimate))
    return kept


def _near_duplicates_on_dask(client, db: RetroDB, test: RetroDB, lsh: MinHashLSH, ngram: int, num_perm: int,
                             threshold: float, normalize: str, progress: Progress, started: float):
    import dask
    import dask.bag

    task = progress.start("near-dups", total=db.num_docs + test.num_docs, unit="docs")
    ranges = [("db", str(db.path), (a, min(a + DOCS_PER_TASK, db.num_docs)))
              for a in range(0, db.num_docs, DOCS_PER_TASK)]
    ranges += [("test", str(test.path), (a, min(a + DOCS_PER_TASK, test.num_docs)))
               for a in range(0, test.num_docs, DOCS_PER_TASK)]
    blocks = dask.bag.from_sequence(ranges, npartitions=max(1, len(ranges))).map(
        lambda r: band_keys(r[1], r[0], ngram, num_perm, normalize, lsh.b, lsh.r, r[2]))
    buckets = blocks.pluck("entries").flatten().groupby(lambda e: (e[0], e[1]), shuffle="tasks")
    candidates = buckets.map(_pairs_of_bucket).flatten().distinct()
    skipped, pairs = dask.compute(blocks.map(lambda b: (b["side"], b["skipped"])), candidates, scheduler=client)
    task.advance(db.num_docs + test.num_docs)
    pairs = sorted(pairs, key=lambda p: (p[1], p[0]))
    chunks = [pairs[i : i + PAIRS_PER_TASK] for i in range(0, len(pairs), PAIRS_PER_TASK)]
    args = (str(db.path), str(test.path), ngram, num_perm, normalize, threshold)
    verified = sorted((row for rows in run_blocks(client, "near-dups", verify_pairs, args, chunks) for row in rows),
                      key=lambda r: (r[1], r[0]))
    found = [DuplicatePair(doc, db.source(doc), tdoc, test.source(tdoc), exact, estimate)
             for doc, tdoc, exact, estimate in verified]
    task.finish()
    seconds = time.time() - started
    short = {"db": 0, "test": 0}
    for side, count in skipped:
        short[side] += count
    return found, {"candidates": len(pairs), "verified": len(found), "seconds": round(seconds, 3),
                   "short_documents_skipped": short,
                   "docs_per_second": round((db.num_docs + test.num_docs) / max(seconds, 1e-9), 1)}


def drop_near_duplicate_neighbors(db: RetroDB, test: RetroDB, ids: np.ndarray, pairs: list[DuplicatePair],
                                  k: int) -> tuple[np.ndarray, int]:
    """Neighbour ids [n, k] of each test chunk from `ids` [n, C ≥ k] (nearest first), without the DB
    documents that near-duplicate the chunk's test document; −1 where the candidates run out. Returns the
    ids and how many of the first k were replaced."""
    flagged: dict[int, set[int]] = {}
    for pair in pairs:
        flagged.setdefault(pair.test_doc, set()).add(pair.db_doc)
    out = ids[:, :k].copy()
    replaced = 0
    for test_doc, docs in flagged.items():
        chunks = test.doc_chunks(test_doc)
        cand = ids[chunks.start:chunks.stop]
        banned = (cand < 0) | np.isin(db.chunk_doc[np.maximum(cand, 0)], list(docs))
        order = np.argsort(banned, axis=1, kind="stable")[:, :k]
        picked = np.take_along_axis(cand, order, axis=1)
        replaced += int(banned[:, :k].sum())
        out[chunks.start:chunks.stop] = np.where(np.take_along_axis(banned, order, axis=1), -1, picked)
    return out, replaced
