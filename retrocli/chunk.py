"""`retro chunk`: tokenize a corpus with the LM tokenizer and cut it into fixed-size chunks.

Chunks never cross a document boundary; a document's last chunk may be short. The DB is written in its
staging directory (retrocli.staging) and renamed into place at the very end, so a DB that exists at `out`
is always complete. Memory stays bounded: documents are tokenized in batches and flushed in blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zarr

from retrocli import __version__
from retrocli.artifacts import check_outside, write_json_atomic
from retrocli.checksums import file_sha256
from retrocli.cluster import dask_client, run_blocks
from retrocli.corpus import (
    SUPPORTED,
    CorpusOptions,
    CorpusStats,
    Piece,
    check_not_empty,
    describe_paths,
    expand_inputs,
    iter_documents,
    iter_piece_documents,
    plan_pieces,
    record_name,
    source_name,
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
    record_stage_arrays,
)
from retrocli.errors import RetroError
from retrocli.lock import holds_writer_lock
from retrocli.options import AUTO_ID_FIELD, ChunkOptions
from retrocli.progress import NullProgress, Progress
from retrocli.staging import check_target, staged
from retrocli.storage import CACHE_ENV, fetch_input, fetched_origin
from retrocli.tokenizer import LoadedTokenizer, load_tokenizer, tokenizer_from_json

TOKENIZE_BATCH_CHARS = 4_000_000  # text handed to the Rust tokenizer at once (it parallelises inside)
# A longer document is tokenized in windows of about this many characters, cut where whitespace meets a
# non-space character: a byte-level BPE pre-tokenizer splits there anyway, so the ids are unchanged, and
# the tokenizer's memory (offsets, words: ~100 bytes a character) no longer grows with the document.
LONG_DOC_WINDOW = 1_000_000
# With --dask: the corpus is cut into pieces of about this size, each one task (a file, a line range of an
# uncompressed JSONL file, or a Parquet row group), so one large file is still spread over the workers.
PIECE_BYTES = 64 << 20
PIECES_DIR = "pieces"
SOURCE_ARRAYS = ("files/sha256",)  # recorded with the chunk stage's arrays; absent from DBs built before it


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
    dask=None,
    piece_bytes: int = PIECE_BYTES,
) -> RetroDB:
    """Chunk `inputs` into a new DB at `out` and return it opened. With `dask` (an address, 'local:N' or a
    distributed.Client) the corpus is cut into pieces of about `piece_bytes` (files, line ranges of JSONL,
    Parquet row groups) tokenized as tasks; the DB is the same as one process writes."""
    options = options or ChunkOptions()
    progress = progress or NullProgress()
    out = Path(out)
    if out.name in ("", ".", ".."):  # `--out .`: the staging directory beside it needs a real name
        out = Path(os.path.abspath(out))
    if options.chunk_size < 1 or options.chunk_size > 4096:
        raise RetroError("--chunk-size: must be between 1 and 4096")
    for path in inputs:
        check_outside(out, path, "--out", "the input", may_be_inside=True)
    # Checked before any work, so a refusal costs nothing and leaves no staging directory behind.
    check_target(out, overwrite)
    tokenizer = load_tokenizer(options.tokenizer)
    corpus_opts = CorpusOptions(options.text_field, options.id_field, options.strict, options.allow_duplicates)

    started = time.time()
    # An earlier run that died left at most its own staging directory: chunking restarts (the cheap stage).
    with staged(out, "retro chunk", inputs) as partial:
        if dask is None:
            stats, counts = _write_chunks(inputs, partial, tokenizer, options, corpus_opts, progress)
        else:
            with dask_client(dask) as client:
                stats, counts = _write_chunks_on_dask(inputs, partial, tokenizer, options, corpus_opts, progress,
                                                      client, piece_bytes)
        write_source_digests(partial / STORE, expand_inputs(inputs, options.allow_duplicates))
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
                    "files": record_stage_arrays(partial / STORE, CHUNK_ARRAYS + SOURCE_ARRAYS),
                }
            },
        }
        (partial / TOKENIZER_FILE).write_text(tokenizer.json, encoding="utf-8")
        write_json_atomic(partial / MANIFEST, manifest)
    return RetroDB(out)


def source_identity(path: str | os.PathLike) -> str:
    """What names a corpus file whatever path it was given by: the URL it was fetched from, or its path
    resolved (symbolic links, `..`)."""
    return source_name(path) if fetched_origin(path) else os.path.realpath(path)


def write_source_digests(store: Path, files: Sequence[Path]) -> None:
    """files/sha256, beside files/path: the content of each file a DB's documents came from, so that
    `retro add` knows a file again under any other name."""
    root = zarr.open_group(str(store), mode="a")
    local = {record_name(f): f for f in files}
    names = [str(name) for name in root["files/path"][:]]
    digests = [file_sha256(local[name]) if name in local else "" for name in names]
    array = root.create_array("files/sha256", shape=(len(names),), dtype=str,
                              chunks=(max(1, min(len(names), 65536)),))
    array[:] = np.array(digests, dtype=object).astype(str)


class _ChunkArrays:
    """The chunk stage's arrays in a zarr group, grown as documents arrive (memory bounded)."""

    def __init__(self, root, chunk_size: int, vocab_size: int, with_ids: bool):
        self.root, self.m = root, chunk_size
        self.dtype = _token_dtype(vocab_size)
        self.len_dtype = np.uint8 if chunk_size <= 255 else np.uint16

        def array(name, shape, dt, chunks, fill=0):
            return root.create_array(name, shape=shape, dtype=dt, chunks=chunks, fill_value=fill)

        def per_chunk(name, dt, width=()):
            return _GrowingArray(array(name, (0, *width), dt, (ROWS_PER_ZARR_CHUNK, *width)), ROWS_PER_ZARR_CHUNK)

        def per_doc(name, dt, fill=0):
            return _GrowingArray(array(name, (0,), dt, (DOCS_PER_ZARR_CHUNK,), fill), DOCS_PER_ZARR_CHUNK)

        self.tokens = per_chunk("chunks/tokens", self.dtype, (chunk_size,))
        self.lengths = per_chunk("chunks/length", self.len_dtype)
        self.chunk_doc = per_chunk("chunks/doc", np.int64)
        self.offsets = per_doc("docs/chunk_offset", np.int64)
        self.doc_file = per_doc("docs/file", np.int32)
        self.doc_pos = per_doc("docs/position", np.int64)
        self.ext_ids = per_doc("docs/external_id", str, "") if with_ids else None
        self.offsets.append(np.zeros(1, dtype=np.int64))
        self.file_index: dict[str, int] = {}
        self.any_id = False
        self.n_docs = self.n_chunks = self.n_tokens = 0

    def add(self, encoded: list[np.ndarray], paths: list[str], positions: list[int], ids: list[str]) -> None:
        """Documents, tokenized, with where they came from."""
        doc_offsets = np.empty(len(encoded), dtype=np.int64)
        for i, token_ids in enumerate(encoded):
            rows, lens = _split_into_chunks(token_ids, self.m, self.dtype)
            self.tokens.append(rows)
            self.lengths.append(lens.astype(self.len_dtype))
            self.chunk_doc.append(np.full(len(rows), self.n_docs + i, dtype=np.int64))
            self.n_chunks += len(rows)
            self.n_tokens += len(token_ids)
            doc_offsets[i] = self.n_chunks
        self.offsets.append(doc_offsets)
        self.doc_file.append(np.array([self.file_index.setdefault(p, len(self.file_index)) for p in paths], np.int32))
        self.doc_pos.append(np.array(positions, np.int64))
        if self.ext_ids is not None:
            self.ext_ids.append(np.array(ids, dtype=object).astype(str))
            self.any_id = self.any_id or any(ids)
        self.n_docs += len(encoded)

    def add_piece(self, piece) -> None:
        """Every document of a piece's group (written by another _ChunkArrays), appended in order."""
        count = int(piece["docs/file"].shape[0])
        if count == 0:
            return
        paths = piece["files/path"][:].tolist()
        self.tokens.append(piece["chunks/tokens"][:])
        self.lengths.append(piece["chunks/length"][:])
        self.chunk_doc.append(piece["chunks/doc"][:] + self.n_docs)
        self.offsets.append(piece["docs/chunk_offset"][1:] + self.n_chunks)
        self.doc_file.append(np.array([self.file_index.setdefault(str(paths[f]), len(self.file_index))
                                       for f in piece["docs/file"][:]], np.int32))
        self.doc_pos.append(piece["docs/position"][:])
        if self.ext_ids is not None:
            ids = piece["docs/external_id"][:] if "docs/external_id" in piece else np.full(count, "", dtype=object)
            self.ext_ids.append(np.asarray(ids, dtype=object).astype(str))
            self.any_id = self.any_id or any(str(i) for i in ids)
        self.n_docs += count
        self.n_chunks += int(piece["chunks/length"].shape[0])
        self.n_tokens += int(piece["chunks/length"][:].astype(np.int64).sum())

    def close(self, id_field: str | None, keep_empty_ids: bool = False) -> dict:
        """Flush everything and write files/path; the counts. Automatic ids (id_field None) that no
        record had leave no docs/external_id array (kept in a piece, whose DB may have them elsewhere)."""
        growing = (self.tokens, self.lengths, self.chunk_doc, self.offsets, self.doc_file, self.doc_pos)
        for array in growing + ((self.ext_ids,) if self.ext_ids else ()):
            array.close()
        if self.ext_ids is not None and id_field is None and not self.any_id and not keep_empty_ids:
            del self.root["docs/external_id"]
        paths = [source_name(p) for p in self.file_index]
        files = self.root.create_array("files/path", shape=(len(paths),), dtype=str,
                                       chunks=(max(1, min(len(paths), 65536)),))
        files[:] = np.array(paths, dtype=object).astype(str)
        return {"documents": self.n_docs, "chunks": self.n_chunks, "tokens": self.n_tokens}


