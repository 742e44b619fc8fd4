"""Corpus readers: plain text files, JSON Lines (optionally gzipped) and Parquet, streamed.

Every document gets a stable integer id (its position in the stream of non-empty documents, in input
order with directories walked in sorted order) and a source reference: the file, plus the 1-based line
(JSONL) or 0-based row (Parquet) where it sits. Nothing holds the whole corpus in memory.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from retrocli.errors import RetroError
from retrocli.options import AUTO_ID_FIELD, DEFAULT_TEXT_FIELD
from retrocli.storage import source_name

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024
# JSON "\ud800"-style escapes decode to lone surrogates: not encodable text, and the tokenizer rejects them.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# in a file name: a backslash, or a byte that is not UTF-8 (os.fsdecode's surrogate escape for it)
_NAME_BYTE = re.compile("[\\\\\udc80-\udcff]")
_NAME_ESCAPE = re.compile(r"\\(\\|x[89a-f][0-9a-f])")


def escape_name(name: str) -> str:
    """A file name as valid text: each byte that is not UTF-8 written \\xHH (lowercase hex), a backslash
    written \\\\. Undone exactly by file_name."""
    return _NAME_BYTE.sub(lambda m: "\\\\" if m[0] == "\\" else f"\\x{ord(m[0]) - 0xDC00:02x}", name)


def file_name(recorded: str) -> str:
    """The path a recorded name stands for, undecodable bytes as os.fsdecode gives them (os.fsencode of it
    is the name's bytes). A backslash followed by neither \\ nor x80-xff is itself (as older DBs wrote it)."""
    return _NAME_ESCAPE.sub(lambda m: "\\" if m[1] == "\\" else chr(0xDC00 + int(m[1][1:], 16)), recorded)


def record_name(path: str | os.PathLike) -> str:
    """The name a corpus file is recorded (files/path) and shown under: its absolute path or the URL it
    was fetched from (source_name), escaped so that any file name is a valid zarr string."""
    return escape_name(source_name(path))


@dataclass
class Document:
    text: str
    path: str  # the file it came from, made absolute: its record_name
    position: int  # JSONL: 1-based line; Parquet: 0-based row; plain text: 0
    external_id: str = ""  # the --id-field value, if any

    @property
    def source(self) -> str:
        if self.position <= 0 and not self.path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
            return self.path
        unit = "row" if self.path.endswith(PARQUET_SUFFIXES) else "line"
        return f"{self.path}:{unit} {self.position}"


@dataclass
class CorpusStats:
    """What the reader saw besides documents; reported in the chunk summary and manifest."""

    files: int = 0
    documents: int = 0
    empty_skipped: int = 0
    binary_skipped: list[str] = field(default_factory=list)
    replaced_bytes_docs: int = 0  # documents in which invalid UTF-8 was replaced with U+FFFD
    bytes_read: int = 0
    id_field: str | None = None  # the field the documents' ids came from (None: no ids)

    def to_dict(self) -> dict:
        return {
            "id_field": self.id_field,
            "files": self.files,
            "documents": self.documents,
            "empty_skipped": self.empty_skipped,
            "binary_skipped": list(self.binary_skipped),
            "invalid_utf8_documents": self.replaced_bytes_docs,
            "bytes_read": self.bytes_read,
        }


@dataclass
class CorpusOptions:
    text_field: str = DEFAULT_TEXT_FIELD
    id_field: str | None = None  # None: the "id" field where a record has one; "": none; else required
    strict: bool = False
    allow_duplicates: bool = False  # the same file given twice (directly or through a directory)


def describe_paths(paths: Sequence[str | os.PathLike], limit: int = 3) -> str:
    """Paths for a one-line message: the first few, then how many more."""
    names = [str(p) for p in paths]
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def _suffix_ok(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED)


def expand_inputs(inputs: Sequence[str | os.PathLike], allow_duplicates: bool = False) -> list[Path]:
    """Resolve the user's paths to the list of files to read, failing on anything unreadable, and on a
    file reached twice (`a.jsonl a.jsonl`, or a file and its directory) unless allow_duplicates."""
    if not inputs:
        raise RetroError("no input given: pass one or more files or directories")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise RetroError(f"{path}: no such file or directory")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix_ok(p))
            files.extend(found)
        elif _suffix_ok(path):
            files.append(path)
        else:
            raise RetroError(
                f"{path}: unsupported file type (expected one of {', '.join(SUPPORTED)})"
            )
    for path in files:
        if not os.access(path, os.R_OK):
            raise RetroError(f"{path}: cannot read file (permission denied)")
    if not allow_duplicates:
        seen: dict[Path, Path] = {}
        for path in files:
            real = path.resolve()
            if real in seen:
                also = "" if seen[real] == path else f" (also as {seen[real]})"
                raise RetroError(f"{path}: given twice{also}; its documents would be chunked twice. "
                                 "Pass --allow-duplicates if that is what you want")
            seen[real] = path
    return files


