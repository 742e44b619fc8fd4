"""The chunk database: a directory with a JSON manifest, a copy of the tokenizer and one zarr v3 group.

Layout (see docs/db-format.md):

    DB/manifest.json          format version, tokenizer, chunk size, counts, per-stage status
    DB/tokenizer.json         the exact tokenizer the chunks are in
    DB/store.zarr/            zarr v3 group
        chunks/tokens   [N, m]  uint16 (uint32 for vocabularies over 65535), padded with 0
        chunks/length   [N]     uint8/uint16, real tokens in the chunk (the last of a doc may be short)
        chunks/doc      [N]     int64, the document each chunk belongs to
        docs/chunk_offset [D+1] int64, chunks of doc d are offset[d]:offset[d+1]
        docs/file       [D]     int32, index into files/path
        docs/position   [D]     int64, 1-based JSONL line, 0-based Parquet row, 0 for text files
        docs/external_id [D]    string, only when --id-field was given
        files/path      [F]     string
        embeddings      [N, dim] float16 (embed stage)
    DB/index/shard-*.hnsw     hnswlib indexes (index stage)
    DB/segments/NNNNN/        documents added later (`retro add`): each a DB directory of its own with
                              local ids, read as the rows that follow the base's, plus index/ shards
                              holding its vectors under their global ids

The manifest's `version` counts committed changes (build = 1; every add or remove adds one), `segments`
lists the added parts in order and `removed.documents` the tombstoned documents. A change is committed by
the atomic rename of the manifest alone, so a reader sees one version whole, and files of a committed
version never change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from retrocli.artifacts import (
    MANIFEST,
    check_fields,
    check_files_record,
    read_manifest_file,
    write_json_atomic,
)
from retrocli.checksums import CheckedStore, file_sha256, record_arrays
from retrocli.checksums import check_files as check_recorded_files
from retrocli.errors import RetroError
from retrocli.storage import Mirror, push_synced_copy, worker_mirror
from retrocli.tokenizer import text_sha256, tokenizer_from_json

FORMAT_NAME = "retrocli-db"
DATASTORE_FORMAT = "retrocli-knn-datastore"  # a kNN-LM datastore (retrocli.datastore), told apart by `retro verify`
FORMAT_VERSION = 2  # the newest format this retrocli reads
BUILT_FORMAT_VERSION = 1  # what a build writes: one part, nothing removed
# A DB with added segments or removed documents: a reader of format 1 would miss both, so it must refuse it.
LIVING_FORMAT_VERSION = 2
STORE = "store.zarr"
TOKENIZER_FILE = "tokenizer.json"
# Rows per zarr chunk for per-chunk arrays: a 10M-chunk DB is ~610 files per array, each ~2 MB raw.
ROWS_PER_ZARR_CHUNK = 16384
DOCS_PER_ZARR_CHUNK = 65536
# The arrays each stage writes; a complete stage records their files ("files") in its manifest record.
CHUNK_ARRAYS = ("chunks/tokens", "chunks/length", "chunks/doc", "docs/chunk_offset", "docs/file",
                "docs/position", "docs/external_id", "files/path")
EMBED_ARRAYS = ("embeddings",)
SEGMENTS_DIR = "segments"
_SEGMENT_PATH = re.compile(r"segments/[0-9]{5}")


def check_same_chunking(db, where: str | os.PathLike, tokenizer_sha256: str, chunk_size: int,
                        subject: str = "") -> None:
    """Refuse tokens cut another way than db's: token ids and chunk boundaries must mean the same thing.
    `db` is a RetroDB or a retriever (anything with tokenizer_sha256, chunk_size and path); `where` names
    the other side (a DB, a model directory), `subject` says what it is in the message."""
    if tokenizer_sha256 != db.tokenizer_sha256:
        raise RetroError(f"{where}: {subject}uses a different tokenizer than {db.path}")
    if int(chunk_size) != db.chunk_size:
        raise RetroError(f"{where}: {subject}chunk size {chunk_size} differs from {db.path} ({db.chunk_size})")


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not path.exists():
        raise RetroError(f"{path}: no such DB directory")
    if not file.exists():
        raise RetroError(f"{path}: not a retro DB (no {MANIFEST}); build one with `retro chunk`")
    manifest = read_manifest_file(file, "manifest", FORMAT_NAME, FORMAT_VERSION,
                                  not_this_kind="not a retro DB manifest")
    check_manifest_shape(file, manifest)
    return manifest


def commit_manifest(db_path: str | os.PathLike, manifest: dict) -> None:
    """Commit a change to the DB at db_path: the manifest's atomic rename, then, when the DB is the local
    copy of one on object storage being written here, its upload to the store."""
    write_json_atomic(Path(db_path) / MANIFEST, manifest)
    push_synced_copy(db_path)


# The manifest's shape, checked once when a DB is opened so that no command meets a wrong type later:
# field -> (type, required). Nested records are checked by the same table.
_COUNT = (int, True)
MANIFEST_SCHEMA = {
    "db_id": (str, True), "chunk_size": (int, True),
    "counts": ({"documents": _COUNT, "chunks": _COUNT, "tokens": _COUNT}, True),
    "tokenizer": ({"name": (str, True), "sha256": (str, True), "vocab_size": (int, True)}, True),
    "stages": (dict, True),
    "embedder": ({"name": (str, True), "sha256": (str, True), "dim": (int, True), "precision": (str, True)}, False),
    "index": ({"space": (str, True), "dim": (int, True), "shards": (list, True)}, False),
    "version": (int, False), "segments": (list, False), "removed": ({"documents": (list, True)}, False),
}
SEGMENT_SCHEMA = {"path": (str, True), "db_id": (str, True), "manifest_sha256": (str, True),
                  "first_doc": _COUNT, "first_chunk": _COUNT, "documents": _COUNT, "chunks": _COUNT,
                  "tokens": _COUNT, "version": _COUNT}
TRAINED_SCHEMA = {"file": (str, True), "bytes": _COUNT, "sha256": (str, True)}
SHARD_SCHEMA = {"shard": _COUNT, "file": (str, True), "start": _COUNT, "count": _COUNT, "bytes": _COUNT}


def check_manifest_shape(file: Path, manifest: dict) -> None:
    """One clear line naming the first field of a parsed manifest that has the wrong shape."""
    check_fields(file, manifest, MANIFEST_SCHEMA, "")
    for stage, record in manifest["stages"].items():
        if not isinstance(record, dict) or record.get("status") not in ("running", "complete"):
            raise RetroError(f"{file}: field 'stages.{stage}' must be an object with status running or complete")
        if "files" in record:
            check_files_record(file, record["files"], f"stages.{stage}.files")
    for i, shard in enumerate(manifest.get("index", {}).get("shards", [])):
        if not isinstance(shard, dict):
            raise RetroError(f"{file}: field 'index.shards[{i}]' must be an object, not {shard!r}")
        check_fields(file, shard, SHARD_SCHEMA, f"index.shards[{i}].")
    trained = manifest.get("index", {}).get("trained")
    if trained is not None:
        if not isinstance(trained, dict):
            raise RetroError(f"{file}: field 'index.trained' must be an object, not {trained!r}")
        check_fields(file, trained, TRAINED_SCHEMA, "index.trained.")
    if manifest.get("version", 1) < 1:
        raise RetroError(f"{file}: field 'version' must be ≥ 1, not {manifest['version']}")
    for i, segment in enumerate(manifest.get("segments", [])):
        if not isinstance(segment, dict):
            raise RetroError(f"{file}: field 'segments[{i}]' must be an object, not {segment!r}")
        check_fields(file, segment, SEGMENT_SCHEMA, f"segments[{i}].")
        if not _SEGMENT_PATH.fullmatch(segment["path"]):
            raise RetroError(f"{file}: field 'segments[{i}].path' must be segments/NNNNN, not {segment['path']!r}")
    removed = manifest.get("removed", {}).get("documents", [])
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < manifest["counts"]["documents"]
               for d in removed):
        raise RetroError(f"{file}: field 'removed.documents' must list document ids of this DB")


def record_stage_arrays(store: Path, arrays: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """The `files` record of a stage that has just written `arrays` (those of them that exist)."""
    return record_arrays(store, [name for name in arrays if (Path(store) / name / "zarr.json").is_file()])


def recorded_files(manifest: dict) -> dict[str, dict[str, list]]:
    """The files every complete stage recorded, merged: what CheckedStore holds reads against."""
    records: dict[str, dict[str, list]] = {}
    for record in manifest["stages"].values():
        if record.get("status") == "complete":
            records.update(record.get("files", {}))
    return records


def content_id(manifest: dict) -> str:
    """sha256 of what a DB version holds, independent of when or where it was built: the checksums every
    complete stage recorded for its files, the index shards, the added segments (each pinned by its
    manifest's sha256), the removed documents, the tokenizer and the chunk size. Timings and paths are
    left out, so a `cp -r` copy has the same content id and a copy that took another change has not."""
    stages = {name: record.get("files") for name, record in sorted(manifest.get("stages", {}).items())
              if record.get("status") == "complete"}
    held = {"db_id": manifest.get("db_id"), "tokenizer": manifest.get("tokenizer", {}).get("sha256"),
            "chunk_size": manifest.get("chunk_size"), "counts": manifest.get("counts"), "stages": stages,
            "embedder": manifest.get("embedder"), "index": manifest.get("index"),
            "segments": manifest.get("segments", []),
            "removed": sorted(manifest.get("removed", {}).get("documents", []))}
    return hashlib.sha256(json.dumps(held, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stage_status(manifest: dict, stage: str) -> str:
    return manifest.get("stages", {}).get(stage, {}).get("status", "missing")


def remove_db_dir(path: Path) -> None:
    """Delete an existing DB for --overwrite, but never a directory that is not one of ours."""
    if path.is_symlink():
        raise RetroError(f"{path}: is a symbolic link; pass the directory it points to")
    if not path.exists():
        return
    if path.is_dir() and (path / MANIFEST).exists():
        shutil.rmtree(path)
    elif path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    else:
        raise RetroError(f"{path}: exists and is not a retro DB; refusing to overwrite it")


@dataclass
class ChunkRef:
    """One chunk, resolved for people: what `neighbors` prints and the API hands back."""

    id: int
    doc: int
    tokens: np.ndarray
    text: str
    source: str


class RetroDB:
    """Read access to a DB. Opening never writes; writers live in the stage modules."""

    def __init__(self, path: str | os.PathLike, check_files: bool = True):
        """check_files: refuse the DB at once when a recorded file is missing or of another size (a stat
        per file); a changed byte of the same size is caught when that file is read."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if stage_status(self.manifest, "chunk") != "complete":
            raise RetroError(f"{self.path}: chunk stage is not complete; rerun `retro chunk`")
        records = recorded_files(self.manifest)
        damaged = f"the DB is damaged; `retro verify {self.path}` lists every problem"
        problems = check_recorded_files(self.path / STORE, records, hash_files=False) if check_files else []
        if problems:
            raise RetroError(f"{problems[0]}; {damaged}")
        try:
            store = CheckedStore(self.path / STORE, records, damaged)
            self.root = zarr.open_group(store=store, mode="r")
            base = _Part(self.root, 0, 0)
        except RetroError:
            raise
        except Exception as err:  # zarr raises several types for missing/corrupt metadata
            raise RetroError(f"{self.path / STORE}: cannot open the zarr store ({err})") from None
        self.parts = [base] + [self._open_segment(i, record, check_files)
                               for i, record in enumerate(self.manifest.get("segments", []))]
        if sum(part.num_chunks for part in self.parts) != self.num_chunks or \
                sum(part.num_docs for part in self.parts) != self.num_docs:
            raise RetroError(f"{self.path / MANIFEST}: counts do not match the DB's arrays; {damaged}")
        self._tokens = StackedRows([(p.first_chunk, p.root["chunks/tokens"]) for p in self.parts])

    def _open_segment(self, i: int, record: dict, check_files: bool) -> _Part:
        """An added segment: a DB directory of its own, pinned by its manifest's sha256 and db_id."""
        where = self.path / record["path"]
        damaged = f"the DB is damaged; `retro verify {self.path}` lists every problem"
        if where.is_symlink() or not where.is_dir() or self.path.resolve() not in where.resolve().parents:
            raise RetroError(f"{where}: segment {i + 1} of the DB is missing; {damaged}")
        try:
            digest = file_sha256(where / MANIFEST)
        except OSError:
            digest = None
        if digest != record["manifest_sha256"]:
            raise RetroError(f"{where / MANIFEST}: does not match the checksum the DB recorded; {damaged}")
        segment = RetroDB(where, check_files)
        if segment.manifest["db_id"] != record["db_id"] or segment.manifest.get("segments"):
            raise RetroError(f"{where}: is not the segment the DB recorded; {damaged}")
        check_same_chunking(self, where, segment.manifest["tokenizer"]["sha256"], segment.chunk_size, "the segment ")
        part = _Part(segment.root, record["first_chunk"], record["first_doc"])
        if (part.num_chunks, part.num_docs) != (record["chunks"], record["documents"]):
            raise RetroError(f"{where}: holds other documents than the DB recorded; {damaged}")
        return part

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        return int(self.manifest["chunk_size"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def num_chunks(self) -> int:
        return int(self.manifest["counts"]["chunks"])

    @property
    def num_docs(self) -> int:
        return int(self.manifest["counts"]["documents"])

    def __len__(self) -> int:
        return self.num_chunks

    def stage(self, name: str) -> str:
        return stage_status(self.manifest, name)

    @property
    def version(self) -> int:
        """Committed changes so far: 1 when built, one more for every add or remove."""
        return int(self.manifest.get("version", 1))

    @cached_property
    def content_id(self) -> str:
        """What this committed version holds, as one sha256: see content_id(). Artefacts computed from
        a DB (neighbours, datastores, leakage reports, a served DB) record and check it, so two copies
        of one DB that each took a different change, both "version 2" of one db_id, never pass for each
        other."""
        return content_id(self.manifest)

    @cached_property
    def removed_docs(self) -> frozenset[int]:
        return frozenset(int(d) for d in self.manifest.get("removed", {}).get("documents", []))

    @cached_property
    def removed_chunks(self) -> np.ndarray:
        """bool [N]: chunks of removed documents, which no search returns."""
        if not self.removed_docs:
            return np.zeros(self.num_chunks, dtype=bool)
        return np.isin(self.chunk_doc, np.fromiter(self.removed_docs, dtype=np.int64))

    @property
    def num_live_docs(self) -> int:
        return self.num_docs - len(self.removed_docs)

    def array(self, name: str) -> StackedRows:
        """A per-chunk array (chunks/tokens, chunks/length, embeddings) over every part, read as one."""
        try:
            return StackedRows([(p.first_chunk, p.root[name]) for p in self.parts])
        except KeyError:
            raise RetroError(f"{self.path}: array {name} is missing from the store") from None

    # -- small per-chunk arrays, loaded once (9 bytes a chunk) --------------------------------------
    @cached_property
    def chunk_doc(self) -> np.ndarray:
        return np.concatenate([p.root["chunks/doc"][:] + p.first_doc for p in self.parts])

    @cached_property
    def chunk_length(self) -> np.ndarray:
        return np.concatenate([p.root["chunks/length"][:].astype(np.int64) for p in self.parts])

    @cached_property
    def doc_offsets(self) -> np.ndarray:
        # each part's offsets start at its own 0: shifted to global ids, the leading 0 dropped after the base
        return np.concatenate([p.root["docs/chunk_offset"][:][(1 if i else 0):] + p.first_chunk
                               for i, p in enumerate(self.parts)])

    def _doc_part(self, doc: int) -> tuple[_Part, int]:
        doc = self._check_doc(doc)
        for part in reversed(self.parts):
            if doc >= part.first_doc:
                return part, doc - part.first_doc
        raise AssertionError("unreachable: the base part starts at document 0")

    def doc_table(self) -> dict[str, np.ndarray]:
        """Per-document arrays of every part, merged: files/path, docs/file (into the merged paths),
        docs/position and docs/external_id ('' where a part has no ids)."""
        paths, files, positions, ids = [], [], [], []
        for part in self.parts:
            files.append(part.doc_file + len(paths))
            paths.extend(part.files.tolist())
            positions.append(part.doc_position)
            ids.append(part.external_ids.astype(object) if part.external_ids is not None
                       else np.full(part.num_docs, "", dtype=object))
        return {"files/path": np.array([str(p) for p in paths], dtype=object), "docs/file": np.concatenate(files),
                "docs/position": np.concatenate(positions), "docs/external_id": np.concatenate(ids)}

    @cached_property
    def tokenizer(self):
        file = self.path / TOKENIZER_FILE
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise RetroError(f"{file}: cannot read the DB's tokenizer ({reason}); the DB is damaged") from None
        if text_sha256(text) != self.manifest["tokenizer"]["sha256"]:
            raise RetroError(f"{file}: sha256 does not match the manifest")
        try:  # checked first: only the exact tokenizer the DB was built with is ever parsed
            loaded = tokenizer_from_json(text, self.manifest["tokenizer"]["name"])
        except Exception as err:  # tokenizers raises its own exception type for a bad file
            raise RetroError(f"{file}: not a tokenizer.json ({str(err).splitlines()[0][:200]})") from None
        if loaded.sha256 != self.manifest["tokenizer"]["sha256"]:
            raise RetroError(f"{self.path / TOKENIZER_FILE}: sha256 does not match the manifest")
        return loaded

    # -- chunk access ----------------------------------------------------------------------------
    def _check(self, chunk_id: int) -> int:
        chunk_id = int(chunk_id)
        if not 0 <= chunk_id < self.num_chunks:
            raise RetroError(f"chunk id {chunk_id} out of range (DB has {self.num_chunks} chunks)")
        return chunk_id

    def chunk_tokens(self, chunk_id: int) -> np.ndarray:
        chunk_id = self._check(chunk_id)
        return self._tokens[chunk_id, : self.chunk_length[chunk_id]].astype(np.int64)

    def tokens_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Padded tokens [stop-start, m] and lengths for a contiguous range: the bulk read path."""
        lengths = self.__dict__.get("chunk_length")  # read only this range unless all are loaded already
        if lengths is None:
            return self._tokens[start:stop], self.array("chunks/length")[start:stop].astype(np.int64)
        return self._tokens[start:stop], lengths[start:stop]

    def chunk_text(self, chunk_id: int) -> str:
        # A chunk boundary can split a multi-byte character; its halves decode as U+FFFD here,
        # while document_text() decodes the whole document and is exact.
        return self.tokenizer.decode(self.chunk_tokens(chunk_id))

    def continuation(self, chunk_id: int) -> int | None:
        """The next chunk of the same document (RETRO's F), or None at a document's end."""
        chunk_id = self._check(chunk_id)
        nxt = chunk_id + 1
        if nxt < self.num_chunks and self.chunk_doc[nxt] == self.chunk_doc[chunk_id]:
            return nxt
        return None

    def _check_doc(self, doc: int) -> int:
        doc = int(doc)
        if not 0 <= doc < self.num_docs:
            raise RetroError(f"document {doc} out of range (DB has {self.num_docs} documents)")
        return doc

    def doc_of(self, chunk_id: int) -> int:
        return int(self.chunk_doc[self._check(chunk_id)])

    def doc_chunks(self, doc: int) -> range:
        doc = self._check_doc(doc)
        return range(int(self.doc_offsets[doc]), int(self.doc_offsets[doc + 1]))

    def document_text(self, doc: int) -> str:
        chunks = self.doc_chunks(doc)
        tokens, lengths = self.tokens_block(chunks.start, chunks.stop)
        ids = np.concatenate([row[:n] for row, n in zip(tokens, lengths, strict=True)])
        return self.tokenizer.decode(ids.tolist())

    def external_id(self, doc: int) -> str | None:
        """The document's id from the corpus (its `id` field, or --id-field), if it had one."""
        part, local = self._doc_part(doc)
        value = str(part.external_ids[local]) if part.external_ids is not None else ""
        return value or None

    def location(self, doc: int, relative: bool = True) -> str:
        """file:line (JSONL) or file:row (Parquet), the file relative to the working directory or the DB
        when it lies inside one of them (relative=False: as recorded, absolute)."""
        part, local = self._doc_part(doc)
        path = str(part.files[int(part.doc_file[local])])
        if relative:
            for base in (Path.cwd(), self.path.absolute()):
                with contextlib.suppress(ValueError):
                    path = str(Path(path).relative_to(base))
                    break
        position = int(part.doc_position[local])
        if path.endswith(".parquet"):
            return f"{path}:row {position}"
        return f"{path}:line {position}" if position > 0 else path

    def source(self, doc: int) -> str:
        """How people see a document: its id first, then where it came from (`id (file:line)`)."""
        ext, where = self.external_id(doc), self.location(doc)
        return f"{ext} ({where})" if ext else where

    def chunk(self, chunk_id: int) -> ChunkRef:
        chunk_id = self._check(chunk_id)
        doc = self.doc_of(chunk_id)
        tokens = self.chunk_tokens(chunk_id)
        return ChunkRef(chunk_id, doc, tokens, self.tokenizer.decode(tokens), self.source(doc))

    # -- sizes on disk for `retro info` ---------------------------------------------------------------
    def disk_usage(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        store = self.path / STORE
        for meta in sorted(store.rglob("zarr.json")):
            array_dir = meta.parent
            if array_dir == store or not (array_dir / "c").exists() and _is_group(meta):
                continue
            name = array_dir.relative_to(store).as_posix()
            sizes[name] = sum(f.stat().st_size for f in array_dir.rglob("*") if f.is_file())
        index_dir = self.path / "index"
        if index_dir.exists():
            sizes["index"] = sum(f.stat().st_size for f in index_dir.rglob("*") if f.is_file())
        if self.manifest.get("segments"):
            sizes["segments"] = sum(f.stat().st_size for record in self.manifest["segments"]
                                    for f in (self.path / record["path"]).rglob("*") if f.is_file())
        return sizes


class _Part:
    """One part of a DB, the base or an added segment: its zarr group and where its ids start."""

    def __init__(self, root, first_chunk: int, first_doc: int):
        self.root, self.first_chunk, self.first_doc = root, int(first_chunk), int(first_doc)
        self.num_chunks = int(root["chunks/length"].shape[0])
        self.num_docs = int(root["docs/file"].shape[0])

    @cached_property
    def files(self) -> np.ndarray:
        return self.root["files/path"][:]

    @cached_property
    def doc_file(self) -> np.ndarray:
        return self.root["docs/file"][:]

    @cached_property
    def doc_position(self) -> np.ndarray:
        return self.root["docs/position"][:]

    @cached_property
    def external_ids(self) -> np.ndarray | None:
        return self.root["docs/external_id"][:] if "docs/external_id" in self.root else None


class StackedRows:
    """The rows of one array across a DB's parts, indexed as one array: [a:b], [i], [i, :n]."""

    def __init__(self, pieces: list[tuple[int, object]]):
        self.pieces = pieces  # (first row, zarr array), in order
        last_start, last = pieces[-1]
        self.shape = (last_start + last.shape[0], *last.shape[1:])
        self.dtype = pieces[0][1].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, (int, np.integer)):
            row = int(rows) + (self.shape[0] if rows < 0 else 0)
            for start, array in reversed(self.pieces):
                if row >= start:
                    return array[(row - start, *rest)]
        start, stop, step = rows.indices(self.shape[0]) if isinstance(rows, slice) else (None, None, None)
        if step != 1:
            raise TypeError("StackedRows takes an int or a contiguous slice of rows")
        out = [array[(slice(max(start, first) - first, min(stop, first + array.shape[0]) - first), *rest)]
               for first, array in self.pieces if max(start, first) < min(stop, first + array.shape[0])]
        if not out:  # an empty range: zero rows of the right shape and type
            return self.pieces[0][1][(slice(0, 0), *rest)]
        return np.concatenate(out) if len(out) > 1 else out[0]


def _is_group(meta: Path) -> bool:
    try:
        return json.loads(meta.read_text()).get("node_type") == "group"
    except (OSError, json.JSONDecodeError):
        return False


def open_db(path: str | os.PathLike, check_files: bool = True) -> RetroDB:
    """Open a DB for reading. Raises RetroError with a one-line reason if it is not usable."""
    return RetroDB(path, check_files)


# What the API takes for a DB, always as its first argument `db`: one already opened, or its path.
DBLike = RetroDB | str | os.PathLike


def as_db(db: DBLike) -> RetroDB:
    return db if isinstance(db, RetroDB) else open_db(db)


def db_location(db: DBLike) -> Path:
    """The DB's directory, without opening it (a stage that writes reopens it after each change)."""
    return db.path if isinstance(db, RetroDB) else Path(db)


def open_task_db(location: str | tuple[str, str], array: str, start: int, stop: int
                 ) -> tuple[RetroDB, Mirror | None]:
    """In a block task: the DB at `location`, a path, or (URL, cache dir) for a DB on object storage,
    which the worker reaches through its partial mirror holding rows [start, stop) of `array` (and the
    mirror, to upload what the task writes)."""
    if isinstance(location, str):
        return open_db(location), None
    mirror = worker_mirror(*location)
    return open_db(mirror.pull_partial(rows={f"{STORE}/{array}": (start, stop)}), check_files=False), mirror


def load_embeddings(db: RetroDB, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of the DB's embeddings as float32 (the embed stage must be complete)."""
    if db.stage("embed") != "complete":
        raise RetroError(f"{db.path}: embed stage is not complete; run `retro embed {db.path}`")
    array = db.array("embeddings")
    return np.asarray(array[start:stop], dtype=np.float32)
