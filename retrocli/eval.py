"""`retro eval`: bits per byte of a RETRO model on held-out documents, with retrieval from a DB and with
retrieval disabled, in one run; with r(C) from the leakage pass, also bpb(α) (the paper's Figure 6).

Every test chunk C gets loss(C) = Σ −log₂ p over the tokens of C that the model predicts, and bytes(C)
= the UTF-8 bytes of those tokens. bpb = Σ loss / Σ bytes; bpb(α) restricts both sums to chunks with
r(C) ≤ α. Documents are cut into windows of seq_len tokens aligned to the DB chunking; the first token
of each window has no context and is not scored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from retrocli.db import RetroDB, open_db
from retrocli.device import resolve_device
from retrocli.errors import RetroError
from retrocli.model.checkpoint import load_model, resolve_model
from retrocli.near_duplicates import drop_near_duplicate_neighbors, near_duplicates
from retrocli.neighbors import CANDIDATES_PER_K, neighbors_of_inputs
from retrocli.options import DEFAULT_EVAL_BATCH, DEFAULT_LEAKAGE_K, DEFAULT_TEXT_FIELD, check_at_least
from retrocli.overlap import compute_overlap
from retrocli.progress import NullProgress, Progress
from retrocli.sequences import chunk_rows, neighbor_rows, pad_id, stale_neighbor_ids, token_byte_lengths

ALPHA_GRID = (0.0, 0.05, 0.1, 0.125, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class ChunkLosses:
    token_bits_retrieval: np.ndarray  # [num_test_chunks, m]: bits of each token, by its place in its chunk
    token_bits_none: np.ndarray
    bytes: np.ndarray  # [num_test_chunks]

    @property
    def bits_retrieval(self) -> np.ndarray:  # [num_test_chunks]
        return self.token_bits_retrieval.sum(axis=1)

    @property
    def bits_none(self) -> np.ndarray:
        return self.token_bits_none.sum(axis=1)


@torch.no_grad()
def chunk_losses(
    model, db: RetroDB, test: RetroDB, neighbor_ids: np.ndarray, batch_size: int = DEFAULT_EVAL_BATCH,
    progress: Progress | None = None, k: int | None = None, without_retrieval: bool = True,
) -> ChunkLosses:
    """Per-token bits of every test chunk with its `k` retrieved neighbours (default: the model's k) and,
    unless without_retrieval is False, without retrieval (left 0 then)."""
    progress = progress or NullProgress()
    m, k = db.chunk_size, k or model.config.num_neighbors
    if neighbor_ids.shape[1] < k:
        raise RetroError(f"the test neighbours hold {neighbor_ids.shape[1]} per chunk; {k} were asked for")
    L = model.config.seq_len // m
    pad = pad_id(db)
    byte_len = token_byte_lengths(db.tokenizer.json)
    if byte_len is None:
        raise RetroError("bits per byte needs a byte-level BPE tokenizer")
    n = test.num_chunks
    bits_r, bits_n, nbytes = np.zeros((n, m)), np.zeros((n, m)), np.zeros(n, dtype=np.int64)
    db_tokens, db_lengths = db.tokens_block(0, db.num_chunks)
    windows = [
        (s, min(s + L, d.stop))
        for d in (test.doc_chunks(i) for i in range(test.num_docs))
        for s in range(d.start, d.stop, L)
    ]
    windows.sort(key=lambda w: w[1] - w[0])  # equal lengths batch together
    passes = ((True, bits_r), (False, bits_n)) if without_retrieval else ((True, bits_r),)
    task = progress.start("eval", total=len(windows), unit="windows")
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(b - a for a, b in group)
        tokens = np.full((len(group), width * m), pad, dtype=np.int64)
        real = np.zeros_like(tokens, dtype=bool)
        nbr = np.full((len(group), width, k, 2 * m), pad, dtype=np.int64)
        for row, (a, b) in enumerate(group):
            t, r = chunk_rows(test, a, b, pad)
            tokens[row, : (b - a) * m], real[row, : (b - a) * m] = t.reshape(-1), r.reshape(-1)
            nbr[row, : b - a] = neighbor_rows(db, neighbor_ids[a:b, :k], pad, db_tokens, db_lengths)
        targets = np.full_like(tokens, -1)
        targets[:, :-1] = np.where(real[:, :-1] & real[:, 1:], tokens[:, 1:], -1)
        device = model.wte.weight.device  # batches go where the model is; bits come back to the CPU
        idx, tgt = torch.from_numpy(tokens).to(device), torch.from_numpy(targets).to(device)
        for use_retrieval, sink in passes:
            logits, _ = model(idx, neighbors=torch.from_numpy(nbr).to(device) if use_retrieval else None)
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-1, reduction="none"
            ).reshape(tgt.shape)
            bits = (loss / math.log(2)).cpu().numpy()
            for row, (a, _b) in enumerate(group):
                # target at position p is token p+1, which belongs to chunk (p+1)//m of the window
                pos = np.nonzero(targets[row] >= 0)[0]
                owner = a + (pos + 1) // m
                sink[owner, (pos + 1) % m] = bits[row, pos]
                if use_retrieval:
                    np.add.at(nbytes, owner, byte_len[targets[row, pos]])
        task.advance(len(group))
    task.finish()
    return ChunkLosses(bits_r, bits_n, nbytes)


def bpb_summary(losses: ChunkLosses, r: np.ndarray | None, alphas=ALPHA_GRID) -> dict:
    def bpb(bits, mask):
        total = losses.bytes[mask].sum()
        return float(bits[mask].sum() / total) if total else None

    everything = np.ones(len(losses.bytes), dtype=bool)
    out = {
        "bpb_retrieval": bpb(losses.bits_retrieval, everything),
        "bpb_no_retrieval": bpb(losses.bits_none, everything),
        "test_chunks": int(len(losses.bytes)),
        "test_bytes": int(losses.bytes.sum()),
    }
    if out["bpb_retrieval"] and out["bpb_no_retrieval"]:
        out["retrieval_gain"] = 1 - out["bpb_retrieval"] / out["bpb_no_retrieval"]
    if r is not None:
        out["curve"] = [
            {
                "alpha": a,
                "chunks": int((r <= a).sum()),
                "bpb": bpb(losses.bits_retrieval, r <= a),
                "bpb_no_retrieval": bpb(losses.bits_none, r <= a),
            }
            for a in alphas
        ]
    return out


def evaluate(
    model_dir: str | os.PathLike | None,
    db_path: str | os.PathLike,
    inputs: list[str | os.PathLike],
    leakage: bool = True,
    batch_size: int = DEFAULT_EVAL_BATCH,
    threads: int | None = None,
    work_dir: str | os.PathLike | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    progress: Progress | None = None,
    k: int | None = None,
    exclude_near_duplicates: bool = False,
    device: str = "auto",
    stale_retrieval: bool = False,
) -> dict:
    """bpb with and without retrieval on `inputs`; with leakage=True also r(C) (k=DEFAULT_LEAKAGE_K) and bpb(α).
    `k` neighbours per chunk are fed to the model (default: its training k; the paper evaluates 1-10).

    Test text that sits in the DB is retrieved as itself (distance 0): that is the paper's bpb(α) setting,
    and `exact_match_fraction` says how much of it there was. exclude_near_duplicates drops from each test
    document's neighbours the DB documents that near-duplicate it (13-gram Jaccard ≥ DEFAULT_JACCARD, on
    normalised text), so what remains is what retrieval finds elsewhere. stale_retrieval also measures bpb
    with the neighbours stale retrieval delivers (chunk u reads chunk u−1's; `bpb_stale_retrieval`)."""
    if k is not None and k < 1:
        raise RetroError(f"--k must be at least 1, not {k}")
    check_at_least("--batch-size", batch_size)
    check_at_least("--threads", threads, allow_none=True)
    model_dir = resolve_model(model_dir)
    if threads:
        torch.set_num_threads(threads)
    where = resolve_device(device)
    db = open_db(db_path)
    model, meta = load_model(model_dir, db)
    model.to(where)
    model_k = k or model.config.num_neighbors
    k = max(model_k, DEFAULT_LEAKAGE_K if leakage else 0)
    k = min(k, db.num_chunks)
    candidates = min(db.num_chunks, CANDIDATES_PER_K * k) if exclude_near_duplicates else k
    with neighbors_of_inputs(db.path, inputs, work_dir, k=k, candidates=candidates, threads=threads,
                             progress=progress, text_field=text_field, device=str(where)) as (nb, test):
        ids, excluded = nb.ids[:, :k], None
        if exclude_near_duplicates:
            pairs, _ = near_duplicates(db, test, progress=progress)
            ids, replaced = drop_near_duplicate_neighbors(db, test, nb.ids, pairs, k)
            excluded = {"pairs": len(pairs), "neighbours_replaced": replaced}
        losses = chunk_losses(model, db, test, ids, batch_size, progress, k=model_k)
        r = compute_overlap(db, test, ids, progress=progress).r if leakage else None
        result = bpb_summary(losses, r)
        if stale_retrieval:
            stale = chunk_losses(model, db, test, stale_neighbor_ids(ids, test.chunk_doc), batch_size, progress,
                                 k=model_k, without_retrieval=False)
            result["bpb_stale_retrieval"] = float(stale.bits_retrieval.sum() / losses.bytes.sum())
            result["stale_retrieval_cost"] = result["bpb_stale_retrieval"] / result["bpb_retrieval"] - 1
        result.update(
            {
                "model": str(model_dir),
                "copy_head": model.copy_head is not None,
                "db": str(db.path),
                "inputs": [str(p) for p in inputs],
                "num_neighbors": model_k,
                "test_documents": test.num_docs,
                # chunks given a neighbour at distance 0: the test text itself, sitting in the DB
                "exact_match_fraction": exact_match_fraction(nb, ids[:, :model_k]),
                "excluded_near_duplicates": excluded,
            }
        )
        return result


EXACT_DISTANCE = 1e-6  # squared L2 of fp16-stored unit vectors: a copy is 0 up to rounding
EXACT_WARNING = 0.25  # above this share of test chunks retrieving themselves, eval says so


def exact_match_fraction(nb, used: np.ndarray) -> float:
    """Share of test chunks with a neighbour fed to the model (`used` [n, k], ids from nb's candidates)
    at distance 0."""
    if len(used) == 0:
        return 0.0
    same = (nb.ids[:, None, :] == used[:, :, None]) & (used[:, :, None] >= 0)  # [n, k, C]
    dist = np.where(same, nb.distances[:, None, :], np.inf).min(axis=2)
    return float(np.mean((dist <= EXACT_DISTANCE).any(axis=1)))
