"""`retro neighbors`: the k nearest DB chunks of any text, with their continuations ([N, F] pairs).

Free text is chunked with the DB's tokenizer, each chunk embedded with the DB's recorded embedder and
searched in the index; search_excluding is the search with exclusions that batch mode
(retrocli.batch_neighbors), the server and the model share.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from retrocli.db import DBLike, RetroDB, as_db
from retrocli.embed import db_embedder
from retrocli.errors import RetroError
from retrocli.index import ShardedIndex
from retrocli.options import DEFAULT_EF_SEARCH, DEFAULT_QUERY_K
from retrocli.overlap import longest_shared_run

SAME_DOC_RUN = 0.9  # a query chunk "is" DB text when it shares a run this long with a neighbour's [N, F]


def search_excluding(
    index: ShardedIndex, vectors: np.ndarray, k: int, exclude_doc: np.ndarray | None, chunk_doc: np.ndarray,
    exclude_ids: list[set] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per query, dropping neighbours whose document is exclude_doc[q] (or whose doc is in
    exclude_ids[q]). Widens the search for the rows that lost too many candidates."""
    q = len(vectors)
    ids = np.full((q, k), -1, dtype=np.int64)
    dists = np.full((q, k), np.inf, dtype=np.float32)
    pending = np.arange(q)
    want = k if exclude_doc is None and exclude_ids is None else 4 * k + 8
    while len(pending):
        want = min(want, index.size)
        cand_ids, cand_dists = index.search(vectors[pending], want)
        keep = cand_ids >= 0
        if exclude_doc is not None:
            keep &= chunk_doc[np.maximum(cand_ids, 0)] != exclude_doc[pending][:, None]
        if exclude_ids is not None:
            for row, qi in enumerate(pending):
                if exclude_ids[qi]:
                    docs = chunk_doc[np.maximum(cand_ids[row], 0)]
                    keep[row] &= ~np.isin(docs, list(exclude_ids[qi]))
        still = []
        for row, qi in enumerate(pending):
            got_ids, got_d = cand_ids[row][keep[row]][:k], cand_dists[row][keep[row]][:k]
            if len(got_ids) < k and want < index.size:
                still.append(qi)
                continue
            ids[qi, : len(got_ids)] = got_ids
            dists[qi, : len(got_d)] = got_d
        pending = np.array(still, dtype=np.int64)
        want *= 4
    return ids, dists


# -- query mode -----------------------------------------------------------------------------------

@dataclass
class Neighbor:
    id: int
    distance: float
    doc: int
    source: str
    text: str
    continuation_id: int | None
    continuation: str | None


@dataclass
class QueryChunk:
    index: int
    text: str
    tokens: list[int]
    neighbors: list[Neighbor] = field(default_factory=list)


def split_query(db: RetroDB, text: str) -> list[QueryChunk]:
    """Chunk a query exactly as the DB was chunked: DB tokenizer, DB chunk size."""
    ids = db.tokenizer.encode_batch([text])[0]
    m = db.chunk_size
    pieces = [ids[i : i + m] for i in range(0, len(ids), m)]
    return [QueryChunk(i, db.tokenizer.decode(p), p) for i, p in enumerate(pieces)]


