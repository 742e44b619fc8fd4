"""`retro generate`: sample from a RETRO model with retrieval during generation.

Whenever a chunk of m tokens completes — in the prompt or in the generated text — its text is embedded
with the DB's embedder, its k nearest DB chunks are retrieved with their continuations, encoded, and
the following tokens attend to them (the paper's CCA alignment). Tokens stream out as they are sampled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrocli.datastore import Datastore, FinalHidden
from retrocli.db import DBLike, as_db
from retrocli.device import resolve_device
from retrocli.errors import RetroError
from retrocli.knn_lm import knn_distribution
from retrocli.model.checkpoint import load_model, resolve_model
from retrocli.options import (
    DEFAULT_EF_SEARCH,
    DEFAULT_GENERATE_LAMBDA,
    KnnOptions,
    SamplingOptions,
    check_at_least,
    check_knn_temperature,
)
from retrocli.overlap import NEIGHBOR_PAD, longest_runs
from retrocli.retriever import HttpRetriever, LocalRetriever
from retrocli.sequences import pad_id
from retrocli.tokenizer import LoadedTokenizer, load_tokenizer

COPY_MIN_TOKENS = 4  # a shorter shared run is too often a common phrase to call a copy


@dataclass
class Retrieval:
    chunk_index: int  # the chunk (of prompt + continuation) whose neighbours these are
    chunk_text: str
    neighbors: list  # retrocli.neighbors.Neighbor
    rows: np.ndarray | None = None  # [k, 2m] the tokens the model read


@dataclass
class Copy:
    """The longest run of generated tokens that also occurs in a retrieved neighbour's [N, F]."""

    tokens: int
    text: str
    neighbor_id: int
    source: str


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation only
    retrievals: list[Retrieval] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the continuation's tokens
    prompt_tokens: int = 0
    copy: Copy | None = None
    seconds: float = 0.0  # from the first prompt token in to the last token out
    retrieval_wait_seconds: float = 0.0  # of which decoding stood waiting for retrieval


@dataclass
class CopiedSpan:
    """A run of the continuation found verbatim in the [N, F] of a neighbour the model had read when it
    wrote the run's first token. Token offsets into the continuation; character offsets into its text."""

    start: int
    end: int
    start_char: int
    end_char: int
    text: str
    chunk: int  # the completed chunk whose retrieval holds the neighbour
    rank: int  # the neighbour's place in that retrieval (0 = nearest)
    neighbor_id: int
    doc: int
    source: str
    neighbor_start: int  # where the run starts in the neighbour's [N, F] tokens


def copied_spans(tokenizer, pad: int, token_ids: list[int], retrievals: list[Retrieval], prompt_tokens: int,
                 chunk_size: int, min_tokens: int = COPY_MIN_TOKENS) -> list[CopiedSpan]:
    """Left to right, the longest runs of at least `min_tokens` continuation tokens that occur in a
    neighbour the model could attend to there. With the paper's CCA alignment the neighbours of chunk c
    reach the tokens from position (c + 1)·m on, so a run starting earlier is never credited to them."""
    sources = [(rec, rank, nb, row) for rec in retrievals if rec.rows is not None
               for rank, (nb, row) in enumerate(zip(rec.neighbors, rec.rows))]
    if not token_ids or not sources:
        return []
    rows = np.stack([np.where(row == pad, NEIGHBOR_PAD, row) for _, _, _, row in sources])  # [R, 2m]
    ids = np.asarray(token_ids, dtype=np.int64)
    T, S = len(ids), rows.shape[1]
    # run[r, i, p]: how many tokens match from continuation token i and row r's token p on
    run = np.zeros((len(rows), T + 1, S + 1), dtype=np.int32)
    for i in range(T - 1, -1, -1):
        run[:, i, :S] = (rows == ids[i]) * (1 + run[:, i + 1, 1:])
    starts = prompt_tokens + np.arange(T)
    reachable = starts[None, :] >= (np.array([rec.chunk_index for rec, _, _, _ in sources])[:, None] + 1) * chunk_size
    reach = np.where(reachable[:, :, None], run[:, :T, :S], 0)
    best, where = reach.max(axis=2), reach.argmax(axis=2)  # [R, T]: the longest run from i, and where in row r
    spans, i = [], 0
    while i < T:
        r = int(best[:, i].argmax())
        length = int(best[r, i])
        if length < min_tokens:
            i += 1
            continue
        rec, rank, nb, _ = sources[r]
        start_char = len(tokenizer.decode(token_ids[:i]))
        end_char = len(tokenizer.decode(token_ids[: i + length]))
        spans.append(CopiedSpan(i, i + length, start_char, end_char, tokenizer.decode(token_ids[i : i + length]),
                                rec.chunk_index, rank, nb.id, nb.doc, nb.source, int(where[r, i])))
        i += length
    return spans


