"""`retro chunk`: tokenize a corpus with the LM tokenizer and cut it into fixed-size chunks.

Chunks never cross a document boundary; a document's last chunk may be short. The DB is written in a
sibling `<out>.partial` directory and renamed into place at the very end, so a DB that exists at `out`
is always complete. Memory stays bounded: documents are tokenized in batches and flushed in blocks.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zarr

from retrocli import __version__
from retrocli.corpus import (
    SUPPORTED,
    CorpusOptions,
    CorpusStats,
    describe_paths,
    expand_inputs,
    iter_documents,
)
from retrocli.db import (
    BUILT_FORMAT_VERSION,
    CHUNK_ARRAYS,
    DOCS_PER_ZARR_CHUNK,
    FORMAT_NAME,
    MANIFEST,
    ROWS_PER_ZARR_CHUNK,
    STORE,
    TOKENIZER_FILE,
    RetroDB,
    check_outside,
    record_stage_arrays,
    remove_db_dir,
    write_json_atomic,
)
from retrocli.errors import RetroError
from retrocli.lock import holds_writer_lock
from retrocli.options import AUTO_ID_FIELD, ChunkOptions
from retrocli.progress import NullProgress, Progress
from retrocli.tokenizer import LoadedTokenizer, load_tokenizer

TOKENIZE_BATCH_CHARS = 4_000_000  # text handed to the Rust tokenizer at once (it parallelises inside)
# A longer document is tokenized in windows of about this many characters, cut where whitespace meets a
# non-space character: a byte-level BPE pre-tokenizer splits there anyway, so the ids are unchanged, and
# the tokenizer's memory (offsets, words: ~100 bytes a character) no longer grows with the document.
LONG_DOC_WINDOW = 1_000_000


_CUT = re.compile(r"\s(?=\S)")  # the last whitespace character of a run, followed by a word


def whitespace_windows(text: str, size: int = LONG_DOC_WINDOW) -> list[str]:
    """`text` cut into pieces of at most about `size` characters, each cut just before the last whitespace
    character of a run that a non-space character follows (so every piece after the first starts with
    the whitespace that belongs to the next word). A stretch of `size` characters with no such place is
    cut hard: tokens can then differ at that one cut, but memory stays bounded."""
    pieces, start = [], 0
    while len(text) - start > size:
        window = text[start + size // 2 : start + size]
        cuts = [match.start() for match in _CUT.finditer(window)]
        cut = start + size // 2 + cuts[-1] if cuts else start + size
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_documents(tokenizer: LoadedTokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text; long ones in whitespace windows, a few windows at a time."""
    out: list[np.ndarray | None] = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= LONG_DOC_WINDOW]
    for i, ids in zip(short, tokenizer.encode_batch([texts[i] for i in short])):
        out[i] = np.asarray(ids, dtype=np.int64)
    for i in (i for i, t in enumerate(texts) if len(t) > LONG_DOC_WINDOW):
        # one window at a time, ids kept as int32: memory is the text plus 4 bytes a token
        parts = [np.asarray(tokenizer.encode_batch([piece])[0], dtype=np.int32)
                 for piece in whitespace_windows(texts[i], LONG_DOC_WINDOW)]
        out[i] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return out


