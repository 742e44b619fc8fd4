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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrocli.batch_neighbors import CANDIDATES_PER_K, neighbors_of_inputs
from retrocli.datastore import Datastore, FinalHidden
from retrocli.db import DBLike, RetroDB, as_db
from retrocli.device import resolve_device
from retrocli.errors import RetroError
from retrocli.knn_lm import Interpolation, is_dev_document, tune_interpolation
from retrocli.model.checkpoint import load_model, resolve_model
from retrocli.near_duplicates import drop_near_duplicate_neighbors, near_duplicates
from retrocli.options import (
    DEFAULT_ALPHA,
    DEFAULT_EVAL_BATCH,
    DEFAULT_KNN_K,
    DEFAULT_LEAKAGE_K,
    DEFAULT_TEXT_FIELD,
    KnnOptions,
    NeighborOptions,
    check_at_least,
)
from retrocli.overlap import compute_overlap
from retrocli.progress import NullProgress, Progress
from retrocli.sequences import chunk_rows, neighbor_rows, pad_id, stale_neighbor_ids, token_byte_lengths

ALPHA_GRID = (0.0, 0.05, 0.1, 0.125, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class TokenNeighbours:
    """kNN-LM: the datastore neighbours of the hidden state that predicts each test token."""

    dists: np.ndarray  # [num_test_chunks, m, K] squared L2, inf where fewer
    values: np.ndarray  # [num_test_chunks, m, K] their next tokens


@dataclass
class ChunkLosses:
    token_bits_retrieval: np.ndarray  # [num_test_chunks, m]: bits of each token, by its place in its chunk
    token_bits_none: np.ndarray
    bytes: np.ndarray  # [num_test_chunks]
    targets: np.ndarray | None = None  # [num_test_chunks, m] the token scored there, −1 where none
    knn_retrieval: TokenNeighbours | None = None  # queried with the RETRO pass's hidden states
    knn_none: TokenNeighbours | None = None  # with the pass without retrieval
    seconds: dict = field(default_factory=dict)  # forward passes and kNN searches

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
    knn: Datastore | None = None, knn_k: int = DEFAULT_KNN_K, knn_exclude: dict[int, np.ndarray] | None = None,
) -> ChunkLosses:
    """Per-token bits of every test chunk with its `k` retrieved neighbours (default: the model's k) and,
    unless without_retrieval is False, without retrieval (left 0 then). With a kNN-LM datastore `knn`,
    also the `knn_k` nearest keys of each pass's hidden state before every scored token, never from the DB
    documents knn_exclude names for the token's test document."""
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
    losses = ChunkLosses(bits_r, bits_n, nbytes)
    seconds = losses.seconds
    if knn is not None:
        losses.targets = np.full((n, m), -1, dtype=np.int64)
        losses.knn_retrieval, losses.knn_none = (
            TokenNeighbours(np.full((n, m, knn_k), np.inf, np.float32), np.zeros((n, m, knn_k), np.int64))
            for _ in range(2))
    hidden = FinalHidden(model) if knn is not None else None
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
            started = time.perf_counter()
            logits, _ = model(idx, neighbors=torch.from_numpy(nbr).to(device) if use_retrieval else None)
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-1, reduction="none"
            ).reshape(tgt.shape)
            bits = (loss / math.log(2)).cpu().numpy()
            name = "retrieval" if use_retrieval else "none"
            seconds[f"forward_{name}"] = seconds.get(f"forward_{name}", 0.0) + time.perf_counter() - started
            placed = []
            for row, (a, _b) in enumerate(group):
                # target at position p is token p+1, which belongs to chunk (p+1)//m of the window
                pos = np.nonzero(targets[row] >= 0)[0]
                owner = a + (pos + 1) // m
                sink[owner, (pos + 1) % m] = bits[row, pos]
                placed.append((pos, owner))
                if use_retrieval:
                    np.add.at(nbytes, owner, byte_len[targets[row, pos]])
                    if knn is not None:
                        losses.targets[owner, (pos + 1) % m] = targets[row, pos]
            if knn is not None:
                started = time.perf_counter()
                _search_knn(knn, knn_k, hidden.value.float().cpu().numpy(), group, placed, test, knn_exclude,
                            losses.knn_retrieval if use_retrieval else losses.knn_none, m)
                seconds[f"knn_{name}"] = seconds.get(f"knn_{name}", 0.0) + time.perf_counter() - started
        task.advance(len(group))
    if hidden is not None:
        hidden.close()
    task.finish()
    return losses


