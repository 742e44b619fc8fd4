"""What a stage wrote, recorded so that a missing or damaged zarr chunk is an error, never fill values.

zarr reads a chunk file that is not there as the array's fill value, so a deleted `chunks/tokens` chunk
reads as rows of token 0 and a deleted `embeddings` chunk as zero vectors, without a word. When a stage
completes it records every file of the arrays it wrote (the array's zarr.json and its chunk files) with
size and sha256 in the manifest. Readers open the store through `CheckedStore`, which compares each file
against that record as zarr fetches it: a recorded file that is missing, of another size or another
sha256, or a chunk file the stage never wrote, raises one line naming the array and the chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from retrocli.errors import RetroError


def _is_data_file(file: Path) -> bool:
    """A file zarr reads: not a temp file of a write that was interrupted (zarr writes `name.<hex>.partial`
    and renames it; a kill -9 can leave one behind)."""
    return file.is_file() and not file.name.startswith(".") and not file.name.endswith(".partial")


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def record_arrays(store: str | os.PathLike, arrays: list[str]) -> dict[str, dict[str, list]]:
    """{array: {file relative to the array: [bytes, sha256]}} for every file under each array's directory.
    An array chunk that holds only fill values is not written by zarr, so it is absent here too."""
    store = Path(store)
    record: dict[str, dict[str, list]] = {}
    for name in arrays:
        base = store / name
        if not (base / "zarr.json").is_file():
            raise RetroError(f"{base}: array missing while recording checksums")
        record[name] = {
            file.relative_to(base).as_posix(): [file.stat().st_size, file_sha256(file)]
            for file in sorted(base.rglob("*"))
            if _is_data_file(file)
        }
    return record


def chunk_label(relative: str) -> str:
    """How a file of an array is named in messages: 'chunk 3,0' for c/3/0, else the file name."""
    if relative.startswith("c/"):
        return "chunk " + ",".join(relative.split("/")[1:])
    return relative


class DamagedArrayError(RetroError):
    """A zarr file that does not match what its stage recorded."""


def damage(store: Path, array: str, relative: str, what: str) -> str:
    return f"{store / array / relative}: {chunk_label(relative)} of array {array} {what}"


class CheckedStore(LocalStore):
    """A read-only LocalStore that checks each file of a recorded array against its record when it is read.

    `records` is {array: {relative file: [bytes, sha256]}}; arrays not in it are read unchecked (a stage
    still running, or a DB written before checksums were recorded). A file is hashed each time zarr fetches
    it: a chunk is fetched once per read and hashing runs at several hundred MB/s, well ahead of zstd."""

    def __init__(self, root: str | os.PathLike, records: dict[str, dict[str, list]], advice: str):
        super().__init__(root, read_only=True)
        self.records = records
        self.advice = advice  # what the user should do, appended to every error

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckedStore) and self.root == other.root and self.records == other.records

    __hash__ = LocalStore.__hash__

    def _record_of(self, key: str) -> tuple[str, str] | None:
        """(array, file relative to it) when `key` belongs to a recorded array."""
        for array in self.records:
            if key.startswith(array + "/"):
                return array, key[len(array) + 1:]
        return None

    def _refuse(self, array: str, relative: str, what: str):
        raise DamagedArrayError(f"{damage(Path(self.root), array, relative, what)}; {self.advice}")

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        found = self._record_of(key)
        if found is None:
            return await super().get(key, prototype, byte_range)
        if not self._is_open:
            await self._open()
        # Read and hash in a worker thread, as LocalStore reads: zarr fetches chunks concurrently, and
        # hashing in the event loop would serialise them.
        data = await asyncio.to_thread(self._read_checked, key, *found)
        if data is None:
            return None
        prototype = prototype or default_buffer_prototype()
        if byte_range is None:
            return prototype.buffer.from_bytes(data)
        return await super().get(key, prototype, byte_range)

    def _read_checked(self, key: str, array: str, relative: str) -> bytes | None:
        expected = self.records[array].get(relative)
        try:
            data = (Path(self.root) / key).read_bytes()  # whole file: the checksum covers all of it
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            data = None
        if expected is None:
            if data is None:
                return None  # a chunk of only fill values, never written: the fill value is right
            self._refuse(array, relative, "was not written by its stage")
        if data is None:
            self._refuse(array, relative, "is missing")
        if len(data) != expected[0]:
            self._refuse(array, relative, f"is {len(data):,} bytes, not {expected[0]:,} as recorded")
        if hashlib.sha256(data).hexdigest() != expected[1]:
            self._refuse(array, relative, "does not match its recorded sha256")
        return data


def check_files(store: str | os.PathLike, records: dict[str, dict[str, list]], hash_files: bool = True,
                on_file=None) -> list[str]:
    """Every difference between the arrays on disk and `records`, one line each. hash_files=False only
    compares which files exist and their sizes (what `retro info` does: a stat per file). on_file(bytes)
    is called after each recorded file (a progress bar)."""
    store = Path(store)
    problems = []
    for array, files in records.items():
        base = store / array
        on_disk = {f.relative_to(base).as_posix() for f in base.rglob("*") if _is_data_file(f)} \
            if base.is_dir() else set()
        for relative, (size, sha) in files.items():
            file = base / relative
            if relative not in on_disk:
                problems.append(damage(store, array, relative, "is missing"))
            elif file.stat().st_size != size:
                problems.append(damage(store, array, relative,
                                       f"is {file.stat().st_size:,} bytes, not {size:,} as recorded"))
            elif hash_files and file_sha256(file) != sha:
                problems.append(damage(store, array, relative, "does not match its recorded sha256"))
            if on_file is not None:
                on_file(size)
        for relative in sorted(on_disk - files.keys()):
            problems.append(damage(store, array, relative, "was not written by its stage"))
    return problems