class _GrowingArray:
    """Append rows to a zarr array in whole zarr chunks, so writes are aligned and memory bounded."""

    def __init__(self, array: zarr.Array, rows_per_flush: int):
        self.array = array
        self.rows_per_flush = rows_per_flush
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.written = 0

    def append(self, rows: np.ndarray) -> None:
        if len(rows):
            self.pending.append(rows)
            self.pending_rows += len(rows)
        if self.pending_rows >= self.rows_per_flush:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        data = np.concatenate(self.pending)
        cut = len(data) if final else (len(data) // self.rows_per_flush) * self.rows_per_flush
        head, tail = data[:cut], data[cut:]
        if len(head):
            new_len = self.written + len(head)
            self.array.resize((new_len, *self.array.shape[1:]))
            self.array[self.written : new_len] = head
            self.written = new_len
        self.pending = [tail] if len(tail) else []
        self.pending_rows = len(tail)

    def close(self) -> None:
        self._flush(final=True)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _split_into_chunks(ids: np.ndarray, chunk_size: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(ids, dtype=dtype)
    count = -(-len(arr) // chunk_size)
    padded = np.zeros(count * chunk_size, dtype=dtype)
    padded[: len(arr)] = arr
    lengths = np.full(count, chunk_size, dtype=np.int64)
    lengths[-1] = len(arr) - (count - 1) * chunk_size
    return padded.reshape(count, chunk_size), lengths


@holds_writer_lock("retro chunk", "out")
def chunk_corpus(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    options: ChunkOptions | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> RetroDB:
    """Chunk `inputs` into a new DB at `out` and return it opened."""
    options = options or ChunkOptions()
    progress = progress or NullProgress()
    out = Path(out)
    if out.name in ("", ".", ".."):  # `--out .`: the sibling .partial needs a real directory name
        out = Path(os.path.abspath(out))
    if options.chunk_size < 1 or options.chunk_size > 4096:
        raise RetroError("--chunk-size: must be between 1 and 4096")
    for path in inputs:
        check_outside(out, path, "--out", "the input", may_be_inside=True)
    if out.is_symlink():
        raise RetroError(f"--out {out}: is a symbolic link; pass the directory it points to")
    if out.exists() and not overwrite:
        raise RetroError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and not _is_replaceable(out):
        # Checked before any work, so a refusal costs nothing and leaves no <out>.partial behind.
        raise RetroError(f"{out}: exists and is not a retro DB; refusing to overwrite it")
    tokenizer = load_tokenizer(options.tokenizer)
    corpus_opts = CorpusOptions(options.text_field, options.id_field, options.strict, options.allow_duplicates)

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # an earlier run died; chunking restarts (it is the cheap stage)
    partial.mkdir(parents=True)
    started = time.time()
    try:
        stats, counts = _write_chunks(inputs, partial, tokenizer, options, corpus_opts, progress)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": BUILT_FORMAT_VERSION,
            "db_id": uuid.uuid4().hex,
            "created_by": f"retrocli {__version__}",
            "tokenizer": {
                "name": tokenizer.name,
                "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
            },
            "chunk_size": options.chunk_size,
            "counts": counts,
            "stages": {
                "chunk": {
                    "status": "complete",
                    "seconds": round(time.time() - started, 3),
                    "inputs": [str(Path(p).absolute()) for p in inputs],
                    "options": asdict(options),
                    "corpus": stats.to_dict(),
                    "files": record_stage_arrays(partial / STORE, CHUNK_ARRAYS),
                }
            },
        }
        (partial / TOKENIZER_FILE).write_text(tokenizer.json, encoding="utf-8")
        write_json_atomic(partial / MANIFEST, manifest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        if out.exists():
            remove_db_dir(out)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return RetroDB(out)


def _is_replaceable(path: Path) -> bool:
    """What remove_db_dir() will delete: a directory holding a DB manifest, or an empty directory."""
    return path.is_dir() and ((path / MANIFEST).exists() or not any(path.iterdir()))


def _write_chunks(
    inputs, dest: Path, tokenizer: LoadedTokenizer, options: ChunkOptions, corpus_opts, progress
):
    m = options.chunk_size
    dtype = _token_dtype(tokenizer.vocab_size)
    len_dtype = np.uint8 if m <= 255 else np.uint16
    root = zarr.open_group(str(dest / STORE), mode="w")

    def array(name, shape, dt, chunks, fill=0):
        return root.create_array(name, shape=shape, dtype=dt, chunks=chunks, fill_value=fill)

    def per_chunk(name, dt, width=()):
        rows = ROWS_PER_ZARR_CHUNK
        return _GrowingArray(array(name, (0, *width), dt, (rows, *width)), rows)

    def per_doc(name, dt, fill=0):
        rows = DOCS_PER_ZARR_CHUNK
        return _GrowingArray(array(name, (0,), dt, (rows,), fill), rows)

    tokens = per_chunk("chunks/tokens", dtype, (m,))
    lengths = per_chunk("chunks/length", len_dtype)
    chunk_doc = per_chunk("chunks/doc", np.int64)
    offsets = per_doc("docs/chunk_offset", np.int64)
    doc_file = per_doc("docs/file", np.int32)
    doc_pos = per_doc("docs/position", np.int64)
    ext_ids = per_doc("docs/external_id", str, "") if options.id_field != "" else None
    any_id = False

    files = expand_inputs(inputs, options.allow_duplicates)  # validate every path before any progress is shown
    if not files:  # directories with no corpus files: say so about the inputs, not an empty list
        raise RetroError(f"empty corpus: no {'/'.join(SUPPORTED)} files in {describe_paths(inputs)}")
    stats = CorpusStats()
    file_index: dict[str, int] = {}
    n_docs = n_chunks = n_tokens = 0
    offsets.append(np.zeros(1, dtype=np.int64))
    task = progress.start("chunk", total=sum(f.stat().st_size for f in files) // 1024 or 1, unit="KB read")
    reported_kb = 0

    def flush(batch):
        nonlocal n_docs, n_chunks, n_tokens, reported_kb, any_id
        encoded = encode_documents(tokenizer, [doc.text for doc in batch])
        doc_offsets = np.empty(len(batch), dtype=np.int64)
        for i, ids in enumerate(encoded):
            rows, lens = _split_into_chunks(ids, m, dtype)
            tokens.append(rows)
            lengths.append(lens.astype(len_dtype))
            chunk_doc.append(np.full(len(rows), n_docs + i, dtype=np.int64))
            n_chunks += len(rows)
            n_tokens += len(ids)
            doc_offsets[i] = n_chunks
        offsets.append(doc_offsets)
        doc_file.append(np.array([file_index.setdefault(d.path, len(file_index)) for d in batch], np.int32))
        doc_pos.append(np.array([d.position for d in batch], np.int64))
        if ext_ids is not None:
            ext_ids.append(np.array([d.external_id for d in batch], dtype=object).astype(str))
            any_id = any_id or any(d.external_id for d in batch)
        n_docs += len(batch)
        task.advance(stats.bytes_read // 1024 - reported_kb)
        reported_kb = stats.bytes_read // 1024

    batch, batch_chars = [], 0
    for doc in iter_documents(files, corpus_opts, stats):
        batch.append(doc)
        batch_chars += len(doc.text)
        if batch_chars >= TOKENIZE_BATCH_CHARS:
            flush(batch)
            batch, batch_chars = [], 0
    if batch:
        flush(batch)
    for growing in (tokens, lengths, chunk_doc, offsets, doc_file, doc_pos) + ((ext_ids,) if ext_ids else ()):
        growing.close()
    if ext_ids is not None and options.id_field is None and not any_id:
        del root["docs/external_id"]  # automatic ids, and no record had one: the DB has no ids
    elif ext_ids is not None:
        stats.id_field = options.id_field or AUTO_ID_FIELD
    paths = list(file_index)
    files = root.create_array(
        "files/path", shape=(len(paths),), dtype=str, chunks=(max(1, min(len(paths), 65536)),)
    )
    files[:] = np.array(paths, dtype=object).astype(str)
    task.finish()
    return stats, {"documents": n_docs, "chunks": n_chunks, "tokens": n_tokens, "files": stats.files}
