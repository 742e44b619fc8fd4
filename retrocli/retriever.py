"""Retrieval for generation: the k nearest DB chunks of a batch of query chunks, with the [N, F] tokens the
model reads, from a DB opened here (`LocalRetriever`) or from `retro serve` over HTTP (`HttpRetriever`).

Both answer `retrieve(chunks, k)` for query chunks given as token ids, the way generation sees them, so
`retro generate` runs unchanged on either; the server itself answers with a LocalRetriever, so the two
return the same neighbours. `bench/bench_retrieval_batch.py` times its three parts (embed the query
chunks, search the index, gather [N, F]) against the batch size.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np

from retrocli.db import RetroDB
from retrocli.embed import db_embedder
from retrocli.errors import RetroError
from retrocli.index import ShardedIndex
from retrocli.neighbors import (
    Neighbor,
    QueryChunk,
    TokenRows,
    neighbor_refs,
    own_documents,
    require_searchable,
    search_excluding,
)
from retrocli.options import DEFAULT_EF_SEARCH
from retrocli.sequences import pad_id

# What one request may ask for: bounded so that no request can hold the server for long or exhaust its memory.
MAX_QUERY_CHUNKS = 1024
MAX_K = 100


@dataclass
class Retrieved:
    """The neighbours of one query chunk, nearest first, and their tokens as the model reads them."""

    text: str
    neighbors: list[Neighbor]
    rows: np.ndarray  # [k, 2m] int64: N's tokens then F's, padded with the pad id (all pad = missing)
    tokens: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (N, F) of each neighbour


def neighbor_pair(token_rows: TokenRows, neighbor: Neighbor) -> tuple[list[int], list[int]]:
    """N's tokens and its continuation F's (empty at the end of a document), unpadded."""
    cont = neighbor.continuation_id
    return token_rows.row(neighbor.id), token_rows.row(cont) if cont is not None else []


def pack_rows(pairs: list[tuple[list[int], list[int]]], k: int, chunk_size: int, pad: int) -> np.ndarray:
    """[k, 2m] model rows from (N, F) token lists; missing neighbours (fewer than k) are all pad."""
    rows = np.full((k, 2 * chunk_size), pad, dtype=np.int64)
    for row, (n, f) in enumerate(pairs[:k]):
        tokens = (list(n) + list(f))[: 2 * chunk_size]
        rows[row, : len(tokens)] = tokens
    return rows


class LocalRetriever:
    """Retrieval from a DB opened in this process. Thread-safe: calls are serialised (the index and the
    embedder are used by one call at a time), so a background thread and the caller can share one."""

    def __init__(self, db: RetroDB, ef: int = DEFAULT_EF_SEARCH, device: str = "cpu"):
        require_searchable(db)
        self.db = db
        self.index = ShardedIndex(db, ef=ef)
        self.embedder = db_embedder(db, device=device)
        self.pad = pad_id(db)
        self.chunk_size = db.chunk_size
        self.tokenizer_sha256 = db.tokenizer_sha256
        self.num_chunks = db.num_chunks
        self.path = str(db.path)
        self.token_rows = TokenRows(db)
        self._lock = threading.Lock()

    def retrieve(self, chunks: list[list[int]], k: int, exclude_docs: list[set[int]] | None = None
                 ) -> list[Retrieved]:
        """Neighbours of each query chunk (token ids); `exclude_docs[q]`: DB documents query q may not use."""
        return self.retrieve_texts([self.db.tokenizer.decode(c) for c in chunks], k, exclude_docs)

    def retrieve_texts(self, texts: list[str], k: int, exclude_docs: list[set[int]] | None = None,
                       own_tokens: list[list[int] | None] | None = None) -> list[Retrieved]:
        """`own_tokens[q]`: query q's token ids when the DB documents it was taken from must be excluded too
        (as `retro neighbors --exclude-same-doc`), else None."""
        if not texts:
            return []
        with self._lock:
            vectors = self.embedder.embed(texts)
            if own_tokens is not None:
                exclude_docs = [
                    (exclude_docs[q] if exclude_docs else set())
                    | (own_documents(self.db, self.index, vectors[q], QueryChunk(0, texts[q], tokens))
                       if tokens is not None else set())
                    for q, tokens in enumerate(own_tokens)]
            if exclude_docs is None:
                ids, dists = self.index.search(vectors, k)
            else:
                ids, dists = search_excluding(self.index, vectors, k, None, self.db.chunk_doc, exclude_docs)
            return self.gather(texts, ids, dists, k)

    def gather(self, texts: list[str], ids: np.ndarray, dists: np.ndarray, k: int) -> list[Retrieved]:
        """The found neighbours' text, sources and [N, F] rows, read through the block cache."""
        out = []
        for text, row_ids, row_d in zip(texts, ids, dists):
            neighbors = neighbor_refs(self.db, row_ids, row_d, self.token_rows)
            pairs = [neighbor_pair(self.token_rows, nb) for nb in neighbors]
            out.append(Retrieved(text, neighbors, pack_rows(pairs, k, self.chunk_size, self.pad), pairs))
        return out


@dataclass
class HttpRetriever:
    """Retrieval from a `retro serve` server: one POST /neighbors per call (the server batches calls from
    all its clients). Checks on connecting that the server's DB is chunked the way the model expects."""

    url: str
    timeout: float = 60.0
    info: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise RetroError(f"--retriever {self.url}: expected http://host:port")
        self.info = self._call("GET", "/info")
        try:
            self.chunk_size = int(self.info["chunk_size"])
            self.pad = int(self.info["pad_id"])
            self.tokenizer_sha256 = str(self.info["tokenizer_sha256"])
            self.num_chunks = int(self.info["chunks"])
        except (KeyError, TypeError, ValueError):
            raise RetroError(f"{self.url}/info: not a retro server's answer") from None
        self.path = self.url

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + route, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read()).get("error", err.reason)
            except ValueError:
                message = err.reason
            raise RetroError(f"{self.url}{route}: {err.code} {message}") from None
        except (urllib.error.URLError, OSError) as err:
            raise RetroError(f"{self.url}: cannot reach the retrieval server ({getattr(err, 'reason', err)})") \
                from None
        except ValueError:
            raise RetroError(f"{self.url}{route}: the answer is not JSON") from None

    def retrieve(self, chunks: list[list[int]], k: int, exclude_docs: list[set[int]] | None = None
                 ) -> list[Retrieved]:
        if not chunks:
            return []
        body: dict = {"token_ids": [list(map(int, c)) for c in chunks], "k": k}
        if exclude_docs is not None:
            body["exclude_docs_per_query"] = [sorted(s) for s in exclude_docs]
        answer = self._call("POST", "/neighbors", body)
        out = []
        for result in answer["results"]:
            for chunk in result["chunks"]:
                neighbors = [Neighbor(**{key: nb[key] for key in Neighbor.__dataclass_fields__})
                             for nb in chunk["neighbors"]]
                pairs = [(nb["tokens"], nb["continuation_tokens"]) for nb in chunk["neighbors"]]
                out.append(Retrieved(chunk["text"], neighbors, pack_rows(pairs, k, self.chunk_size, self.pad), pairs))
        return out
