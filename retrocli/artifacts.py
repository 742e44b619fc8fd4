"""The files retro writes and reads back: one set of rules for every artefact (a DB, batch neighbours, a
kNN-LM datastore, a model directory).

- Writes are atomic: a temp file beside the target, fsync, rename; a reader or a kill -9 never sees half
  a file.
- A manifest is read through `read_manifest_file`: readable UTF-8 JSON, an object, its `format`, its
  `format_version` (a positive integer no newer than this retrocli reads), then its fields against a schema
  (field -> (type, required)), so that no command meets a wrong type later.
- Output paths are checked against the inputs they must not overwrite before any work.

Nothing here uploads: committing a DB to object storage is an explicit step (retrocli.db.commit_manifest).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from retrocli.errors import RetroError

MANIFEST = "manifest.json"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so a reader (or a kill -9) never sees half a file: temp file, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:  # a write that failed (full disk) names no file: name the one we meant
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """A report file appears whole or not at all."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)  # never a user's file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest_file(file: Path, what: str, format_name: str | None = None, reads_up_to: int = 1,
                       schema: dict | None = None, not_this_kind: str | None = None) -> dict:
    """The JSON object in `file` (a `what`, e.g. "neighbours manifest"), checked in this order: readable,
    an object, field 'format' equal to format_name (None: no format field), field 'format_version' a
    positive integer ≤ reads_up_to (a newer one asks for an upgrade), then `schema`'s fields. Each refusal
    is one line naming the file; not_this_kind says what a wrong format means (e.g. "not a retro DB")."""
    try:
        record = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RetroError(f"{file}: unreadable {what} ({err})") from None
    if not isinstance(record, dict):
        raise RetroError(f"{file}: {not_this_kind or what + ' must be a JSON object'}")
    if format_name is not None:
        if record.get("format") != format_name:
            raise RetroError(f"{file}: {not_this_kind or 'not a ' + what} (field 'format' is not '{format_name}')")
        version = record.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise RetroError(f"{file}: field 'format_version' must be a positive integer, not {version!r}")
        if version > reads_up_to:
            raise RetroError(f"{file}: format_version {version} was written by a newer retrocli "
                             f"(this one reads up to {reads_up_to}); upgrade retrocli")
    if schema is not None:
        check_fields(file, record, schema)
    return record


_KIND_NAMES = {int: "an integer", str: "a string", dict: "an object", list: "a list"}
_AT_LEAST_ONE = ("chunk_size", "dim")  # fields for which 0 is impossible


def check_fields(file: Path, record: dict, schema: dict, where: str = "") -> None:
    """Raise one line naming the first field of `record` that `schema` (field -> (type, required)) refuses.
    A nested schema is a dict in place of the type; integers are never negative."""
    for key, (kind, required) in schema.items():
        name = f"{where}{key}"
        if key not in record:
            if required:
                raise RetroError(f"{file}: field '{name}' is missing")
            continue
        value = record[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise RetroError(f"{file}: field '{name}' must be an object, not {value!r}")
            check_fields(file, value, kind, f"{name}.")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RetroError(f"{file}: field '{name}' must be {_KIND_NAMES[kind]}, not {value!r}")
        elif kind is int and value < (1 if key in _AT_LEAST_ONE else 0):
            raise RetroError(f"{file}: field '{name}' must be {'≥ 1' if key in _AT_LEAST_ONE else '≥ 0'}, "
                             f"not {value}")


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


def check_files_record(file: Path, files: object, where: str) -> None:
    """A stage's record of what it wrote: {array: {relative file: [bytes, sha256]}}, every name a plain
    relative path (no `..`, nothing absolute), so that checking it never looks outside the store."""
    if not isinstance(files, dict):
        raise RetroError(f"{file}: field '{where}' must be an object")
    for array, entries in files.items():
        if not _SAFE_NAME.fullmatch(array) or ".." in array.split("/") or not isinstance(entries, dict):
            raise RetroError(f"{file}: field '{where}' names an unsafe array or has the wrong shape: {array!r}")
        for relative, entry in entries.items():
            if not _SAFE_NAME.fullmatch(relative) or ".." in relative.split("/"):
                raise RetroError(f"{file}: field '{where}.{array}' names an unsafe file: {relative!r}")
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                    and not isinstance(entry[0], bool) and entry[0] >= 0 and isinstance(entry[1], str)):
                raise RetroError(f"{file}: field '{where}.{array}.{relative}' must be [bytes, sha256]")


def check_outside(out: str | os.PathLike, protected: str | os.PathLike, option: str, what: str = "the input DB",
                  may_be_inside: bool = False) -> None:
    """Refuse, before any work, an output path that is `protected`, lies inside it or contains it. Both
    sides are resolved first (`..`, symbolic links), so DB/../DB or a link to the DB is caught too.
    may_be_inside: a new DB may sit inside a corpus directory (it is only read), never replace it."""
    target, guarded = Path(out).resolve(), Path(protected).resolve()
    if target == guarded:
        relation = "is"
    elif guarded in target.parents and not may_be_inside:
        relation = "is inside"
    elif target in guarded.parents:
        relation = "contains"
    else:
        return
    raise RetroError(f"{option} {out}: {relation} {what} {protected}; choose a path outside it")
