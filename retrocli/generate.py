"""`retro generate`: sample from a RETRO model with retrieval during generation.

Whenever a chunk of m tokens completes — in the prompt or in the generated text — its text is embedded
with the DB's embedder, its k nearest DB chunks are retrieved with their continuations, encoded, and
the following tokens attend to them (the paper's CCA alignment). Tokens stream out as they are sampled.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from retrocli.db import RetroDB, open_db
from retrocli.device import resolve_device
from retrocli.embed import db_embedder
from retrocli.errors import RetroError
from retrocli.index import ShardedIndex
from retrocli.model.checkpoint import load_model
from retrocli.neighbors import neighbor_refs
from retrocli.options import (
    DEFAULT_EF_SEARCH,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SAMPLING_SEED,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    check_at_least,
    check_in_range,
)
from retrocli.overlap import NEIGHBOR_PAD, longest_runs
from retrocli.sequences import neighbor_rows, pad_id


@dataclass
class Retrieval:
    chunk_index: int
    chunk_text: str
    neighbors: list  # retrocli.neighbors.Neighbor


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
    copy: Copy | None = None


def longest_copy(db: RetroDB, token_ids: list[int], retrievals: list[Retrieval]) -> Copy | None:
    """Where the continuation reuses retrieved text: its longest token run shared with any neighbour."""
    ids = list(dict.fromkeys(nb.id for rec in retrievals for nb in rec.neighbors))
    if not token_ids or not ids:
        return None
    targets = neighbor_rows(db, np.array([ids]), NEIGHBOR_PAD)
    query = np.asarray(token_ids, dtype=np.int64)[None, :]
    length, which, q_start, _ = (int(v[0]) for v in longest_runs(query, np.array([len(token_ids)]), targets))
    if length == 0:
        return None
    neighbor = ids[which]
    return Copy(length, db.tokenizer.decode(token_ids[q_start : q_start + length]), neighbor,
                db.source(db.doc_of(neighbor)))


def generate(
    db_path: str | os.PathLike | RetroDB, prompt: str, model_dir: str | os.PathLike | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K, top_p: float | None = None,
    seed: int = DEFAULT_SAMPLING_SEED, k: int | None = None, ef: int = DEFAULT_EF_SEARCH, retrieval: bool = True,
    on_text: Callable[[str], None] | None = None, on_retrieval: Callable[[Retrieval], None] | None = None,
    device: str = "auto",
) -> Generation:
    """`device` runs the model and the query embedder there; greedy decoding gives the same tokens on any
    device in fp32 (up to ties within rounding)."""
    where = resolve_device(device)
    db = db_path if isinstance(db_path, RetroDB) else open_db(db_path)
    model, _ = load_model(model_dir, db)
    model.to(where)
    if not prompt.strip():
        raise RetroError("--prompt is empty")
    if max_new_tokens < 1:
        raise RetroError("--max-new-tokens: must be at least 1")
    if not temperature >= 0:  # NaN too
        raise RetroError("--temperature: must be ≥ 0 (0 = greedy)")
    check_at_least("--top-k", top_k, allow_none=True)
    check_in_range("--top-p", top_p, 0, 1, allow_none=True)
    check_at_least("--k", k, allow_none=True)
    check_at_least("--ef", ef)
    k = k or model.config.num_neighbors
    pad = pad_id(db)
    retrieve_fn = None
    result = Generation(prompt, "")
    if retrieval:
        index = ShardedIndex(db, ef=ef)
        embedder = db_embedder(db, device=where)
        if k > db.num_chunks:
            raise RetroError(f"--k {k} is larger than the DB ({db.num_chunks} chunks)")

        def retrieve_fn(chunk_ids: list[int]) -> torch.Tensor:
            text = db.tokenizer.decode(chunk_ids)
            ids, dists = index.search(embedder.embed([text]), k)
            rec = Retrieval(len(result.retrievals), text, neighbor_refs(db, ids[0], dists[0]))
            result.retrievals.append(rec)
            if on_retrieval:
                on_retrieval(rec)
            return torch.from_numpy(neighbor_rows(db, ids[0], pad))

    prompt_ids = db.tokenizer.encode_batch([prompt])[0]
    if not prompt_ids:
        raise RetroError("--prompt encodes to no tokens")
    generator = torch.Generator(device=where).manual_seed(seed)  # sampling draws on the model's device
    new_ids: list[int] = []
    shown = ""
    for token in model.generate_iter(torch.tensor(prompt_ids), max_new_tokens, retrieve_fn, temperature,
                                     top_k, top_p, generator):
        new_ids.append(int(token[0]))
        text = db.tokenizer.decode(new_ids)
        # hold back a trailing partial UTF-8 character until its other bytes arrive
        stable = text[:-1] if text.endswith("\ufffd") else text
        if on_text and len(stable) > len(shown):
            on_text(stable[len(shown):])
        shown = stable if len(stable) > len(shown) else shown
    result.text = db.tokenizer.decode(new_ids)
    result.token_ids = new_ids
    result.copy = longest_copy(db, new_ids, result.retrievals)
    if on_text and len(result.text) > len(shown):
        on_text(result.text[len(shown):])
    return result