def _decode(raw: bytes, where: str, opts: CorpusOptions, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if opts.strict:
            raise RetroError(f"{where}: invalid UTF-8 at byte {err.start} (--strict)") from None
        stats.replaced_bytes_docs += 1
        return raw.decode("utf-8", errors="replace")


def _fix_surrogates(text: str, where: str, what: str, opts: CorpusOptions, stats: CorpusStats | None) -> str:
    """Replace lone surrogates (from JSON escapes) like invalid UTF-8: U+FFFD and counted, or an error."""
    if not _LONE_SURROGATE.search(text):
        return text
    if opts.strict:
        raise RetroError(f"{where}: field '{what}' holds a lone surrogate escape, not valid text (--strict)")
    if stats is not None:
        stats.replaced_bytes_docs += 1
    return _LONE_SURROGATE.sub("\ufffd", text)


def _read_text_file(path: Path, opts: CorpusOptions, stats: CorpusStats) -> Iterator[Document]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RetroError(f"{path}: cannot read file ({err.strerror})") from None
    stats.bytes_read += len(raw)
    if b"\x00" in raw:
        stats.binary_skipped.append(escape_name(str(path)))
        return
    yield Document(_decode(raw, str(path), opts, stats), record_name(path), 0)


def _record_text(record, where: str, opts: CorpusOptions) -> tuple[str | None, str]:
    if not isinstance(record, dict):
        raise RetroError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if opts.text_field not in record:
        raise RetroError(f"{where}: missing text field '{opts.text_field}' (set --text-field)")
    text = record[opts.text_field]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise RetroError(f"{where}: field '{opts.text_field}' is {kind}, expected a string")
    ext = ""
    if opts.id_field is None:  # automatic: the record's "id" field, where it has one
        value = record.get(AUTO_ID_FIELD)
        ext = "" if value is None else str(value)
    elif opts.id_field:  # named by the user: every record must have it
        if opts.id_field not in record or record[opts.id_field] is None:
            raise RetroError(f"{where}: missing id field '{opts.id_field}'")
        ext = str(record[opts.id_field])
    return text, ext


def _read_jsonl(path: Path, opts: CorpusOptions, stats: CorpusStats, start: int = 0, stop: int | None = None,
                first_line: int = 1) -> Iterator[Document]:
    """The records of a JSONL file; start/stop: only the lines that begin in that byte range (a piece of
    an uncompressed file), the first of them being line `first_line`."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            if start:
                handle.seek(start)
            at = start
            for lineno, raw in enumerate(handle, start=first_line):
                if stop is not None and at >= stop:
                    break
                at += len(raw)
                stats.bytes_read += len(raw)
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                line = _decode(raw, where, opts, stats)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise RetroError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
                text, ext = _record_text(record, where, opts)
                text = _fix_surrogates(text, where, opts.text_field, opts, stats)
                if ext:
                    ext = _fix_surrogates(ext, where, opts.id_field or AUTO_ID_FIELD, opts, None)
                yield Document(text, record_name(path), lineno, ext)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise RetroError(f"{path}: cannot read file ({getattr(err, 'strerror', None) or err})") from None


def _read_parquet(path: Path, opts: CorpusOptions, stats: CorpusStats,
                  row_group: int | None = None) -> Iterator[Document]:
    """The rows of a Parquet file, or of one of its row groups (a piece; rows keep their file numbering)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise RetroError(f"{path}: not a readable Parquet file ({err})") from None
    names = parquet.schema_arrow.names
    if opts.text_field not in names:
        raise RetroError(f"{path}: missing text column '{opts.text_field}' (set --text-field)")
    if opts.id_field and opts.id_field not in names:
        raise RetroError(f"{path}: missing id column '{opts.id_field}'")
    id_column = opts.id_field or (AUTO_ID_FIELD if opts.id_field is None and AUTO_ID_FIELD in names else None)
    columns = [opts.text_field] + ([id_column] if id_column else [])
    groups = None if row_group is None else [row_group]
    if row_group in (None, 0):
        stats.bytes_read += path.stat().st_size
    row = sum(parquet.metadata.row_group(g).num_rows for g in range(row_group or 0))
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns, row_groups=groups):
        texts = batch.column(opts.text_field).to_pylist()
        ids = batch.column(id_column).to_pylist() if id_column else [""] * len(texts)
        for text, ext in zip(texts, ids, strict=True):
            if not isinstance(text, str):
                kind = "null" if text is None else type(text).__name__
                raise RetroError(f"{path}: row {row}: field '{opts.text_field}' is {kind}, expected a string")
            yield Document(text, record_name(path), row, "" if ext is None else str(ext))
            row += 1


