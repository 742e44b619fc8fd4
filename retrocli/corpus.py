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

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024
# JSON "\ud800"-style escapes decode to lone surrogates: not encodable text, and the tokenizer rejects them.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Document:
    text: str
    path: str  # the file it came from, as given (made absolute)
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
        stats.binary_skipped.append(str(path))
        return
    yield Document(_decode(raw, str(path), opts, stats), str(path.absolute()), 0)


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


def _read_jsonl(path: Path, opts: CorpusOptions, stats: CorpusStats) -> Iterator[Document]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
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
                yield Document(text, str(path.absolute()), lineno, ext)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise RetroError(f"{path}: cannot read file ({getattr(err, 'strerror', None) or err})") from None


def _read_parquet(path: Path, opts: CorpusOptions, stats: CorpusStats) -> Iterator[Document]:
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
    stats.bytes_read += path.stat().st_size
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        texts = batch.column(opts.text_field).to_pylist()
        ids = batch.column(id_column).to_pylist() if id_column else [""] * len(texts)
        for text, ext in zip(texts, ids, strict=True):
            if not isinstance(text, str):
                kind = "null" if text is None else type(text).__name__
                raise RetroError(f"{path}: row {row}: field '{opts.text_field}' is {kind}, expected a string")
            yield Document(text, str(path.absolute()), row, "" if ext is None else str(ext))
            row += 1


def iter_documents(
    inputs: Sequence[str | os.PathLike], opts: CorpusOptions | None = None, stats: CorpusStats | None = None
) -> Iterator[Document]:
    """Yield the non-empty documents of `inputs`, counting what was skipped into `stats`."""
    opts = opts or CorpusOptions()
    stats = stats if stats is not None else CorpusStats()
    files = expand_inputs(inputs, opts.allow_duplicates)
    for path in files:
        stats.files += 1
        name = path.name.lower()
        if name.endswith(JSONL_SUFFIXES):
            reader = _read_jsonl
        elif name.endswith(PARQUET_SUFFIXES):
            reader = _read_parquet
        else:
            reader = _read_text_file
        for doc in reader(path, opts, stats):
            if not doc.text.strip():
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            yield doc
    if stats.documents == 0:
        raise RetroError(f"empty corpus: no non-empty documents in {describe_paths(inputs)}")
