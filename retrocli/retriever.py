"""Retrieval for generation: the k nearest DB chunks of a batch of query chunks, with the [N, F] tokens the
model reads, from a DB opened here (`LocalRetriever`) or from `retro serve` over HTTP (`HttpRetriever`).

Both answer `retrieve(chunks, k)` for query chunks given as token ids, the way generation sees them, so
`retro generate` runs unchanged on either; the server itself answers with a LocalRetriever, so the two
return the same neighbours. `bench/bench_retrieval_batch.py` times its three parts (embed the query
chunks, search the index, gather [N, F]) against the batch size.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np

from retrocli.artifacts import check_fields
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
from retrocli.sequences import pad_id, tokenizer_pad_id
from retrocli.tokenizer import LoadedTokenizer

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

    def __init__(self, db: RetroDB, ef: int = DEFAULT_EF_SEARCH, device: str = "cpu", nprobe: int | None = None,
                 rerank: int | None = None):
        """nprobe, rerank (ivfpq): override the values recorded with the index."""
        require_searchable(db)
        self.db = db
        self.index = ShardedIndex(db, ef=ef, nprobe=nprobe, rerank=rerank)
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
            vectors = self.embedder.embed(texts, layout_independent=False)  # a query: latency first
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


# What a `retro serve` answer must hold (retrocli.db.check_fields tables; ints are ≥ 0, chunk_size ≥ 1).
SERVED_DB_SCHEMA = {"db_id": (str, True), "version": (int, True), "content_id": (str, True)}
INFO_SCHEMA = {**SERVED_DB_SCHEMA, "chunks": (int, True), "chunk_size": (int, True), "vocab_size": (int, True),
               "pad_id": (int, True), "tokenizer_sha256": (str, True)}
CHUNK_SCHEMA = {"chunk": (int, True), "text": (str, True), "neighbors": (list, True)}
NEIGHBOR_SCHEMA = {"id": (int, True), "doc": (int, True), "source": (str, True), "text": (str, True),
                   "tokens": (list, True), "continuation_tokens": (list, True)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


@dataclass
class HttpRetriever:
    """Retrieval from a `retro serve` server: one POST /neighbors per call (the server batches calls from
    all its clients). Checks on connecting that the server's DB is chunked the way the model expects, and
    pins the DB version it serves (db_id, version, content_id): an answer from any other version, or one
    that is not what the server's schema promises, is one line naming the server."""

    url: str
    timeout: float = 60.0
    info: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise RetroError(f"--retriever {self.url}: expected http://host:port")
        self.info = self._call("GET", "/info")
        where = f"{self.url}/info"
        if not isinstance(self.info, dict):
            raise RetroError(f"{where}: not a retro server's answer (not a JSON object)")
        check_fields(where, self.info, INFO_SCHEMA)
        if self.info["version"] < 1 or self.info["vocab_size"] < 1:
            raise RetroError(f"{where}: field 'version' and 'vocab_size' must be ≥ 1")
        self.chunk_size = self.info["chunk_size"]
        self.pad = self.info["pad_id"]
        self.tokenizer_sha256 = self.info["tokenizer_sha256"]
        self.num_chunks = self.info["chunks"]
        self.vocab_size = self.info["vocab_size"]
        self.served_db = {key: self.info[key] for key in SERVED_DB_SCHEMA}
        self.path = self.url

    def check_tokenizer(self, tokenizer: LoadedTokenizer) -> None:
        """The model's tokenizer (same sha256 as the server's) decides, whatever the server says: no
        neighbour token may be outside its ids, and missing neighbours are its pad id."""
        if self.vocab_size != tokenizer.vocab_size:
            raise RetroError(f"{self.url}/info: field 'vocab_size' is {self.vocab_size}; the tokenizer it names "
                             f"has {tokenizer.vocab_size}")
        pad = tokenizer_pad_id(tokenizer)
        if self.pad != pad:
            raise RetroError(f"{self.url}/info: field 'pad_id' is {self.pad}; the tokenizer it names pads with {pad}")

    def _call(self, method: str, route: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + route, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            try:
                answer = json.loads(err.read())
                message = answer["error"] if isinstance(answer, dict) and "error" in answer else err.reason
            except (ValueError, RecursionError, OSError, http.client.HTTPException):
                message = err.reason
            raise RetroError(f"{self.url}{route}: {err.code} {' '.join(str(message).split())}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise RetroError(f"{self.url}: cannot reach the retrieval server ({getattr(err, 'reason', err)})") \
                from None
        except (ValueError, RecursionError):
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
        for chunk in self.checked_chunks(answer, len(chunks), k):
            neighbors = [Neighbor(**{key: nb[key] for key in Neighbor.__dataclass_fields__})
                         for nb in chunk["neighbors"]]
            pairs = [(nb["tokens"], nb["continuation_tokens"]) for nb in chunk["neighbors"]]
            out.append(Retrieved(chunk["text"], neighbors, pack_rows(pairs, k, self.chunk_size, self.pad), pairs))
        return out

    def checked_chunks(self, answer, queries: int, k: int) -> list[dict]:
        """The one chunk of each of `queries` results, every field checked (types, ranges, counts) and the
        DB version the same as when we connected; RetroError naming the server otherwise."""
        where = f"{self.url}/neighbors"
        if not isinstance(answer, dict):
            raise RetroError(f"{where}: not a retro server's answer (not a JSON object)")
        check_fields(where, answer, {**SERVED_DB_SCHEMA, "results": (list, True)})
        served = {key: answer[key] for key in SERVED_DB_SCHEMA}
        if served != self.served_db:
            raise RetroError(f"{where}: the server now serves another DB version ({served['db_id']} version "
                             f"{served['version']}, content {served['content_id'][:12]}…) than when generation "
                             f"started ({self.served_db['db_id']} version {self.served_db['version']}, content "
                             f"{self.served_db['content_id'][:12]}…); rerun to use it")
        if len(answer["results"]) != queries:
            raise RetroError(f"{where}: {len(answer['results'])} results for {queries} queries")
        chunks = []
        for q, result in enumerate(answer["results"]):
            name = f"results[{q}]"
            if not isinstance(result, dict):
                raise RetroError(f"{where}: field '{name}' must be an object, not {result!r}")
            check_fields(where, result, {"chunks": (list, True)}, f"{name}.")
            if len(result["chunks"]) != 1 or not isinstance(result["chunks"][0], dict):
                raise RetroError(f"{where}: field '{name}.chunks' must hold one chunk object (one query chunk "
                                 f"was sent), not {len(result['chunks'])} items")
            chunk = result["chunks"][0]
            check_fields(where, chunk, CHUNK_SCHEMA, f"{name}.chunks[0].")
            if len(chunk["neighbors"]) > k:
                raise RetroError(f"{where}: field '{name}.chunks[0].neighbors' holds {len(chunk['neighbors'])} "
                                 f"neighbours; {k} were asked for")
            for n, neighbor in enumerate(chunk["neighbors"]):
                self.check_neighbor(where, neighbor, f"{name}.chunks[0].neighbors[{n}]")
            chunks.append(chunk)
        return chunks

    def check_neighbor(self, where: str, neighbor, name: str) -> None:
        if not isinstance(neighbor, dict):
            raise RetroError(f"{where}: field '{name}' must be an object, not {neighbor!r}")
        check_fields(where, neighbor, NEIGHBOR_SCHEMA, f"{name}.")

        def refuse(key: str, what: str):
            if key not in neighbor:
                raise RetroError(f"{where}: field '{name}.{key}' is missing")
            raise RetroError(f"{where}: field '{name}.{key}' must be {what}, not {_short(neighbor[key])}")

        if neighbor["id"] >= self.num_chunks:
            refuse("id", f"a chunk id below {self.num_chunks}")
        distance = neighbor.get("distance")
        if not isinstance(distance, (int, float)) or isinstance(distance, bool) or not math.isfinite(distance):
            refuse("distance", "a finite number")
        cont = neighbor.get("continuation_id", ...)
        if not (cont is None or _is_int(cont) and 0 <= cont < self.num_chunks):
            refuse("continuation_id", f"null or a chunk id below {self.num_chunks}")
        if not (neighbor.get("continuation", ...) is None or isinstance(neighbor.get("continuation"), str)):
            refuse("continuation", "null or a string")
        for key in ("tokens", "continuation_tokens"):
            tokens = neighbor[key]
            if len(tokens) > self.chunk_size:
                raise RetroError(f"{where}: field '{name}.{key}' holds {len(tokens)} tokens; a chunk has at most "
                                 f"{self.chunk_size}")
            for t, token in enumerate(tokens):
                if not (_is_int(token) and 0 <= token < self.vocab_size):
                    raise RetroError(f"{where}: field '{name}.{key}[{t}]' must be a token id in "
                                     f"[0, {self.vocab_size}), not {_short(token)}")