@dataclass(frozen=True)
class Piece:
    """A part of the corpus chunked on its own (`chunk --dask`): a whole file, the lines beginning in a
    byte range of an uncompressed JSONL file, or one row group of a Parquet file."""

    path: str
    start: int = 0  # JSONL: byte range [start, stop) and the line number at start
    stop: int | None = None
    first_line: int = 1
    row_group: int | None = None  # Parquet
    first_of_file: bool = True  # counts the file in the stats


def plan_pieces(files: list[Path], piece_bytes: int) -> list[Piece]:
    """The corpus cut into pieces of about piece_bytes, in document order. A JSONL range ends just after a
    newline, and its first line number comes from counting the newlines before it."""
    import pyarrow.parquet as pq

    pieces: list[Piece] = []
    for path in files:
        name = path.name.lower()
        if name.endswith(PARQUET_SUFFIXES):
            try:
                groups = pq.ParquetFile(path).num_row_groups
            except Exception:  # a bad file: one piece, whose reader says what is wrong with it
                groups = 1
            pieces.extend(Piece(str(path), row_group=g, first_of_file=g == 0) for g in range(max(groups, 1)))
        elif name.endswith(".jsonl") and path.stat().st_size > piece_bytes:
            pieces.extend(_jsonl_ranges(path, piece_bytes))
        else:
            pieces.append(Piece(str(path)))
    return pieces


def _jsonl_ranges(path: Path, piece_bytes: int) -> list[Piece]:
    size = path.stat().st_size
    ranges, start, line = [], 0, 1
    with open(path, "rb") as handle:
        while start < size:
            handle.seek(min(start + piece_bytes, size))
            handle.readline()  # to the end of the line the cut falls in
            stop = min(handle.tell(), size)
            ranges.append(Piece(str(path), start, stop, line, first_of_file=start == 0))
            handle.seek(start)
            line += handle.read(stop - start).count(b"\n")
            start = stop
    return ranges


def iter_piece_documents(piece: Piece, opts: CorpusOptions, stats: CorpusStats) -> Iterator[Document]:
    """The non-empty documents of one piece, counting what was skipped into `stats` (which may end at 0)."""
    path = Path(piece.path)
    if piece.first_of_file:
        stats.files += 1
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        docs = _read_jsonl(path, opts, stats, piece.start, piece.stop, piece.first_line)
    elif name.endswith(PARQUET_SUFFIXES):
        docs = _read_parquet(path, opts, stats, piece.row_group)
    else:
        docs = _read_text_file(path, opts, stats)
    for doc in docs:
        if not doc.text.strip():
            stats.empty_skipped += 1
            continue
        stats.documents += 1
        yield doc


def iter_documents(
    inputs: Sequence[str | os.PathLike], opts: CorpusOptions | None = None, stats: CorpusStats | None = None
) -> Iterator[Document]:
    """Yield the non-empty documents of `inputs`, counting what was skipped into `stats`."""
    opts = opts or CorpusOptions()
    stats = stats if stats is not None else CorpusStats()
    for path in expand_inputs(inputs, opts.allow_duplicates):
        yield from iter_piece_documents(Piece(str(path)), opts, stats)
    check_not_empty(inputs, stats)


def check_not_empty(inputs: Sequence[str | os.PathLike], stats: CorpusStats) -> None:
    if stats.documents == 0:
        raise RetroError(f"empty corpus: no non-empty documents in {describe_paths(inputs)}")
