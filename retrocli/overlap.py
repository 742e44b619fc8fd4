"""r(C), the paper's chunk overlap (§2.6; docs/retro-notes.md): the longest run of consecutive tokens a
chunk C shares with any of its neighbours' [N, F], s(C), and r(C) = s(C) / len(C).

The kernel below is what the leakage report, training's retrieval focus, eval's bpb(α), generation's
copy report and same-document detection in neighbour queries all measure, so it sits below them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrocli.cluster import dask_client, run_blocks
from retrocli.db import RetroDB, open_db
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


def overlap_block(db_path: str, queries_path: str, item: tuple[int, np.ndarray]) -> tuple:
    """overlap_rows for a Dask task given (start, neighbour ids); the DB's tokens are read once per
    worker process (one DB at a time)."""
    start, ids = item
    db, queries = open_db(db_path), open_db(queries_path)
    key = (db_path, db.manifest["db_id"])
    if key not in _TOKENS_CACHE:
        _TOKENS_CACHE.clear()
        _TOKENS_CACHE[key] = db.tokens_block(0, db.num_chunks)
    return (start, *overlap_rows(db, *_TOKENS_CACHE[key], queries, ids, start, start + len(ids)))


def compute_overlap(db: RetroDB, queries: RetroDB, ids: np.ndarray, block: int = 512,
                    progress: Progress | None = None, dask=None) -> ChunkOverlap:
    """r(C) of every query chunk against its neighbours' [N, F]; blocks run as Dask tasks with `dask`."""
    progress = progress or NullProgress()
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
            results = ((start, *overlap_rows(db, db_tokens, db_lengths, queries, ids[start:start + block],
                                             start, min(n, start + block))) for start in starts)
        else:
            # one task per block carrying its neighbour ids; workers read the tokens from the shared DB
            items = [(start, ids[start:start + block]) for start in starts]
            results = run_blocks(client, "overlap", overlap_block, (str(db.path), str(queries.path)), items)
        for start, s, rr, best, qs, ts in results:
            stop = start + len(s)
            shared[start:stop], r[start:stop], neighbor[start:stop] = s, rr, best
            q_start[start:stop], t_start[start:stop] = qs, ts
            task.advance(stop - start)
    task.finish()
    return ChunkOverlap(r, shared, queries.chunk_length.copy(), queries.chunk_doc.copy(), neighbor, q_start, t_start)