def longest_copy(tokenizer, pad: int, token_ids: list[int], retrievals: list[Retrieval]) -> Copy | None:
    """Where the continuation reuses retrieved text: its longest token run shared with any neighbour."""
    rows, neighbors = {}, {}
    for rec in retrievals:
        for nb, row in zip(rec.neighbors, rec.rows if rec.rows is not None else []):
            rows.setdefault(nb.id, row)
            neighbors.setdefault(nb.id, nb)
    if not token_ids or not rows:
        return None
    ids = list(rows)
    targets = np.stack([np.where(rows[i] == pad, NEIGHBOR_PAD, rows[i]) for i in ids])[None]
    query = np.asarray(token_ids, dtype=np.int64)[None, :]
    length, which, q_start, _ = (int(v[0]) for v in longest_runs(query, np.array([len(token_ids)]), targets))
    if length == 0:
        return None
    neighbor = neighbors[ids[which]]
    return Copy(length, tokenizer.decode(token_ids[q_start : q_start + length]), neighbor.id, neighbor.source)


class StaleRetrieval:
    """Retrieval off the critical path: when chunk u completes, its retrieval starts in a background thread
    and the next chunk reads the neighbours of chunk u−1, retrieved while chunk u was being decoded. The
    first chunk after the first completed one reads none. Decoding waits only when a retrieval takes longer
    than decoding a whole chunk."""

    def __init__(self, fresh: Callable[[list[int]], Retrieval]):
        self.fresh = fresh
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retro-retrieval")
        self.pending: Future | None = None
        self.wait_seconds = 0.0

    def __call__(self, chunk_ids: list[int]) -> Retrieval | None:
        ready = self._collect()
        self.pending = self.pool.submit(self.fresh, chunk_ids)
        return ready

    def _collect(self) -> Retrieval | None:
        if self.pending is None:
            return None
        start = time.perf_counter()
        got = self.pending.result()
        self.wait_seconds += time.perf_counter() - start
        self.pending = None
        return got

    def finish(self) -> Retrieval | None:
        """The retrieval still running for the last chunk (no chunk reads it)."""
        try:
            return self._collect()
        finally:
            self.pool.shutdown(wait=True)


def model_tokenizer(model_path: Path, meta: dict) -> LoadedTokenizer:
    """The tokenizer a model was trained with, from its directory (for generation without a local DB)."""
    tokenizer = load_tokenizer(model_path / "tokenizer.json")
    if tokenizer.sha256 != meta["tokenizer_sha256"]:
        raise RetroError(f"{model_path}/tokenizer.json: differs from the tokenizer the model was trained with")
    return tokenizer


