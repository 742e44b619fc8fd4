"""`retro train`: train a RETRO decoder on a DB with its precomputed neighbours.

The DB is both the training corpus and the retrieval DB; neighbours come from `retro neighbors DB
--input DB --out NB --exclude-same-doc`, which stores 4·k candidates per chunk. Each batch keeps, for every
chunk, the first k from no document of its window and no held-out document: the paper's rule (nothing
from the sequence's own document) applied to a window that spans documents. Padding inside a window (the
short last chunk of a document) is passed as a token mask: never predicted, never attended to. Batches
are a pure function of (seed, step), so `--resume` continues exactly: model, optimizer, schedule and data
position all come back from the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from retrocli import distributed
from retrocli.artifacts import check_outside
from retrocli.db import (
    DBLike,
    RetroDB,
    as_db,
)
from retrocli.device import peak_flops, resolve_device, resolve_precision
from retrocli.errors import RetroError
from retrocli.model import RetroConfig, RetroModel
from retrocli.model.checkpoint import (
    load_model,
    load_optimizer,
    load_saved_model,
    save_checkpoint,
    write_model_meta,
)
from retrocli.model.retrofit import build_retrofit, check_base_tokenizer
from retrocli.neighbor_arrays import open_neighbors
from retrocli.options import DEFAULT_TRAIN_K, TrainOptions, check_window_exclusion
from retrocli.overlap import compute_overlap
from retrocli.progress import NullProgress, Progress
from retrocli.sequences import chunk_rows, neighbor_rows, pad_id, stale_neighbor_ids


def lr_at(step: int, opts: TrainOptions) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio·lr at the last step."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


FOCUS_QUANTILE = 0.9  # --retrieval-focus draws from the top 10 % of windows by neighbour usefulness
COPY_SHIFT = 0.5  # --copy-curriculum neighbours start up to m/2 tokens before or after their chunk...
COPY_NOISE = 0.1  # ...and have this share of their tokens replaced by random ones


def next_chunk_overlap(db: RetroDB, neighbor_ids: np.ndarray) -> np.ndarray:
    """For each chunk u: r of chunk u+1 against the [N, F] of u's neighbours — how much of what CCA must
    predict after u is sitting in what it retrieved for u (0 at a document's last chunk)."""
    # r(C) of chunk c against the neighbours of chunk c-1 (chunk 0 has none), read back as score[c-1]
    shifted = np.vstack([np.full((1, neighbor_ids.shape[1]), -1, dtype=np.int64), neighbor_ids[:-1]])
    score = np.zeros(db.num_chunks)
    score[:-1] = compute_overlap(db, db, shifted).r[1:]
    same_doc = np.zeros(db.num_chunks, dtype=bool)
    same_doc[:-1] = db.chunk_doc[1:] == db.chunk_doc[:-1]
    return np.where(same_doc, score, 0.0)


def last_logged_loss(log_path: Path) -> float | None:
    """The loss of the last record in a run's train_log.jsonl, or None when there is none to read."""
    try:
        lines = log_path.read_text().splitlines()
        return float(json.loads(lines[-1])["loss"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class TrainingData:
    """Sequences of L consecutive DB chunks, excluding held-out documents, with their neighbours.

    With retrieval_focus > 0, that share of every batch comes from the windows (top 10 %) whose chunks'
    neighbours hold the most of the following chunk's text. Neighbours are still the ones retrieved
    from other documents; only the sampling of training windows changes. A small model trained uniformly
    on this corpus learned to ignore its neighbours (they rarely help); these windows are where reading
    them pays, which is what teaches chunked cross-attention to read.

    With copy_curriculum > 0, that share of chunks gets, in place of its first neighbour, a damaged copy
    of its own [C_u, C_u+1]: shifted by up to m/2 tokens (so matching must be by content, not position)
    with 10 % of tokens replaced at random (so it is a near-duplicate, not the answer). Such a neighbour
    holds the text to predict, which real neighbours here rarely do; copying from retrieved text has to be
    learned somewhere, and the other neighbours stay real, so the model also learns when not to copy.
    These chunks break the paper's same-document exclusion on purpose; 0 keeps to it.

    With stale_retrieval, chunk u reads the neighbours retrieved for chunk u−1 of its document (none for a
    document's first chunk), as `retro generate --stale-retrieval` delivers them.

    window_exclusion picks which documents of its window a chunk may not retrieve from (see
    window_neighbors): "all" of them, or "later": its own and those after it in the window."""

    def __init__(self, db: RetroDB, neighbor_ids: np.ndarray, seq_len: int, k: int, heldout_docs: set[int],
                 retrieval_focus: float = 0.0, copy_curriculum: float = 0.0, stale_retrieval: bool = False,
                 window_exclusion: str = "all"):
        m = db.chunk_size
        if seq_len % m:
            raise RetroError(f"--seq-len {seq_len} must be a multiple of the DB chunk size {m}")
        check_window_exclusion(window_exclusion)
        self.db, self.chunks, self.k, self.window_exclusion = db, seq_len // m, k, window_exclusion
        # reads_banned[u, v]: chunk u may not read the document of chunk v (any top-left block is the same
        # rule for a shorter window)
        full = np.ones((self.chunks, self.chunks), dtype=bool)
        self.reads_banned = np.triu(full) if window_exclusion == "later" else full
        self.pad = pad_id(db)
        self.tokens, self.real = chunk_rows(db, 0, db.num_chunks, self.pad)
        self.lengths = db.chunk_length
        self.candidates = neighbor_ids  # [N, C ≥ k], nearest first, own document already excluded
        self.stale = stale_retrieval
        if stale_retrieval:
            self.candidates = stale_neighbor_ids(np.asarray(neighbor_ids), db.chunk_doc)
        self.heldout_doc = np.zeros(db.num_docs + 1, dtype=bool)  # [-1] stays False: a missing neighbour
        self.heldout_doc[list(heldout_docs)] = True
        bad = self.heldout_doc[db.chunk_doc]
        # a start s is usable when chunks s..s+L-1 exist and none belongs to a held-out document
        window_bad = np.convolve(bad.astype(np.int64), np.ones(self.chunks, dtype=np.int64), mode="full")
        usable = np.arange(max(0, db.num_chunks - self.chunks + 1))
        self.starts = usable[window_bad[self.chunks - 1 : self.chunks - 1 + len(usable)] == 0]
        if len(self.starts) == 0:
            raise RetroError(f"{db.path}: no training sequence of {seq_len} tokens outside the held-out documents")
        self.heldout_chunks = int(bad.sum())
        if not 0 <= retrieval_focus <= 1:
            raise RetroError("--retrieval-focus: must be between 0 and 1")
        self.focus, self.focus_starts = retrieval_focus, self.starts
        if retrieval_focus > 0:
            # scored with each chunk's first k candidates outside held-out documents (its window aside)
            score = next_chunk_overlap(db, self.window_neighbors(np.arange(db.num_chunks)[:, None])[:, 0])
            window = np.convolve(score, np.ones(self.chunks), mode="full")[self.chunks - 1 :][self.starts]
            self.focus_starts = self.starts[window >= np.quantile(window, FOCUS_QUANTILE)]
        if not 0 <= copy_curriculum <= 1:
            raise RetroError("--copy-curriculum: must be between 0 and 1")
        self.copy, self.vocab_size = copy_curriculum, db.tokenizer.vocab_size

    def window_neighbors(self, rows: np.ndarray) -> np.ndarray:
        """Neighbour ids [B, L, k] for windows of DB chunk ids `rows` [B, L]: for each chunk the first k
        candidates from no held-out document and none of the window's documents it may not read. The paper
        excludes the sequence's own document; a window spanning documents A and B must not retrieve B's
        chunks for A's, since B's text comes later in the window. "all" bans every document of the window
        (as Megatron-LM can); "later" bans the chunk's own document and those after it, which is enough to
        keep the window's future out: B's chunks may read A, whose text the window has already shown.
        −1 where the candidates run out."""
        doc = self.db.chunk_doc
        cand = self.candidates[rows]  # [B, L, C]
        cand_doc = np.where(cand >= 0, doc[np.maximum(cand, 0)], -1)
        banned = (cand < 0) | self.heldout_doc[cand_doc]
        same = cand_doc[..., None] == doc[rows][:, None, None, :]  # [B, L, C, L]: from the v-th chunk's document
        length = rows.shape[1]
        banned |= (same & self.reads_banned[:length, None, :length]).any(-1)
        order = np.argsort(banned, axis=-1, kind="stable")[..., : self.k]
        picked = np.take_along_axis(cand, order, axis=-1)
        return np.where(np.take_along_axis(banned, order, axis=-1), -1, picked)

    def neighbor_fill(self, windows: int = 512) -> float:
        """Share of (chunk, slot) places of sampled training windows that get a real neighbour: below 1
        where the stored candidates ran out (store more with `retro neighbors --candidates`)."""
        rng = np.random.default_rng(0)
        starts = self.starts[rng.integers(0, len(self.starts), min(windows, len(self.starts)))]
        ids = self.window_neighbors(starts[:, None] + np.arange(self.chunks)[None, :])
        return float((ids >= 0).mean())

    def batch_rows(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """DB chunk ids [batch_size, L] of the sequences of training step `step` (a pure function)."""
        rng = np.random.default_rng([seed, step])
        starts = self.starts[rng.integers(0, len(self.starts), batch_size)]
        if self.focus > 0:
            focused = int(round(self.focus * batch_size))
            starts[:focused] = self.focus_starts[rng.integers(0, len(self.focus_starts), focused)]
        return starts[:, None] + np.arange(self.chunks)[None, :]

    def batch(self, seed: int, step: int, batch_size: int, part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, ...]:
        """(tokens, targets, neighbours, real-token mask) of step `step`; `part` = (rank, ranks) keeps that
        rank's contiguous slice of the global batch, drawn exactly as a single process draws it."""
        rows = self.batch_rows(seed, step, batch_size)
        copies = []
        if self.copy > 0:
            # its own stream, so switching the curriculum on or off leaves the windows drawn unchanged;
            # drawn for the global batch so that every rank sees the copies one process would
            rng = np.random.default_rng([seed, step, 1])
            copies = [(b, u, self.copy_neighbor(int(rows[b, u]), rng))
                      for b, u in zip(*np.nonzero(rng.random(rows.shape) < self.copy))]
        rank, ranks = part
        share = batch_size // ranks
        lo = rank * share
        rows = rows[lo : lo + share]
        tokens, real = self.tokens[rows].reshape(share, -1), self.real[rows].reshape(share, -1)
        targets = np.full_like(tokens, -1)
        ok = real[:, :-1] & real[:, 1:]  # predict only real tokens from real tokens
        targets[:, :-1] = np.where(ok, tokens[:, 1:], -1)
        neighbors = neighbor_rows(self.db, self.window_neighbors(rows), self.pad, self.tokens, self.lengths)
        for b, u, copy in copies:
            if lo <= b < lo + share:
                neighbors[b - lo, u, 0] = copy
        return torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(neighbors), torch.from_numpy(real)

    def copy_neighbor(self, chunk: int, rng: np.random.Generator) -> np.ndarray:
        """2m tokens of chunk's own document from about its start (see the class docstring)."""
        m, doc = self.db.chunk_size, self.db.chunk_doc
        around = [c for c in range(chunk - 1, chunk + 3) if 0 <= c < len(doc) and doc[c] == doc[chunk]]
        stream = np.concatenate([self.tokens[c, : self.lengths[c]] for c in around])
        own_start = sum(int(self.lengths[c]) for c in around if c < chunk)
        shift = int(rng.integers(-int(m * COPY_SHIFT), int(m * COPY_SHIFT) + 1))
        start = min(max(own_start + shift, 0), len(stream) - 1)
        out = np.full(2 * m, self.pad, dtype=np.int64)
        piece = stream[start : start + 2 * m].astype(np.int64)
        noisy = rng.random(len(piece)) < COPY_NOISE
        piece[noisy] = rng.integers(0, self.vocab_size, int(noisy.sum()))
        out[: len(piece)] = piece
        return out


def load_heldout(db: RetroDB, path: str | os.PathLike | None) -> set[int]:
    """Held-out documents: a file with one DB doc id, external id or source path per line."""
    if path is None:
        return set()
    try:
        wanted = {line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()}
    except OSError as err:
        raise RetroError(f"{path}: cannot read held-out list ({err.strerror})") from None
    found = set()
    for doc in range(db.num_docs):
        # any of the names a user may have copied: doc number, id, file:line (relative or absolute), source
        keys = {str(doc), db.source(doc), db.location(doc), db.location(doc, relative=False)}
        ext = db.external_id(doc)
        if ext:
            keys |= {ext, f"{db.location(doc, relative=False)} (id {ext})"}  # the older source spelling
        if keys & wanted:
            found.add(doc)
    return found


def load_initial_weights(model, source: str | os.PathLike, db: RetroDB) -> dict:
    """Copy a saved model's weights into `model` (same names and shapes); returns what was kept fresh."""
    source_model, meta = load_model(source, db)  # refuses another tokenizer or chunk size
    theirs = source_model.state_dict()
    ours = model.state_dict()
    unexpected = sorted(set(theirs) - set(ours))
    if unexpected:
        raise RetroError(f"--init-from {source}: has parameters this config lacks ({', '.join(unexpected[:3])})")
    for name, tensor in theirs.items():
        if tensor.shape != ours[name].shape:
            raise RetroError(
                f"--init-from {source}: {name} is {list(tensor.shape)} there, {list(ours[name].shape)} in --config"
            )
    fresh = sorted(set(ours) - set(theirs))
    model.load_state_dict(theirs, strict=False)
    return {"model": str(source), "steps": meta.get("steps"), "tokens_seen": meta.get("tokens_seen"),
            "fresh_parameters": fresh}


def build_config(name: str, vocab_size: int, chunk_size: int, seq_len: int, k: int, pad: int):
    if name in ("small", "tiny"):
        config = getattr(RetroConfig, name)(vocab_size)
    else:
        try:
            config = RetroConfig.from_dict(json.loads(Path(name).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise RetroError(
                f"--config {name}: not a preset (small, tiny) nor a readable config.json ({err})"
            ) from None
    config.vocab_size = vocab_size
    config.chunk_size = chunk_size
    config.seq_len = seq_len
    config.num_neighbors = k
    config.neighbor_len = 2 * chunk_size
    config.pad_token_id = pad
    config.__post_init__()  # re-validate after the overrides
    return config


@distributed.leaves_the_group
def train(
    db: DBLike,
    neighbors_path: str | os.PathLike,
    out: str | os.PathLike,
    options: TrainOptions | None = None,
    heldout: str | os.PathLike | None = None,
    resume: bool = False,
    k: int = DEFAULT_TRAIN_K,
    progress: Progress | None = None,
    stop_after: int | None = None,
    init_from: str | os.PathLike | None = None,
    device: str = "auto",
) -> dict:
    """Train and save the model in `out`. `init_from` starts from a saved model's weights (fine-tuning:
    new schedule and optimizer; parameters the saved model lacks, such as smeared CCA keys, keep their
    fresh init). `stop_after` ends this run after that step's checkpoint, as an interruption would (for
    tests of --resume). `device` trains there (auto: a CUDA GPU if torch sees one); a checkpoint resumes on
    any device.

    Under torchrun (or `distributed.launch(train, N, …)`) each of the WORLD_SIZE ranks trains its slice of
    every global batch with DistributedDataParallel; only rank 0 writes. The loss is the mean over the
    global batch's target tokens, so N ranks take the steps one process takes with the same batch."""
    opts = options or TrainOptions()
    ranks = distributed.ranks_from_env()
    where = resolve_device(device)
    progress = (progress or NullProgress()) if ranks.is_main else NullProgress()
    out = Path(out)
    db = as_db(db)
    check_outside(out, db.path, "--out")
    check_outside(out, neighbors_path, "--out", "the neighbours")
    nb = open_neighbors(neighbors_path)
    settings = nb.manifest["settings"]
    if settings["db_id"] != db.manifest["db_id"]:
        raise RetroError(f"{neighbors_path}: neighbours were not computed for every chunk of {db.path}")
    if settings.get("db_version", 1) != db.version or nb.ids.shape[0] != db.num_chunks:
        raise RetroError(f"{neighbors_path}: computed on version {settings.get('db_version', 1)} of {db.path}, which "
                         f"is now at version {db.version} (documents were added or removed); recompute them: "
                         f"`retro neighbors {db.path} --input {db.path} --out NEW --exclude-same-doc`")
    if settings.get("db_content", db.content_id) != db.content_id:
        raise RetroError(f"{neighbors_path}: computed on another copy of {db.path} (version {db.version}, other "
                         f"content); recompute them: `retro neighbors {db.path} --input {db.path} --out NEW "
                         "--exclude-same-doc`")
    if not settings.get("exclude_same_doc"):
        raise RetroError(f"{neighbors_path}: computed without --exclude-same-doc; training would see its own text")
    if nb.ids.shape[1] < k:
        raise RetroError(f"{neighbors_path}: holds {nb.ids.shape[1]} neighbours per chunk, --k is {k}")
    opts.check()
    where = distributed.start(ranks, where)
    precision = resolve_precision(opts.precision, device=where)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    ckpt = out / "checkpoint"
    if out.exists() and any(out.iterdir()) and not resume:
        raise RetroError(f"{out}: exists; pass --resume to continue its checkpoint, or choose a new --out")
    if resume and not (ckpt / "state.json").exists():
        raise RetroError(f"{out}: no checkpoint to resume from")
    if resume and init_from:
        raise RetroError("--init-from starts a new run; --resume continues one: pass only one")
    if opts.base and init_from:
        raise RetroError("--init-from: a retrofit starts from its --base; pass only one")

    heldout_docs = load_heldout(db, heldout) | set(db.removed_docs)  # removed documents are never trained on
    data = TrainingData(db, nb.ids, opts.seq_len, k, heldout_docs, opts.retrieval_focus, opts.copy_curriculum,
                        opts.stale_retrieval, opts.window_exclusion)
    fill = data.neighbor_fill()
    torch.manual_seed(opts.seed)
    if resume:
        model = load_saved_model(ckpt, device=where)
        state = json.loads((ckpt / "state.json").read_text())
        # --steps, --threads and the sampling options may change on resume; the rest is the checkpoint's
        opts = TrainOptions(**{**state["options"], "steps": opts.steps, "threads": opts.threads,
                               "retrieval_focus": opts.retrieval_focus, "copy_curriculum": opts.copy_curriculum,
                               "compile": opts.compile})
        if opts.stale_retrieval != data.stale:
            raise RetroError(f"{out}: the checkpoint was trained {'with' if opts.stale_retrieval else 'without'} "
                             "--stale-retrieval; resume it the same way")
        if opts.window_exclusion != data.window_exclusion:
            raise RetroError(f"{out}: the checkpoint was trained with --window-exclusion {opts.window_exclusion}; "
                             "resume it the same way")
    elif opts.base:
        model = build_retrofit(opts.base, db.chunk_size, opts.seq_len, k, data.pad, db.tokenizer.vocab_size,
                               cca_start=opts.cca_start, cca_every=opts.cca_every, encoder_width=opts.encoder_width)
        check_base_tokenizer(opts.base, model.base_info, db.tokenizer)
        state = {"step": 0, "tokens_seen": 0, "options": asdict(opts), "seconds": 0.0}
    else:
        model = RetroModel(build_config(opts.config, db.tokenizer.vocab_size, db.chunk_size, opts.seq_len, k, data.pad))
        state = {"step": 0, "tokens_seen": 0, "options": asdict(opts), "seconds": 0.0}
        if init_from:
            state["init_from"] = load_initial_weights(model, init_from, db)
    if opts.batch_size % ranks.world:  # checked after --resume, whose checkpoint sets the batch size
        raise RetroError(f"--batch-size {opts.batch_size}: must be a multiple of the {ranks.world} ranks")
    model.to(where)  # before the optimizer, whose state then lives on the device too
    optimizer = model.configure_optimizer(opts.weight_decay, opts.lr)
    if resume:
        load_optimizer(ckpt, optimizer)
    distributed.barrier(ranks)  # every rank has checked --out before rank 0 creates it
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)  # only now: a refused config or --init-from leaves no directory
    log_path = out / "train_log.jsonl"
    model.train()
    net = model
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[where.index] if where.type == "cuda" else None)
    if opts.compile:
        net = torch.compile(net)
    flops_per_token, count_flops = None, ranks.is_main  # counted once, on the first batch; rank 0 reports
    task = progress.start("train", total=opts.steps, unit="steps", completed=state["step"])
    started, window_tokens, window_start = time.time(), 0, time.time()
    autocast = torch.autocast(where.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    on_gpu = where.type == "cuda"
    loss_value = None  # stays None when nothing is left to train (a --resume of a finished run)
    while state["step"] < opts.steps:
        step = state["step"]
        # Built on the CPU (a pure function of seed and step), then copied over; pinned for async copies.
        batch = data.batch(opts.seed, step, opts.batch_size, part=(ranks.rank, ranks.world))
        local_tokens = int((batch[1] >= 0).sum())
        idx, targets, neighbors, real = (t.pin_memory().to(where, non_blocking=True) if on_gpu else t
                                         for t in batch)
        if count_flops:
            flops_per_token = count_flops_per_token(model, autocast, idx, neighbors, targets, real, local_tokens)
            count_flops = False
        (tokens,) = distributed.all_sum([local_tokens], ranks, where)
        lr = lr_at(step, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            _, loss = net(idx, neighbors=neighbors, targets=targets, need_logits=False, token_mask=real)
        optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; weighting each rank's mean by its share of the global batch's
        # target tokens makes that average the gradient of the global mean, as in one process
        (loss * (local_tokens * ranks.world / max(tokens, 1)) if ranks.active else loss).backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip))
        optimizer.step()
        (loss_sum,) = distributed.all_sum([float(loss.detach()) * local_tokens], ranks, where)
        loss_value = loss_sum / max(tokens, 1) if ranks.active else float(loss.detach())
        if not math.isfinite(loss_value):
            raise RetroError(f"loss became {loss_value} at step {step}; lower --lr")
        tokens = int(tokens)
        state["step"] += 1
        state["tokens_seen"] += tokens
        window_tokens += tokens
        task.advance(1)
        if ranks.is_main and (state["step"] % opts.log_every == 0 or state["step"] == opts.steps):
            now = time.time()
            record = {
                "step": state["step"],
                "loss": round(loss_value, 4),
                "lr": lr,
                "grad_norm": round(grad_norm, 3),
                "tokens_seen": state["tokens_seen"],
                "tokens_per_second": round(window_tokens / max(now - window_start, 1e-9), 1),
            }
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            window_tokens, window_start = 0, now
            progress_note = getattr(task, "note", None)
            if progress_note:
                progress_note(f"loss {loss_value:.3f} · {record['tokens_per_second']:.0f} tok/s")
        if state["step"] % opts.checkpoint_every == 0 or state["step"] == opts.steps:
            state["seconds"] = round(state["seconds"] + time.time() - started, 2)
            started = time.time()
            if ranks.is_main:
                save_checkpoint(ckpt, model, optimizer, state)
            if stop_after is not None and state["step"] >= stop_after:
                break
    task.finish()
    if ranks.is_main:
        model.save_pretrained(out)
        write_model_meta(
            out,
            db,
            {
                "steps": state["step"],
                "tokens_seen": state["tokens_seen"],
                "precision": precision,
                "ranks": ranks.world,
                "heldout_documents": len(heldout_docs),
                "neighbor_fill": round(fill, 4),
                "parameters": model.num_parameters(),
                **retrofit_meta(model),
                "stale_retrieval": opts.stale_retrieval,
                "window_exclusion": opts.window_exclusion,
                **({"init_from": state["init_from"]} if "init_from" in state else {}),
            },
        )
    distributed.barrier(ranks)  # no rank returns before the model is on disk
    if loss_value is None:
        loss_value = last_logged_loss(log_path)
    tokens_per_second = state["tokens_seen"] / max(state["seconds"], 1e-9)
    model_flops = (flops_per_token or 0) * tokens_per_second
    peak = peak_flops(where, precision)
    return {
        "out": str(out),
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "final_loss": loss_value,
        "seconds": state["seconds"],
        "tokens_per_second": round(tokens_per_second, 1),
        "parameters": model.num_parameters(),
        **retrofit_meta(model),
        "precision": precision,
        "device": str(where) if not ranks.active else f"{ranks.world}× {where.type}",
        "ranks": ranks.world,
        "compiled": opts.compile,
        "neighbor_fill": fill,
        "flops_per_token": flops_per_token,
        "model_flops_per_second": model_flops,
        # model FLOPs achieved against the peak of all ranks' devices together (None where not known)
        "mfu": model_flops / (peak * ranks.world) if peak and flops_per_token else None,
    }


def retrofit_meta(model) -> dict:
    """A retrofit's base and the share of its weights that trained (nothing for a RETRO model)."""
    base = getattr(model, "base_info", None)
    if base is None:
        return {}
    trainable = model.trainable_parameters()
    return {"base": base, "trainable_parameters": trainable,
            "trainable_share": round(trainable / model.num_parameters(), 4)}


def count_flops_per_token(model, autocast, idx, neighbors, targets, real, tokens: int) -> float | None:
    """FLOPs of one training step (forward and backward, matmuls and attention, as torch's FLOP counter
    sees them) per target token, measured on the first batch with the unwrapped model; nothing is kept."""
    from torch.utils.flop_counter import FlopCounterMode

    if tokens == 0:
        return None
    _count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        _, loss = model(idx, neighbors=neighbors, targets=targets, need_logits=False, token_mask=real)
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / tokens


def _count_cpu_attention() -> None:
    """torch's FLOP counter has formulas for the CUDA attention kernels but not for the CPU one, which it
    would count as 0; give the CPU kernel (and its backward) the same formulas."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(forward, get_raw=True)(
            lambda query, key, value, *args, out_val=None, **kwargs:
            flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape))
    if backward is not None and backward not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(backward, get_raw=True)(
            lambda grad_out, query, key, value, *args, out_val=None, **kwargs:
            flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape))
