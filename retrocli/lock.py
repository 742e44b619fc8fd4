"""One writer per DB: a lock file beside the DB directory, `<parent>/.<name>.lock`.

Beside rather than inside, so it exists before `retro chunk` has made the DB, survives the rename of the
staging directory into place, and never changes a DB's own files. It is named after the DB's resolved
path (symbolic links, `..`), so every way of naming one directory meets the same lock. It holds the
writer's pid, the start time of that process, host and command as JSON, and appears whole or not at all.
A lock whose process is gone (same host: no such pid, a zombie, or a pid since reused by a process that
started at another time) is taken over, and the new writer says so; a live one, or one from another
host, refuses the second writer in one line. Only a regular file there is a lock: a directory or a
link at that path is the user's, refused in one line and left alone. Readers never take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from retrocli.errors import RetroError, is_disk_full
from retrocli.storage import is_synced_copy

# Two reads of one process's start time can differ by a clock tick, a pid reused after a kill by far more.
START_TIME_TOLERANCE_S = 1.0


def lock_path(db_path: str | os.PathLike) -> Path:
    path = Path(os.path.realpath(db_path))
    return path.with_name(f".{path.name}.lock")


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _running(holder: dict) -> bool:
    """The lock's process still runs: its pid exists, is not a zombie (killed, not yet reaped), and
    started when the lock says (not a later process that got the same pid)."""
    pid, started = holder.get("pid"), holder.get("started")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if isinstance(started, (int, float)) and abs(process.create_time() - started) > START_TIME_TOLERANCE_S:
            return False
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # exists, owned by someone else
        return True
    return True


def _read_holder(file: Path) -> dict | None:
    try:
        holder = json.loads(file.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # garbage (an older writer cut short by a full disk): treated as a dead holder below


def _say(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def _in_the_way(file: Path) -> str | None:
    """What sits at the lock path when it is not a lock file: retro only ever makes a regular file there,
    so a directory or a link is the user's, never a stale lock to move aside."""
    try:
        mode = os.lstat(file).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(file)}"
    return "a directory" if stat.S_ISDIR(mode) else "not a regular file"


def _cannot_lock(db_path, file: Path, err: OSError) -> RetroError:
    return RetroError(f"{db_path}: cannot take the writer lock {file} ({err.strerror or err}); writing this DB "
                      f"needs a writable {file.parent}")


def _write_lock_file(file: Path, content: str) -> bool:
    """Create `file` holding `content`, whole, only if it does not exist yet (False if it does). The
    content goes to a temp file first and is hard-linked into place, so no writer ever sees an empty or
    half-written lock, and a failed write (a full disk) leaves nothing behind."""
    fd, tmp = tempfile.mkstemp(prefix=f"{file.name}.new-", dir=file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, file)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, removed again if the write fails
            try:
                fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(content)
            except BaseException:
                file.unlink(missing_ok=True)
                raise
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def writer_lock(db_path: str | os.PathLike, command: str, notify: Callable[[str], None] = _say) -> Iterator[Path]:
    """Hold the DB's writer lock for the `with` body; refuse with one line if another writer holds it."""
    file = lock_path(db_path)
    me = {"pid": os.getpid(), "started": _start_time(os.getpid()), "host": socket.gethostname(),
          "command": command, "since": round(time.time(), 3)}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_lock(db_path, file, err) from None
    for _attempt in range(5):
        try:
            if _write_lock_file(file, json.dumps(me)):
                break
        except OSError as err:
            if is_disk_full(err):  # the CLI's out-of-space line, naming the lock
                raise OSError(err.errno, err.strerror, str(file)) from None
            raise _cannot_lock(db_path, file, err) from None
        if (what := _in_the_way(file)) is not None:
            raise RetroError(f"{db_path}: {file} is in the way of the writer lock ({what}); move it away, "
                             "it is left untouched")
        holder = _read_holder(file)
        if holder is None:
            continue  # released between our two looks: try again
        pid, host = holder.get("pid"), holder.get("host")
        if host not in (None, me["host"]) or (host == me["host"] and _running(holder)):
            where = f"pid {pid} on {host}" if host else f"pid {pid}"
            raise RetroError(
                f"{db_path}: another writer holds the DB ({holder.get('command', '?')}, {where}); wait for it "
                f"to finish{'' if host == me['host'] else f', or delete {file} if it is gone'}"
            )
        # gone: move its file aside (only one taker can win the rename), then create ours
        stale = file.with_name(f"{file.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(file, stale)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise _cannot_lock(db_path, file, err) from None
        stale.unlink(missing_ok=True)
        if not is_synced_copy(db_path):  # a copy of a DB on object storage: the store's lock said so, by URL
            notify(f"{db_path}: took over the lock of {holder.get('command', 'a writer')} (pid {pid}), "
                   "which is no longer running")
    else:
        raise RetroError(f"{db_path}: could not take the writer lock {file}; try again")
    try:
        yield file
    finally:
        held = _read_holder(file) or {}
        if (held.get("pid"), held.get("started")) == (me["pid"], me["started"]):
            file.unlink(missing_ok=True)


def holds_writer_lock(command: str, path_arg: str = "path"):
    """Decorate a stage function so it runs under the writer lock of the DB named by its `path_arg`."""
    import functools
    import inspect

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            target = signature.bind(*args, **kwargs).arguments[path_arg]
            with writer_lock(getattr(target, "path", target), command):  # an opened DB or a path
                return fn(*args, **kwargs)

        return wrapper

    return decorate
