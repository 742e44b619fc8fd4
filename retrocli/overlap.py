"""r(C), the paper's chunk overlap (§2.6; docs/retro-notes.md): the longest run of consecutive tokens a
chunk C shares with any of its neighbours' [N, F], s(C), and r(C) = s(C) / len(C).

The kernel below is what the leakage report, training's retrieval focus, eval's bpb(α), generation's
copy report and same-document detection in neighbour queries all measure, so it sits below them all.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from retrocli.cluster import dask_client, run_blocks
from retrocli.db import RetroDB, open_db
from retrocli.errors import RetroError
from retrocli.progress import NullProgress, Progress
from retrocli.sequences import neighbor_rows

QUERY_PAD, NEIGHBOR_PAD = -1, -2  # distinct paddings never match each other or a token id


def longest_runs(queries: np.ndarray, query_len: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each query row (padded with QUERY_PAD) and its candidate target rows [B, k, T] (padded with
    NEIGHBOR_PAD): the longest common run of consecutive tokens with any target, plus where it is
    (target index, start in the query, start in the target). Dynamic programming over query positions,
    vectorised over batch, targets and target positions."""
    batch, m = queries.shape
    k, width = targets.shape[1], targets.shape[2]
    run = np.zeros((batch, k, width + 1), dtype=np.int32)
    best = np.zeros(batch, dtype=np.int32)
    best_target = np.full(batch, -1, dtype=np.int64)
    best_q_end = np.zeros(batch, dtype=np.int64)
    best_t_end = np.zeros(batch, dtype=np.int64)
    for i in range(m):
        eq = targets == queries[:, i, None, None]
        new = np.zeros_like(run)
        new[:, :, 1:] = np.where(eq, run[:, :, :-1] + 1, 0)
        run = new
        flat = run.reshape(batch, -1).argmax(1)
        value = run.reshape(batch, -1)[np.arange(batch), flat]
        better = value > best
        best = np.where(better, value, best)
        best_target = np.where(better, flat // (width + 1), best_target)
        best_t_end = np.where(better, flat % (width + 1), best_t_end)
        best_q_end = np.where(better, i + 1, best_q_end)
    best = np.minimum(best, query_len)
    return best, best_target, best_q_end - best, best_t_end - best


def longest_shared_run(chunk: np.ndarray, neighbors: list[np.ndarray]) -> int:
    """s(C): the longest run of consecutive tokens `chunk` shares with any of `neighbors`."""
    if len(chunk) == 0 or not neighbors:
        return 0
    width = max(1, max(len(n) for n in neighbors))
    targets = np.full((1, len(neighbors), width), NEIGHBOR_PAD, dtype=np.int64)
    for j, n in enumerate(neighbors):
        targets[0, j, : len(n)] = n
    s, *_ = longest_runs(np.asarray(chunk, dtype=np.int64)[None, :], np.array([len(chunk)]), targets)
    return int(s[0])


def overlap_ratio(chunk: np.ndarray, neighbors: list[np.ndarray]) -> float:
    """r(C) = s(C) / len(C) for one chunk and its neighbours' [N, F] token arrays (0 for an empty chunk)."""
    return longest_shared_run(chunk, neighbors) / len(chunk) if len(chunk) else 0.0


@dataclass
class ChunkOverlap:
    r: np.ndarray  # [num_test_chunks]
    shared: np.ndarray  # s(C)
    length: np.ndarray
    test_doc: np.ndarray
    neighbor: np.ndarray  # DB chunk id of the best-matching neighbour (-1 if none)
    q_start: np.ndarray
    t_start: np.ndarray  # start of the shared run within that neighbour's [N, F]


def overlap_rows(db: RetroDB, db_tokens: np.ndarray, db_lengths: np.ndarray, queries: RetroDB, ids: np.ndarray,
                 start: int, stop: int) -> tuple[np.ndarray, ...]:
    """s(C), r(C), best neighbour and run starts for query chunks [start, stop) with neighbour ids [B, k]."""
    q_tokens, q_len = queries.tokens_block(start, stop)
    q_len = q_len.astype(np.int64)
    q = q_tokens.astype(np.int64)
    q[np.arange(q.shape[1])[None, :] >= q_len[:, None]] = QUERY_PAD
    targets = neighbor_rows(db, ids, NEIGHBOR_PAD, db_tokens, db_lengths)
    s, which, qs, ts = longest_runs(q, q_len, targets)
    r = np.where(q_len > 0, s / np.maximum(q_len, 1), 0.0)
    picked = np.take_along_axis(ids, np.maximum(which, 0)[:, None], axis=1)[:, 0]
    return s, r, np.where((which >= 0) & (s > 0), picked, -1), qs, ts


_TOKENS_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def overlap_block(db_path: str, queries_path: str, normalize: str, item: tuple[int, np.ndarray]) -> tuple:
    """overlap_rows for a Dask task given (start, neighbour ids); the DB's tokens are read once per
    worker process (one DB at a time)."""
    start, ids = item
    db, queries = open_db(db_path), open_db(queries_path)
    key = (db_path, db.content_id)
    if key not in _TOKENS_CACHE:
        _TOKENS_CACHE.clear()
        _TOKENS_CACHE[key] = db.tokens_block(0, db.num_chunks)
    rows = normalized_overlap_rows if normalize == "text" else overlap_rows
    return (start, *rows(db, *_TOKENS_CACHE[key], queries, ids, start, start + len(ids)))


def compute_overlap(db: RetroDB, queries: RetroDB, ids: np.ndarray, block: int = 512,
                    progress: Progress | None = None, dask=None, normalize: str = "none") -> ChunkOverlap:
    """r(C) of every query chunk against its neighbours' [N, F]; blocks run as Dask tasks with `dask`.
    normalize "text": measured through reformatting (see normalized_overlap_rows); "none": raw tokens."""
    progress = progress or NullProgress()
    rows = normalized_overlap_rows if check_normalization(normalize) == "text" else overlap_rows
    n = queries.num_chunks
    r = np.zeros(n)
    shared = np.zeros(n, dtype=np.int64)
    neighbor = np.full(n, -1, dtype=np.int64)
    q_start = np.zeros(n, dtype=np.int64)
    t_start = np.zeros(n, dtype=np.int64)
    task = progress.start("overlap", total=n, unit="chunks")
    starts = range(0, n, block)
    with dask_client(dask) as client:
        if client is None:
            db_tokens, db_lengths = db.tokens_block(0, db.num_chunks)  # kept in its small dtype (uint16)
            results = ((start, *rows(db, db_tokens, db_lengths, queries, ids[start:start + block],
                                     start, min(n, start + block))) for start in starts)
        else:
            # one task per block carrying its neighbour ids; workers read the tokens from the shared DB
            items = [(start, ids[start:start + block]) for start in starts]
            results = run_blocks(client, "overlap", overlap_block, (str(db.path), str(queries.path), normalize),
                                 items)
        for start, s, rr, best, qs, ts in results:
            stop = start + len(s)
            shared[start:stop], r[start:stop], neighbor[start:stop] = s, rr, best
            q_start[start:stop], t_start[start:stop] = qs, ts
            task.advance(stop - start)
    task.finish()
    return ChunkOverlap(r, shared, queries.chunk_length.copy(), queries.chunk_doc.copy(), neighbor, q_start, t_start)


# -- r(C) through reformatting -----------------------------------------------------------------------------
# The paper's r(C) compares raw LM tokens, so a copy whose line breaks or spacing changed shares only short
# runs (a re-wrapped paragraph tokenizes differently at every break). With normalisation ("text", the
# default of the leakage report) both sides are NFKC-normalised with whitespace runs collapsed to one
# space, the longest shared run of words is found, and s(C) counts the LM tokens of the normalised chunk
# that lie wholly inside it: a chunk whose normalised text sits inside a neighbour's [N, F] gets r = 1
# however it was wrapped. r(C) is then the larger of that and the raw measure, so normalising only ever
# finds more. "none" is the paper's raw-token definition.

NORMALIZATIONS = ("text", "none")
_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC, whitespace runs to one space, ends stripped: what r(C) compares with --normalize text."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def check_normalization(mode: str) -> str:
    if mode not in NORMALIZATIONS:
        raise RetroError(f"--normalize: must be one of {', '.join(NORMALIZATIONS)}, got '{mode}'")
    return mode


def _word_ids(texts: list[str], vocab: dict[str, int], pad: int) -> tuple[np.ndarray, list[list[str]]]:
    """Texts (normalised: words separated by single spaces) as word-id rows padded with `pad`."""
    words = [t.split(" ") if t else [] for t in texts]
    out = np.full((len(texts), max(1, max((len(w) for w in words), default=1))), pad, dtype=np.int64)
    for row, ws in enumerate(words):
        out[row, : len(ws)] = [vocab.setdefault(w, len(vocab)) for w in ws]
    return out, words


def _shared_span(q_words: list[str], t_words: list[str], qs: int, ts: int, n: int) -> tuple[int, int]:
    """The character span in the chunk's normalised text of a run of n whole words shared at (qs, ts),
    widened by a partial word at either end of the chunk where a chunk boundary cut a word the neighbour
    holds whole (the chunk's first word a suffix of the word before, its last a prefix of the word after)."""
    first, last = qs, qs + n  # words [first, last) of the chunk
    if n == 0:
        # no whole word shared: a chunk that is one cut word can still sit inside the neighbour
        return (0, 0)
    if first == 1 and ts >= 1 and t_words[ts - 1].endswith(q_words[0]):
        first = 0
    if last == len(q_words) - 1 and ts + n < len(t_words) and t_words[ts + n].startswith(q_words[-1]):
        last = len(q_words)
    start = sum(len(w) + 1 for w in q_words[:first])
    return start, start + sum(len(w) + 1 for w in q_words[first:last]) - 1


def normalized_overlap_rows(db: RetroDB, db_tokens: np.ndarray, db_lengths: np.ndarray, queries: RetroDB,
                            ids: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, ...]:
    """overlap_rows on normalised text: s(C) in LM tokens of the normalised chunk, r(C) and the best
    neighbour; the run's starts are 0 (shared_text() finds the shared text of one pair for display).

    The run is found over whole words (what reformatting cannot change), widened at the chunk's ends to a
    word a chunk boundary cut; a chunk whose normalised text lies inside a neighbour's counts in full.
    Where the raw-token measure (overlap_rows) is larger, it is the one returned."""
    tok = db.tokenizer
    q_tokens, q_len = queries.tokens_block(start, stop)
    # A chunk boundary can cut a multi-byte character; its halves decode as U+FFFD at the chunk's ends.
    chunk_text = [normalize_text(tok.decode(row[:n].tolist()).strip("\ufffd"))
                  for row, n in zip(q_tokens, q_len, strict=True)]
    pairs = neighbor_rows(db, ids, NEIGHBOR_PAD, db_tokens, db_lengths)
    k = ids.shape[1]
    pair_text = [normalize_text(tok.decode(row[row >= 0].tolist())) if i >= 0 else ""
                 for rows, nids in zip(pairs, ids, strict=True) for row, i in zip(rows, nids)]
    vocab: dict[str, int] = {}
    q, q_words = _word_ids(chunk_text, vocab, QUERY_PAD)
    flat, t_words = _word_ids(pair_text, vocab, NEIGHBOR_PAD)
    n_words, which, qs, ts = longest_runs(q, np.array([len(w) for w in q_words]), flat.reshape(len(q), k, -1))
    encoded = tok.tokenizer.encode_batch(chunk_text, add_special_tokens=False)
    s = np.zeros(len(q), dtype=np.int64)
    length = np.zeros(len(q), dtype=np.int64)
    best = np.full(len(q), -1, dtype=np.int64)
    for row, enc in enumerate(encoded):
        spans = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
        length[row] = len(spans)
        inside = [j for j in range(k) if chunk_text[row] and chunk_text[row] in pair_text[row * k + j]]
        if inside:  # the whole normalised chunk sits in a neighbour: r = 1 however its ends were cut
            s[row], best[row] = len(spans), ids[row, inside[0]]
            continue
        if which[row] < 0 or n_words[row] == 0:
            continue
        lo, hi = _shared_span(q_words[row], t_words[row * k + which[row]], int(qs[row]), int(ts[row]),
                              int(n_words[row]))
        s[row] = int(((spans[:, 0] >= lo) & (spans[:, 1] <= hi)).sum())
        best[row] = ids[row, which[row]] if s[row] > 0 else -1
    r = np.where(length > 0, s / np.maximum(length, 1), 0.0)
    # Never below the raw-token measure: a run shared verbatim (which can start or end inside a word) is
    # still shared. r(C) is the larger of the two, with its s(C) and neighbour.
    raw_s, raw_r, raw_best, raw_qs, raw_ts = overlap_rows(db, db_tokens, db_lengths, queries, ids, start, stop)
    use_raw = raw_r >= r
    zeros = np.zeros(len(q), dtype=np.int64)
    return (np.where(use_raw, raw_s, s), np.where(use_raw, raw_r, r), np.where(use_raw, raw_best, best),
            np.where(use_raw, raw_qs, zeros), np.where(use_raw, raw_ts, zeros))


def _code_points(texts: list[str], pad: int) -> np.ndarray:
    width = max(1, max((len(t) for t in texts), default=1))
    out = np.full((len(texts), width), pad, dtype=np.int64)
    for row, text in enumerate(texts):
        out[row, : len(text)] = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return out


def shared_text(chunk: str, pair: str) -> tuple[list[str], list[str]]:
    """The longest common run of two normalised texts, as [before, shared, after] on each side."""
    a, b = normalize_text(chunk), normalize_text(pair)
    if not a or not b:
        return [a, "", ""], [b, "", ""]
    n, _, qs, ts = longest_runs(_code_points([a], QUERY_PAD), np.array([len(a)]),
                                _code_points([b], NEIGHBOR_PAD)[None])
    n, qs, ts = int(n[0]), int(qs[0]), int(ts[0])
    return [a[:qs], a[qs:qs + n], a[qs + n:]], [b[:ts], b[ts:ts + n], b[ts + n:]]
