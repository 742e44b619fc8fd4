"""Staging directories: where a writer builds a new directory before renaming it into place.

A writer of OUT builds in `<parent>/.<name>.retro-partial`, a hidden sibling (one filesystem, so the
final os.replace is atomic), and the first file it writes there is the marker `.retro-staging` (JSON:
target, command, pid, host). A leftover of a killed run is deleted only when it carries the marker (or
holds nothing else); anything else at that path is refused in one line and left as it is. The staging
directory is never an input, and never holds one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from retrocli.artifacts import write_json_atomic
from retrocli.db import MANIFEST, remove_db_dir
from retrocli.errors import RetroError

SUFFIX = ".retro-partial"
MARKER = ".retro-staging"
MARKER_FORMAT = "retrocli-staging"


def resolved_target(target: str | os.PathLike) -> Path:
    """`target` with its parent resolved as the OS resolves it (symbolic links, then `..`), its own name
    kept: where the rename puts it, beside the writer lock (retrocli.lock names it the same way)."""
    target = Path(target)
    if target.name in ("", ".", ".."):
        return Path(os.path.realpath(target))
    return Path(os.path.realpath(target.parent)) / target.name


def staging_path(target: str | os.PathLike) -> Path:
    """The staging directory of `target`: `<parent>/.<name>.retro-partial`."""
    target = resolved_target(target)
    return target.with_name(f".{target.name}{SUFFIX}")


def _marker_target(path: Path) -> str | None:
    """The target a staging directory's marker names (None without a readable marker of ours)."""
    marker = path / MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("format") == MARKER_FORMAT:
        return str(record.get("target"))
    return None


def is_ours(path: Path, target: str | os.PathLike) -> bool:
    """A directory a writer of `target` staged: its marker names `target`, or it holds nothing but a
    marker that was being written when the run was killed. A marker naming another target is a directory
    moved here from elsewhere, not ours to delete."""
    if path.is_symlink() or not path.is_dir():
        return False
    marked = _marker_target(path)
    if marked is not None:
        return marked == str(resolved_target(target))
    return all(entry.name.startswith(MARKER) for entry in path.iterdir())


def is_replaceable(path: Path) -> bool:
    """What --overwrite may replace: a directory holding a DB manifest, or an empty directory."""
    return path.is_dir() and not path.is_symlink() and ((path / MANIFEST).exists() or not any(path.iterdir()))


def check_target(out: Path, overwrite: bool, option: str = "--out") -> None:
    """Refuse, before any work, an output that a writer would have to refuse after it: a symbolic link,
    an existing path without --overwrite, or one that --overwrite may not delete."""
    if out.is_symlink():
        raise RetroError(f"{option} {out}: is a symbolic link; pass the directory it points to")
    if out.exists() and not overwrite:
        raise RetroError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and not is_replaceable(out):
        raise RetroError(f"{out}: exists and is not a retro DB; refusing to overwrite it")


def _overlaps(staging: Path, item: str | os.PathLike) -> bool:
    """The staging directory is `item`, or `item` lies inside it (both resolved)."""
    guarded, resolved = Path(item).resolve(), staging.resolve()
    return guarded == resolved or resolved in guarded.parents


def begin_staging(target: str | os.PathLike, command: str, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """A fresh, empty staging directory for `target`, marked as ours. A leftover of ours is deleted first;
    anything else in the way, or an input at or under that path, is refused in one line, untouched."""
    staging = staging_path(target)
    for item in inputs:
        if _overlaps(staging, item):
            raise RetroError(f"{item}: lies in {staging}, where retro stages {target}; move it or choose "
                             "another output path")
    if staging.is_symlink() or staging.exists():
        if not is_ours(staging, target):
            marked = _marker_target(staging)
            why = "was not made by retro" if marked is None else f"was staged by retro for {marked}"
            raise RetroError(f"{staging}: is in the way of the staging directory for {target} and {why}; "
                             "move it away, it is left untouched")
        shutil.rmtree(staging)  # left by a run that was killed: nothing in it was ever visible as `target`
    try:
        staging.mkdir(parents=True)
    except FileExistsError:
        raise RetroError(f"{staging}: appeared while {target} was being staged; rerun the command") from None
    write_json_atomic(staging / MARKER, {"format": MARKER_FORMAT, "target": str(resolved_target(target)),
                                         "command": command, "pid": os.getpid(), "host": socket.gethostname(),
                                         "created": round(time.time(), 3)})
    return staging


def discard_staging(staging: Path, target: str | os.PathLike) -> None:
    """Delete a staging directory after a failure: only if it is still ours."""
    if is_ours(staging, target):
        shutil.rmtree(staging, ignore_errors=True)


def commit_staging(staging: Path, target: Path, remove_old: Callable[[Path], None] = remove_db_dir) -> None:
    """Rename the finished staging directory into place, replacing what `remove_old` may delete."""
    if target.exists() or target.is_symlink():
        remove_old(target)
    os.replace(staging, target)
    (target / MARKER).unlink(missing_ok=True)


@contextlib.contextmanager
def staged(target: str | os.PathLike, command: str, inputs: Sequence[str | os.PathLike] = (),
           remove_old: Callable[[Path], None] = remove_db_dir) -> Iterator[Path]:
    """Build `target` in its staging directory (the `with` body writes there), then rename it into place;
    any failure, in the body or the rename, deletes the staging directory and leaves `target` as it was."""
    target = resolved_target(target)
    staging = begin_staging(target, command, inputs)
    try:
        yield staging
        commit_staging(staging, target, remove_old)
    except BaseException:
        discard_staging(staging, target)
        raise