def generate(
    db: DBLike | None, prompt: str, model_dir: str | os.PathLike | None = None,
    sampling: SamplingOptions | None = None, k: int | None = None, ef: int = DEFAULT_EF_SEARCH,
    retrieval: bool = True, on_text: Callable[[str], None] | None = None,
    on_retrieval: Callable[[Retrieval], None] | None = None, device: str = "auto", retriever=None,
    stale_retrieval: bool = False, knn: KnnOptions | None = None, loaded: tuple | None = None,
    nprobe: int | None = None, rerank: int | None = None,
) -> Generation:
    """Continue `prompt` with the model (default: the bundled one for db's tokens), retrieving for each
    completed chunk from `db`. `device` runs the model and the query embedder there; greedy decoding gives
    the same tokens on any device in fp32 (up to ties within rounding). `retriever`: a LocalRetriever, an
    HttpRetriever or the URL of a `retro serve` server, used instead of opening `db`. `stale_retrieval`:
    see StaleRetrieval.

    knn: a datastore (`retro knn-datastore`) for this model: each token is sampled from
    λ·p_kNN + (1−λ)·p_model, p_kNN from the knn.k keys nearest to the state that made the logits, at
    temperature knn.temperature (default: the datastore's median nearest-key distance).

    loaded: (model, meta) from load_model, already checked against the DB: a server keeps its model loaded
    instead of reading it again for every request. nprobe, rerank (ivfpq): override the values recorded with
    the DB's index (with `db`; a given retriever keeps its own and refuses them)."""
    sampling = sampling or SamplingOptions()
    if retriever is not None and (nprobe is not None or rerank is not None):
        raise RetroError(f"{'--nprobe' if nprobe is not None else '--rerank'}: applies to --db; a server "
                         "searches with its own (retro serve --nprobe/--rerank)")
    if not prompt.strip():
        raise RetroError("--prompt is empty")
    sampling.check()
    check_at_least("--k", k, allow_none=True)
    check_at_least("--ef", ef)
    if knn is not None:
        check_knn_temperature(knn.temperature)
    where = resolve_device(device)
    if isinstance(retriever, str):
        retriever = HttpRetriever(retriever)
    if isinstance(retriever, LocalRetriever):
        db = retriever.db
    elif retriever is not None:
        db = None  # a server: the tokenizer comes from the model directory
    elif db is None:
        raise RetroError("give a DB (--db) or a retrieval server (--retriever)")
    else:
        db = as_db(db)
    model, meta = loaded or load_model(model_dir, db if db is not None else retriever)
    model.to(where)
    tokenizer = db.tokenizer if db is not None else model_tokenizer(resolve_model(model_dir, retriever), meta)
    if isinstance(retriever, HttpRetriever):
        retriever.check_tokenizer(tokenizer)
    k = k or model.config.num_neighbors
    pad = pad_id(db) if db is not None else retriever.pad
    retrieve_fn = stale = None
    result = Generation(prompt, "")

    def record(rec: Retrieval | None) -> torch.Tensor | None:
        if rec is None:
            return None
        rec.chunk_index = len(result.retrievals)
        result.retrievals.append(rec)
        if on_retrieval:
            on_retrieval(rec)
        return torch.from_numpy(rec.rows)

    if retrieval:
        if retriever is None:
            retriever = LocalRetriever(db, ef=ef, device=where, nprobe=nprobe, rerank=rerank)
        if k > retriever.num_chunks:
            raise RetroError(f"--k {k} is larger than the DB ({retriever.num_chunks} chunks)")

        def fresh(chunk_ids: list[int]) -> Retrieval:
            [got] = retriever.retrieve([chunk_ids], k)
            return Retrieval(-1, got.text, got.neighbors, got.rows)

        def waited_for(chunk_ids: list[int]) -> Retrieval:  # fresh retrieval: decoding waits all of it
            start = time.perf_counter()
            try:
                return fresh(chunk_ids)
            finally:
                result.retrieval_wait_seconds += time.perf_counter() - start

        if stale_retrieval:
            stale = StaleRetrieval(fresh)
            retrieve_fn = lambda chunk_ids: record(stale(chunk_ids))  # noqa: E731
        else:
            retrieve_fn = lambda chunk_ids: record(waited_for(chunk_ids))  # noqa: E731

    mix_fn, hidden = None, None
    if knn is not None:
        knn_lambda = DEFAULT_GENERATE_LAMBDA if knn.lam is None else knn.lam
        if not 0 <= knn_lambda <= 1:  # NaN too
            raise RetroError(f"--lambda: must be in [0, 1], got {knn_lambda}")
        check_at_least("--knn-k", knn.k)
        store = knn.datastore if isinstance(knn.datastore, Datastore) else Datastore(knn.datastore, knn.ef, knn.nprobe)
        if db is not None:
            store.check_matches(model_dir, db)
        else:
            store.check_model(resolve_model(model_dir, retriever))
        hidden = FinalHidden(model)
        knn_t = knn.temperature or store.temperature_scale

        def mix_fn(logits: torch.Tensor) -> torch.Tensor:
            query = hidden.value[:, -1].float().cpu().numpy()
            ids, dists = store.search(query, knn.k)
            p_model = torch.softmax(logits.double(), dim=-1)
            p_knn = torch.stack([knn_distribution(d, store.values[np.maximum(i, 0)], knn_t, p_model.shape[-1])
                                 for i, d in zip(ids, dists, strict=True)]).to(p_model.device)
            return torch.log(knn_lambda * p_knn + (1 - knn_lambda) * p_model).to(logits.dtype)

    prompt_ids = tokenizer.encode_batch([prompt])[0]
    if not prompt_ids:
        raise RetroError("--prompt encodes to no tokens")
    generator = torch.Generator(device=where).manual_seed(sampling.seed)  # sampling draws on the model's device
    new_ids: list[int] = []
    shown = ""
    started = time.perf_counter()
    try:
        for token in model.generate_iter(torch.tensor(prompt_ids), sampling.max_new_tokens, retrieve_fn,
                                         sampling.temperature, sampling.top_k, sampling.top_p, generator,
                                         mix_fn=mix_fn):
            new_ids.append(int(token[0]))
            text = tokenizer.decode(new_ids)
            # hold back a trailing partial UTF-8 character until its other bytes arrive
            stable = text[:-1] if text.endswith("\ufffd") else text
            if on_text and len(stable) > len(shown):
                on_text(stable[len(shown):])
            shown = stable if len(stable) > len(shown) else shown
    finally:
        last = stale.finish() if stale is not None else None  # never leave the thread running
        if hidden is not None:
            hidden.close()
    result.seconds = time.perf_counter() - started
    if stale is not None:
        result.retrieval_wait_seconds = stale.wait_seconds
        record(last)
    result.text = tokenizer.decode(new_ids)
    result.token_ids = new_ids
    result.prompt_tokens = len(prompt_ids)
    result.copy = longest_copy(tokenizer, pad, new_ids, result.retrievals)
    if on_text and len(result.text) > len(shown):
        on_text(result.text[len(shown):])
    return result