def _write_chunks(
    inputs, dest: Path, tokenizer: LoadedTokenizer, options: ChunkOptions, corpus_opts, progress
):
    root = zarr.open_group(str(dest / STORE), mode="w")
    arrays = _ChunkArrays(root, options.chunk_size, tokenizer.vocab_size, with_ids=options.id_field != "")
    files = expand_inputs(inputs, options.allow_duplicates)  # validate every path before any progress is shown
    if not files:  # directories with no corpus files: say so about the inputs, not an empty list
        raise RetroError(f"empty corpus: no {'/'.join(SUPPORTED)} files in {describe_paths(inputs)}")
    stats = CorpusStats()
    task = progress.start("chunk", total=sum(f.stat().st_size for f in files) // 1024 or 1, unit="KB read")
    reported_kb = 0

    def advance():
        nonlocal reported_kb
        task.advance(stats.bytes_read // 1024 - reported_kb)
        reported_kb = stats.bytes_read // 1024

    _tokenize_into(arrays, iter_documents(files, corpus_opts, stats), tokenizer, advance)
    counts = arrays.close(options.id_field)
    if arrays.ext_ids is not None and (options.id_field is not None or arrays.any_id):
        stats.id_field = options.id_field or AUTO_ID_FIELD
    task.finish()
    return stats, {**counts, "files": stats.files}


def _tokenize_into(arrays: _ChunkArrays, docs, tokenizer: LoadedTokenizer, on_batch=lambda: None) -> None:
    """Tokenize documents in batches of about TOKENIZE_BATCH_CHARS and append them to `arrays`."""
    batch, batch_chars = [], 0
    for doc in docs:
        batch.append(doc)
        batch_chars += len(doc.text)
        if batch_chars >= TOKENIZE_BATCH_CHARS:
            arrays.add(encode_documents(tokenizer, [d.text for d in batch]), [d.path for d in batch],
                       [d.position for d in batch], [d.external_id for d in batch])
            on_batch()
            batch, batch_chars = [], 0
    if batch:
        arrays.add(encode_documents(tokenizer, [d.text for d in batch]), [d.path for d in batch],
                   [d.position for d in batch], [d.external_id for d in batch])
        on_batch()


_PIECE_TOKENIZER: dict[str, LoadedTokenizer] = {}


def chunk_piece(tokenizer_json: str, options: ChunkOptions, corpus_opts: CorpusOptions,
                numbered: tuple[int, Piece, tuple[str, str] | None]) -> dict:
    """A Dask task: tokenize one piece into a zarr group of its own and return the group's files (a piece
    is at most about PIECE_BYTES of text), so the worker needs no filesystem shared with the client. A
    piece of a file fetched from object storage comes with (URL, cache dir): the worker fetches the file
    into its own cache. A refusal (bad record, --strict) comes back as the result, so the client can report
    the first one in corpus order."""
    number, piece, origin = numbered
    key = f"{len(tokenizer_json)}:{hashlib.sha256(tokenizer_json.encode()).hexdigest()}"
    if key not in _PIECE_TOKENIZER:
        _PIECE_TOKENIZER.clear()
        _PIECE_TOKENIZER[key] = tokenizer_from_json(tokenizer_json, "piece")
    tokenizer = _PIECE_TOKENIZER[key]
    if origin is not None:
        url, cache_dir = origin
        piece = dataclasses.replace(piece, path=str(fetch_input(url, os.environ.get(CACHE_ENV) or cache_dir)))
    stats = CorpusStats()
    with tempfile.TemporaryDirectory(prefix="retro-piece-") as scratch:
        root = zarr.open_group(scratch, mode="w")
        arrays = _ChunkArrays(root, options.chunk_size, tokenizer.vocab_size, with_ids=options.id_field != "")
        try:
            _tokenize_into(arrays, iter_piece_documents(piece, corpus_opts, stats), tokenizer)
        except RetroError as err:
            message = str(err) if origin is None else str(err).replace(piece.path, origin[0])
            return {"piece": number, "error": message}
        arrays.close(options.id_field, keep_empty_ids=True)
        files = {f.relative_to(scratch).as_posix(): f.read_bytes() for f in sorted(Path(scratch).rglob("*"))
                 if f.is_file()}
    return {"piece": number, "stats": asdict(stats), "files": files}


def _write_chunks_on_dask(inputs, dest: Path, tokenizer: LoadedTokenizer, options: ChunkOptions, corpus_opts,
                          progress, client, piece_bytes: int):
    """Pieces tokenized on the cluster, then appended here in corpus order: document ids, chunk order and
    every array are those of one process."""
    files = expand_inputs(inputs, options.allow_duplicates)
    if not files:
        raise RetroError(f"empty corpus: no {'/'.join(SUPPORTED)} files in {describe_paths(inputs)}")
    pieces = plan_pieces(files, piece_bytes)
    task = progress.start("chunk", total=sum(f.stat().st_size for f in files) // 1024 or 1, unit="KB read")
    results: dict[int, dict] = {}
    numbered = [(i, piece, fetched_origin(piece.path)) for i, piece in enumerate(pieces)]
    for result in run_blocks(client, "chunk", chunk_piece, (tokenizer.json, options, corpus_opts), numbered):
        group = dest / PIECES_DIR / f"{result['piece']:06d}.zarr"
        for relative, data in result.pop("files", {}).items():
            (group / relative).parent.mkdir(parents=True, exist_ok=True)
            (group / relative).write_bytes(data)
        results[result["piece"]] = result
        task.advance(result.get("stats", {}).get("bytes_read", 0) // 1024)
    refused = [results[i]["error"] for i in sorted(results) if "error" in results[i]]
    if refused:  # the first in corpus order: what one process would have stopped at
        raise RetroError(refused[0])
    root = zarr.open_group(str(dest / STORE), mode="w")
    arrays = _ChunkArrays(root, options.chunk_size, tokenizer.vocab_size, with_ids=options.id_field != "")
    stats = CorpusStats()
    for i in range(len(pieces)):
        piece_stats = results[i]["stats"]
        for name in ("files", "documents", "empty_skipped", "replaced_bytes_docs", "bytes_read"):
            setattr(stats, name, getattr(stats, name) + piece_stats[name])
        stats.binary_skipped.extend(piece_stats["binary_skipped"])
        arrays.add_piece(zarr.open_group(str(dest / PIECES_DIR / f"{i:06d}.zarr"), mode="r"))
    check_not_empty(inputs, stats)
    counts = arrays.close(options.id_field)
    if arrays.ext_ids is not None and (options.id_field is not None or arrays.any_id):
        stats.id_field = options.id_field or AUTO_ID_FIELD
    shutil.rmtree(dest / PIECES_DIR)
    task.finish()
    return stats, {**counts, "files": stats.files}