class TokenRows:
    """Chunk tokens read in blocks of `rows` chunks and kept (at most `blocks` of them, least recently used
    dropped). A neighbour's [N, F] is two rows; read one by one, each costs a zarr chunk decode (~6 ms
    here), so retrieval for a batch would pay that per neighbour."""

    def __init__(self, db: RetroDB, rows: int = 4096, blocks: int = 64):
        self.db, self.rows, self.blocks = db, rows, blocks
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _block(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        if number in self._cache:
            self._cache.move_to_end(number)
        else:
            start = number * self.rows
            self._cache[number] = self.db.tokens_block(start, min(start + self.rows, self.db.num_chunks))
            if len(self._cache) > self.blocks:
                self._cache.popitem(last=False)
        return self._cache[number]

    def row(self, chunk_id: int) -> list[int]:
        tokens, lengths = self._block(chunk_id // self.rows)
        at = chunk_id % self.rows
        return tokens[at, : int(lengths[at])].tolist()


def neighbor_refs(db: RetroDB, ids: np.ndarray, dists: np.ndarray,
                  token_rows: TokenRows | None = None) -> list[Neighbor]:
    """Neighbours (−1 skipped) with their text, continuation and source; tokens read through
    `token_rows` (a fresh one by default: each block read once per call)."""
    token_rows = token_rows or TokenRows(db)
    out = []
    for nid, dist in zip(ids.tolist(), dists.tolist()):
        if nid < 0:
            continue
        cont, doc = db.continuation(nid), db.doc_of(nid)
        out.append(Neighbor(nid, float(dist), doc, db.source(doc), db.tokenizer.decode(token_rows.row(nid)),
                            cont, db.tokenizer.decode(token_rows.row(cont)) if cont is not None else None))
    return out


def require_searchable(db: RetroDB) -> None:
    """One line naming the command that is missing, for a DB that is not yet embedded or indexed."""
    for stage in ("embed", "index"):
        if db.stage(stage) != "complete":
            raise RetroError(f"{db.path}: the {stage} stage is not complete; run `retro {stage} {db.path}` first")


def check_k(db: RetroDB, k: int) -> None:
    if k < 1:
        raise RetroError("--k: must be at least 1")
    if k > db.num_chunks:
        raise RetroError(f"--k {k} is larger than the DB ({db.num_chunks} chunks)")


def query_neighbors(
    db: DBLike, queries: list[str], k: int = DEFAULT_QUERY_K, ef: int = DEFAULT_EF_SEARCH,
    exclude_same_doc: bool = False, device: str = "cpu", nprobe: int | None = None, rerank: int | None = None,
) -> list[list[QueryChunk]]:
    """For each query text: its chunks, each with k neighbours ([N, F] text, distance, source). `device`
    embeds the queries there; nprobe, rerank (ivfpq) override the values recorded with the index."""
    db = as_db(db)
    check_k(db, k)
    if not queries:
        raise RetroError("no query given: pass --query TEXT or --query-file FILE")
    for number, text in enumerate(queries, start=1):
        if not text.strip():
            raise RetroError(f"query {number} is empty")
    index = ShardedIndex(db, ef=ef, nprobe=nprobe, rerank=rerank)
    embedder = db_embedder(db, device=device)
    per_query = [split_query(db, text) for text in queries]
    flat = [chunk for chunks in per_query for chunk in chunks]
    vectors = embedder.embed([chunk.text for chunk in flat], layout_independent=False)  # a query: latency first
    exclude = None
    if exclude_same_doc:
        exclude = [own_documents(db, index, vec, chunk) for vec, chunk in zip(vectors, flat)]
    ids, dists = search_excluding(index, vectors, k, None, db.chunk_doc, exclude)
    for chunk, row_ids, row_d in zip(flat, ids, dists):
        chunk.neighbors = neighbor_refs(db, row_ids, row_d)
    return per_query


def own_documents(db: RetroDB, index: ShardedIndex, vector: np.ndarray, chunk: QueryChunk) -> set[int]:
    """The DB documents the query chunk was taken from: those holding a near-exact copy of it."""
    cand, _ = index.search(vector[None, :], min(10, index.size))
    own = set()
    for nid in cand[0]:
        if nid < 0:
            continue
        tokens = db.chunk_tokens(int(nid))
        cont = db.continuation(int(nid))
        if cont is not None:
            tokens = np.concatenate([tokens, db.chunk_tokens(cont)])
        prev = int(nid) - 1
        if prev >= 0 and db.doc_of(prev) == db.doc_of(int(nid)):
            tokens = np.concatenate([db.chunk_tokens(prev), tokens])
        if longest_shared_run(np.array(chunk.tokens), [tokens]) >= SAME_DOC_RUN * len(chunk.tokens):
            own.add(db.doc_of(int(nid)))
    return own


# -- batch mode -----------------------------------------------------------------------------------


