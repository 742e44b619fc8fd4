"""What a stage wrote, recorded so that a missing or damaged zarr chunk is an error, never fill values.

zarr reads a chunk file that is not there as the array's fill value, so a deleted `chunks/tokens` chunk
reads as rows of token 0 and a deleted `embeddings` chunk as zero vectors, without a word. When a stage
completes it records every file of the arrays it wrote (the array's zarr.json and its chunk files) with
size and sha256 in the manifest. Readers open the store through `CheckedStore`, which compares each file
against that record as zarr fetches it: a recorded file that is missing, of another size or another
sha256, or a chunk file the stage never wrote, raises one line naming the array and the chunk. The group
metadata (zarr.json) of the store's root and of the groups holding recorded arrays is checked to be a
zarr group's as it is read: zarr would report a missing one as "no group found", naming no file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
from pathlib import Path

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from retrocli.errors import RetroError


def _is_data_name(name: str) -> bool:
    """A file zarr reads: not a temp file of a write that was interrupted (zarr writes `name.<hex>.partial`
    and renames it; a kill -9 can leave one behind)."""
    return not name.startswith(".") and not name.endswith(".partial")


def _is_data_file(file: Path) -> bool:
    return file.is_file() and _is_data_name(file.name)


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


def unreadable(err: OSError) -> str:
    """How a file that exists but cannot be read is described (never as "missing")."""
    reason = "permission denied" if isinstance(err, PermissionError) else (err.strerror or str(err))
    return f"cannot be read ({reason})"


def groups_of(records: dict[str, dict[str, list]]) -> list[str]:
    """The groups a reader opens to reach the recorded arrays: the root ('') and every array's parents."""
    groups = {""}
    for array in records:
        parts = array.split("/")[:-1]
        groups.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(groups)


def group_label(key: str) -> str:
    group = key.rsplit("/", 1)[0] if "/" in key else ""
    return f"metadata of group {group}" if group else "metadata of the store's root group"


def read_group_metadata(file: Path) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a zarr v3 group's zarr.json, else (None, what is wrong with it)."""
    try:
        data = file.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None, "is missing"
    except OSError as err:
        return None, unreadable(err)
    try:
        meta = json.loads(data)
    except ValueError:
        return None, "is not JSON"
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        return None, "is not a zarr v3 group's metadata"
    return data, None


def check_groups(store: str | os.PathLike, groups: list[str]) -> list[str]:
    """A line for each of these groups ('' the root) whose metadata is missing, unreadable or not a group's."""
    problems = []
    for group in groups:
        key = f"{group}/zarr.json" if group else "zarr.json"
        _, problem = read_group_metadata(Path(store) / key)
        if problem:
            problems.append(f"{Path(store) / key}: {group_label(key)} {problem}")
    return problems


class CheckedStore(LocalStore):
    """A read-only LocalStore that checks each file of a recorded array against its record when it is read.

    `records` is {array: {relative file: [bytes, sha256]}}; arrays not in it are read unchecked (a stage
    still running, or a DB written before checksums were recorded). A file is hashed each time zarr fetches
    it: a chunk is fetched once per read and hashing runs at several hundred MB/s, well ahead of zstd."""

    def __init__(self, root: str | os.PathLike, records: dict[str, dict[str, list]], advice: str):
        super().__init__(root, read_only=True)
        self.records = records
        self.advice = advice  # what the user should do, appended to every error
        # zarr reads a missing group's metadata as "no such group": the store's root group and those
        # holding recorded arrays must be there and be groups
        self.group_keys = {f"{group}/zarr.json" if group else "zarr.json" for group in groups_of(records)}

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
        if key in self.group_keys:
            if not self._is_open:
                await self._open()
            data = await asyncio.to_thread(self._read_group, key)
            return (prototype or default_buffer_prototype()).buffer.from_bytes(data)
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

    def _read_group(self, key: str) -> bytes:
        file = Path(self.root) / key
        data, problem = read_group_metadata(file)
        if problem:
            raise DamagedArrayError(f"{file}: {group_label(key)} {problem}; {self.advice}")
        return data

    def _read_checked(self, key: str, array: str, relative: str) -> bytes | None:
        expected = self.records[array].get(relative)
        try:
            data = (Path(self.root) / key).read_bytes()  # whole file: the checksum covers all of it
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            data = None
        except OSError as err:
            self._refuse(array, relative, unreadable(err))
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


def _list_files(base: Path) -> tuple[set[str], list[str]]:
    """The data files under base (relative paths) and the directories that could not be listed."""
    found, unlisted = set(), []

    def note(err: OSError) -> None:
        if not isinstance(err, (FileNotFoundError, NotADirectoryError)):
            unlisted.append(err.filename)

    for folder, _dirs, names in os.walk(base, onerror=note):
        found.update((Path(folder) / name).relative_to(base).as_posix() for name in names if _is_data_name(name))
    return found, unlisted


def check_files(store: str | os.PathLike, records: dict[str, dict[str, list]], hash_files: bool = True,
                on_file=None) -> list[str]:
    """Every difference between the arrays on disk and `records`, one line each. hash_files=False only
    compares which files exist and their sizes (what `retro info` does: a stat per file). on_file(bytes)
    is called after each recorded file (a progress bar). A file or directory that is there but cannot be
    read says so, never "missing"."""
    store = Path(store)
    problems = []
    for array, files in records.items():
        base = store / array
        on_disk, unlisted = _list_files(base)
        for folder in unlisted:
            problems.append(f"{folder}: directory of array {array} cannot be read (permission denied)")
        for relative, (size, sha) in files.items():
            file = base / relative
            try:
                found = file.stat()
                if not stat.S_ISREG(found.st_mode):
                    problems.append(damage(store, array, relative, "is missing"))
                elif found.st_size != size:
                    problems.append(damage(store, array, relative,
                                           f"is {found.st_size:,} bytes, not {size:,} as recorded"))
                elif hash_files and file_sha256(file) != sha:
                    problems.append(damage(store, array, relative, "does not match its recorded sha256"))
            except (FileNotFoundError, NotADirectoryError):
                problems.append(damage(store, array, relative, "is missing"))
            except OSError as err:
                if not any(Path(folder) in file.parents for folder in unlisted):  # said once for the folder
                    problems.append(damage(store, array, relative, unreadable(err)))
            if on_file is not None:
                on_file(size)
        for relative in sorted(on_disk - files.keys()):
            problems.append(damage(store, array, relative, "was not written by its stage"))
    return problems