def _search_knn(knn: Datastore, k: int, states: np.ndarray, group, placed, test: RetroDB,
                exclude: dict[int, np.ndarray] | None, sink: TokenNeighbours, m: int) -> None:
    """The datastore neighbours of each scored position's hidden state in one batch of windows: rows of
    test documents with nothing to exclude in one search, the others each with their exclusions."""
    excluded = [(exclude or {}).get(int(test.chunk_doc[a])) for a, _b in group]
    free = [row for row, docs in enumerate(excluded) if docs is None]
    batches = [(free, None)] + [([row], docs) for row, docs in enumerate(excluded) if docs is not None]
    for rows, docs in batches:
        if not rows:
            continue
        queries = np.concatenate([states[row, placed[row][0]] for row in rows])
        ids, dists = knn.search(queries, k, exclude_docs=docs, threads=torch.get_num_threads())
        values = knn.values[np.maximum(ids, 0)]
        at = 0
        for row in rows:
            pos, owner = placed[row]
            sink.dists[owner, (pos + 1) % m] = dists[at : at + len(pos)]
            sink.values[owner, (pos + 1) % m] = values[at : at + len(pos)]
            at += len(pos)


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
    db: DBLike,
    inputs: list[str | os.PathLike],
    model_dir: str | os.PathLike | None = None,
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
    knn: KnnOptions | None = None,
    losses_out: str | os.PathLike | None = None,
    nprobe: int | None = None,
    rerank: int | None = None,
) -> dict:
    """bpb with and without retrieval on `inputs`; with leakage=True also r(C) (k=DEFAULT_LEAKAGE_K) and bpb(α).
    `k` neighbours per chunk are fed to the model (default: its training k; the paper evaluates 1-10).

    Test text that sits in the DB is retrieved as itself (distance 0): that is the paper's bpb(α) setting,
    and `exact_match_fraction` says how much of it there was. exclude_near_duplicates drops from each test
    document's neighbours the DB documents that near-duplicate it (13-gram Jaccard ≥ DEFAULT_JACCARD, on
    normalised text), so what remains is what retrieval finds elsewhere. stale_retrieval also measures bpb
    with the neighbours stale retrieval delivers (chunk u reads chunk u−1's; `bpb_stale_retrieval`).

    knn: a datastore built by `retro knn-datastore` for this model and DB (λ None or "auto": tuned); the
    result then holds `knn_lm`: the LM alone, RETRO, kNN-LM and RETRO + kNN-LM side by side (knn_comparison). The
    near-duplicates of each test document are excluded from both kinds of retrieval.

    losses_out: an .npz (no pickle) of every scored token's bits with and without retrieval and the
    neighbour ids fed, for analysis (bench/bench_retrieval_ceiling.py --losses reads it).

    nprobe, rerank (an ivfpq DB): override the values recorded with its index; knn.nprobe does the same for
    an ivfpq datastore."""
    if losses_out is not None and not str(losses_out).endswith(".npz"):
        raise RetroError(f"--losses-out {losses_out}: must name an .npz file")
    if k is not None and k < 1:
        raise RetroError(f"--k must be at least 1, not {k}")
    check_at_least("--batch-size", batch_size)
    check_at_least("--threads", threads, allow_none=True)
    if threads:
        torch.set_num_threads(threads)
    where = resolve_device(device)
    db = as_db(db)
    model_dir = resolve_model(model_dir, db)
    model, meta = load_model(model_dir, db)
    model.to(where)
    store = None
    if knn is not None:
        knn_lambda = parse_lambda("auto" if knn.lam is None else knn.lam)
        check_at_least("--knn-k", knn.k)
        check_at_least("--lambda-buckets", knn.buckets)
        if knn.temperature is not None and not knn.temperature > 0:
            raise RetroError("--knn-temperature: must be > 0")
        store = knn.datastore if isinstance(knn.datastore, Datastore) else Datastore(knn.datastore, knn.ef, knn.nprobe)
        store.check_matches(model_dir, db)
        exclude_near_duplicates = True  # the same exclusions for both kinds of retrieval
    model_k = k or model.config.num_neighbors
    k = max(model_k, DEFAULT_LEAKAGE_K if leakage else 0)
    k = min(k, db.num_chunks)
    candidates = min(db.num_chunks, CANDIDATES_PER_K * k) if exclude_near_duplicates else k
    started = time.perf_counter()
    search = NeighborOptions(k, candidates=candidates, nprobe=nprobe, rerank=rerank)
    with neighbors_of_inputs(db.path, inputs, work_dir, search, threads=threads,
                             progress=progress, text_field=text_field, device=str(where)) as (nb, test):
        retrieval_seconds = time.perf_counter() - started
        ids, excluded, knn_exclude = nb.ids[:, :k], None, None
        if exclude_near_duplicates:
            pairs, _ = near_duplicates(db, test, progress=progress)
            ids, replaced = drop_near_duplicate_neighbors(db, test, nb.ids, pairs, k)
            excluded = {"pairs": len(pairs), "neighbours_replaced": replaced}
            knn_exclude = {}
            for pair in pairs:
                knn_exclude.setdefault(int(pair.test_doc), set()).add(int(pair.db_doc))
            knn_exclude = {doc: np.array(sorted(docs), dtype=np.int64) for doc, docs in knn_exclude.items()}
        losses = chunk_losses(model, db, test, ids, batch_size, progress, k=model_k, knn=store,
                              knn_k=knn.k if knn else DEFAULT_KNN_K, knn_exclude=knn_exclude)
        r = compute_overlap(db, test, ids, progress=progress).r if leakage else None
        result = bpb_summary(losses, r)
        if losses_out is not None:
            write_losses(losses_out, losses, ids[:, :k], test, model_k)
        if store is not None:
            result["knn_lm"] = knn_comparison(losses, test, r, store, db, knn_lambda, knn.temperature, knn.buckets,
                                              retrieval_seconds)
        if stale_retrieval:
            stale = chunk_losses(model, db, test, stale_neighbor_ids(ids, test.chunk_doc), batch_size, progress,
                                 k=model_k, without_retrieval=False)
            result["bpb_stale_retrieval"] = float(stale.bits_retrieval.sum() / losses.bytes.sum())
            result["stale_retrieval_cost"] = result["bpb_stale_retrieval"] / result["bpb_retrieval"] - 1
        result.update(
            {
                "model": str(model_dir),
                "copy_head": model.copy_head is not None,
                # a retrofit without retrieval is its frozen base, exactly: "without" is the base alone
                "base": getattr(model, "base_info", None),
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


def write_losses(path: str | os.PathLike, losses: ChunkLosses, ids: np.ndarray, test: RetroDB, model_k: int) -> None:
    """Per-token bits [test chunks, m] with and without retrieval, bytes per chunk and the neighbour ids,
    written whole or not at all."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise RetroError(f"--losses-out {path}: is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial.npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, token_bits_retrieval=losses.token_bits_retrieval, token_bits_none=losses.token_bits_none,
                     bytes=losses.bytes, neighbor_ids=ids, chunk_doc=test.chunk_doc, model_k=np.int64(model_k))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_lambda(value: float | str) -> float | str:
    """--lambda: 'auto' or a number in [0, 1]."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise RetroError(f"--lambda: expected 'auto' or a number in [0, 1], got {value!r}") from None
    if not 0 <= lam <= 1:
        raise RetroError(f"--lambda: must be in [0, 1], got {lam}")
    return lam


KNN_METHODS = ("lm", "retro", "knn_lm", "retro_knn_lm")


def knn_comparison(losses: ChunkLosses, test: RetroDB, r: np.ndarray | None, knn: Datastore, db: RetroDB,
                   lam: float | str, temperature: float | None, buckets: int, retrieval_seconds: float) -> dict:
    """The LM alone, RETRO, kNN-LM (p_kNN queried with the plain decoder's state, mixed into p_LM) and
    RETRO + kNN-LM (queried with the RETRO pass's state, mixed into p_RETRO) on the same tokens, overall
    and at r(C) ≤ α, with what each costs to build, store and query.

    lam 'auto': T and λ (and λ per nearest-distance bucket) are tuned on the test documents
    is_dev_document picks, and every figure is reported on the others only."""
    n = len(losses.bytes)
    targets = losses.targets
    scored = targets >= 0
    if lam == "auto":
        dev_doc = np.array([is_dev_document(test.document_text(d)) for d in range(test.num_docs)], dtype=bool)
        dev_chunks = dev_doc[test.chunk_doc] if n else np.zeros(0, dtype=bool)
        if dev_doc.all() or not dev_doc.any():
            raise RetroError(f"--lambda auto tunes on about half of the {test.num_docs} test document(s) and "
                             "reports on the rest: give more documents, or a fixed --lambda")
    else:
        dev_chunks = np.zeros(n, dtype=bool)
    reported = ~dev_chunks
    bits = {"lm": losses.bits_none, "retro": losses.bits_retrieval}
    interpolations = {}
    for name, found, bits_lm in (("knn_lm", losses.knn_none, losses.token_bits_none),
                                 ("retro_knn_lm", losses.knn_retrieval, losses.token_bits_retrieval)):
        if lam == "auto":
            dev = scored & dev_chunks[:, None]
            chosen, bucketed = tune_interpolation(bits_lm[dev], found.dists[dev], found.values[dev], targets[dev],
                                                  buckets, temperature)
        else:
            chosen, bucketed = Interpolation(temperature or knn.temperature_scale, lam), None
        for label, interpolation in ((name, chosen), (f"{name}_bucketed", bucketed)):
            if interpolation is None:
                continue
            token_bits = bits_lm.copy()
            token_bits[scored] = interpolation.bits(bits_lm[scored], found.dists[scored], found.values[scored],
                                                    targets[scored])
            bits[label] = token_bits.sum(axis=1)
            interpolations[label] = interpolation.to_dict()

    def bpb(chunk_bits, mask):
        total = losses.bytes[mask].sum()
        return float(chunk_bits[mask].sum() / total) if total else None

    seconds = losses.seconds
    db_bytes = sum(f.stat().st_size for f in db.path.rglob("*") if f.is_file())
    store_bytes = knn.disk_bytes()
    built = lambda manifest, stages: sum(float(manifest["stages"][s].get("seconds", 0)) for s in stages)  # noqa: E731
    db_build, store_build = built(db.manifest, ("embed", "index")), built(knn.manifest, ("keys", "index"))
    costs = {
        "lm": (0, 0.0, seconds.get("forward_none", 0.0)),
        "retro": (db_bytes, db_build, retrieval_seconds + seconds.get("forward_retrieval", 0.0)),
        "knn_lm": (store_bytes, store_build, seconds.get("forward_none", 0.0) + seconds.get("knn_none", 0.0)),
        "retro_knn_lm": (db_bytes + store_bytes, db_build + store_build,
                         retrieval_seconds + seconds.get("forward_retrieval", 0.0) + seconds.get("knn_retrieval", 0.0)),
    }
    rows = []
    for name in bits:
        base = name.removesuffix("_bucketed")
        disk, build, query = costs[base]
        row = {"method": name, "bpb": bpb(bits[name], reported), "disk_bytes": disk, "build_seconds": round(build, 3),
               "eval_seconds": round(query, 3)}
        if r is not None:
            row["bpb_alpha"] = bpb(bits[name], reported & (r <= DEFAULT_ALPHA))
            row["curve"] = [{"alpha": a, "bpb": bpb(bits[name], reported & (r <= a))} for a in ALPHA_GRID]
        if name in interpolations:
            row["interpolation"] = interpolations[name]
        rows.append(row)
    order = {m: i for i, m in enumerate(KNN_METHODS)}
    rows.sort(key=lambda row: (order[row["method"].removesuffix("_bucketed")], row["method"].endswith("_bucketed")))
    return {
        "datastore": str(knn.path),
        "keys": knn.num_keys,
        "k": int(losses.knn_none.dists.shape[2]),
        "lambda": lam,
        "alpha": DEFAULT_ALPHA,
        "tuned_on_documents": int(dev_doc.sum()) if lam == "auto" else 0,
        "reported_documents": int(len(np.unique(test.chunk_doc[reported]))) if n else 0,
        "reported_chunks": int(reported.sum()),
        "methods": rows,
    }


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
