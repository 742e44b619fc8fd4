"""One writer per DB: a lock file beside the DB directory, `<parent>/.<name>.lock`.

Beside rather than inside, so it exists before `retro chunk` has made the DB, survives the rename of
<out>.partial into place, and never changes a DB's own files. It holds the writer's pid, host and
command as JSON. A lock whose process is dead (same host) is taken over, and the new writer says so;
a live one, or one from another host, refuses the second writer in one line. Readers never take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from retrocli.errors import RetroError


def lock_path(db_path: str | os.PathLike) -> Path:
    path = Path(os.path.abspath(db_path))
    return path.with_name(f".{path.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(file: Path) -> dict | None:
    try:
        holder = json.loads(file.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or garbage: treated as a dead holder below


def _say(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


@contextlib.contextmanager
def writer_lock(db_path: str | os.PathLike, command: str, notify: Callable[[str], None] = _say) -> Iterator[Path]:
    """Hold the DB's writer lock for the `with` body; refuse with one line if another writer holds it."""
    file = lock_path(db_path)
    file.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": round(time.time(), 3)}
    for _attempt in range(5):
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(file)
            if holder is None:
                continue  # released between our two looks: try again
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and _alive(pid) or (host not in (None, me["host"])):
                where = f"pid {pid} on {host}" if host else f"pid {pid}"
                raise RetroError(
                    f"{db_path}: another writer holds the DB ({holder.get('command', '?')}, {where}); wait for it "
                    f"to finish{'' if host == me['host'] else f', or delete {file} if it is gone'}"
                ) from None
            # dead holder: move its file aside (only one taker can win the rename), then create ours
            stale = file.with_name(f"{file.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(file, stale)
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
            notify(f"{db_path}: took over the lock of {holder.get('command', 'a writer')} (pid {pid}), "
                   "which is no longer running")
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    else:
        raise RetroError(f"{db_path}: could not take the writer lock {file}; try again")
    try:
        yield file
    finally:
        if (_read_holder(file) or {}).get("pid") == me["pid"]:
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
            with writer_lock(target, command):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
