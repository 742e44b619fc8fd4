"""DBs on object storage (`s3://bucket/db`, `gs://…`, any fsspec URL): worked on through a local mirror.

A command given a DB URL works on a copy of the DB in the cache directory the user names (`--cache-dir`
or RETRO_CACHE_DIR; never a hidden default): `<cache>/<protocol>/<bucket>/<key…>`, the URL made canonical
first (`s3://b//db/` is `s3://b/db`; `.` and `..` are refused). Beside the copy, `.<name>.retro-fetched.json`
records for each cached file the version tag the store listed when it was fetched or uploaded (its ETag)
and the local file's size, mtime and inode then. Opening fetches every file whose store tag or local
stamp differs from that record (index shards also when their sha256 differs from the manifest's, so
hnswlib never sees a damaged shard). Readers then check every file as they do locally.

Readers and a writer may share a cache. A writer holds an flock on `.<name>.retro-writer.lock` beside its
copy for as long as it works on it; a reader brings the copy up to date only while it can take that lock
itself (serialised with other readers by `.<name>.retro-pull.lock`), else it reads the writer's copy as
it is: every manifest the writer writes there is committed to the store at once, and the reader leaves
the writer's uncommitted files alone.

Object stores have no rename, so a change is committed the way one object store PUT allows: every new
or changed file is uploaded first, the manifest last. A PUT replaces an object whole, so a reader sees
the old manifest or the new one, never half; the files the old one names do not change (the DB's own
rule). Files a change deleted are deleted from the store after the new manifest is up. Each manifest
write of a stage (every finished embedding block, every index shard) is such a commit, so a build
killed on one machine resumes on another from what was uploaded.

One writer at a time: beside the DB the store holds `.<name>.lock`, created with a conditional PUT
(If-None-Match), which fails when the object exists; it holds the writer's pid, host and command like
the local lock, and a dead holder on the same host is taken over with a warning naming the URL (the
local lock of the cache copy then takes over silently: one warning, never a cache path).

On Dask, a worker never touches that copy: it keeps a partial mirror in its own cache
(`<cache>/partial/…`) with only what its tasks read (Mirror.pull_partial), uploads the block or shard it
writes, and the writer fetches that file into its copy before committing the manifest that names it.

Credentials and endpoints come from the environment as fsspec's backends read them (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, …).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from retrocli.errors import RetroError

CACHE_ENV = "RETRO_CACHE_DIR"
MANIFEST = "manifest.json"
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.+)$")
# typer/pathlib turn `s3://b/k` into `s3:/b/k`: recognised and restored. Schemes are case-insensitive
# (`S3://`), and written in lower case from there on.
_ANY_CASE_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.+)$", re.IGNORECASE)
_COLLAPSED = re.compile(r"^([a-z][a-z0-9+.-]*):/([^/].*)$", re.IGNORECASE)
# The bulk of a DB, fetched by a worker's partial copy only for the rows it works on: embedding and token
# chunks (zarr v3 keys `<array>/c/<row chunk>/<column chunk>`).
_BULK_DATA = re.compile(r"^(?P<array>(?:.*/)?(?:embeddings|chunks/tokens))/c/(?P<row>\d+)(?:/|$)")
# Under the cache directory: the partial copies Dask workers make (kept apart from full mirrors, which a
# worker sharing this machine's cache must never overwrite).
PARTIAL_DIR = "partial"


def as_location(value: str | os.PathLike) -> str:
    """The user's DB or input argument as a string: a URL with its `//` restored, or a local path."""
    text = os.fspath(value)
    collapsed = _COLLAPSED.match(text)
    if collapsed and not Path(text).exists():
        text = f"{collapsed.group(1)}://{collapsed.group(2)}"
    if url := _ANY_CASE_URL.match(text):
        text = f"{url.group(1).lower()}://{url.group(2)}"
    if text.startswith("file://"):
        return text[len("file://"):]
    return text


def is_url(value: str | os.PathLike) -> bool:
    return _URL.match(as_location(value)) is not None


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:
        raise RetroError("object storage needs fsspec: pip install 'retrocli[s3]'") from None
    protocol = _URL.match(url).group(1)
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise RetroError(f"{url}: no filesystem for {protocol}:// ({err}); for s3:// pip install s3fs") from None
    return fs, root.rstrip("/")


def cache_dir_for(url: str, cache_dir: str | os.PathLike | None) -> Path:
    chosen = cache_dir or os.environ.get(CACHE_ENV)
    if not chosen:
        raise RetroError(f"{url}: a DB on object storage needs --cache-dir DIR (or {CACHE_ENV}) for its local copy")
    return Path(chosen)


def canonical_url(url: str) -> str:
    """One name per location, for the cache, the lock and every key: `s3://b//db/` is `s3://b/db`. A `.` or
    `..` is refused rather than resolved (a store has no directories for it to walk through)."""
    protocol, rest = _URL.match(url).groups()
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise RetroError(f"{url}: not a DB location (empty, or with . or .. in its path)")
    return f"{protocol}://{'/'.join(parts)}"


def mirror_path(url: str, cache_dir: str | os.PathLike, partial: bool = False) -> Path:
    """Where the URL's DB lives in the cache: <cache>/<protocol>/<bucket>/<key…> of its canonical URL; a
    worker's partial copy under <cache>/partial/…"""
    protocol, rest = _URL.match(canonical_url(url)).groups()
    return Path(cache_dir, *((PARTIAL_DIR,) if partial else ())) / protocol / Path(*rest.split("/"))


# Local copies -> the URL they mirror (both the path as given and absolute), so that what the user is
# shown about a DB on object storage names its URL, not this machine's cache.
_SHOWN: dict[str, str] = {}


def shown(text) -> str:
    """Text for the user with each local copy's path replaced by its URL; a URL that pathlib collapsed
    (`s3:/b/db`) restored."""
    text = as_location(text) if isinstance(text, os.PathLike) else str(text)
    for local in sorted(_SHOWN, key=len, reverse=True):
        if local in text:
            text = re.sub(rf"(?<![\w.-]){re.escape(local)}(?![\w.-])", lambda _m, u=_SHOWN[local]: u, text)
    return text


def _is_synced_file(relative: str) -> bool:
    """Files of a DB that travel: not temp files of an interrupted write (`.x.partial`, `.manifest.json.*`)."""
    name = relative.rsplit("/", 1)[-1]
    return not name.startswith(".") and not name.endswith(".partial")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _download_file(fs, remote: str, target: Path, name: str) -> None:
    """One object to a local file, through a temporary name: an interrupted fetch leaves no half file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        fs.get_file(remote, str(tmp))
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RetroError(f"{name}: cannot fetch ({err})") from None


def _stamp(path: Path) -> list[int]:
    """What tells a local file changed since it was recorded: size, mtime and inode (a fetch or a rewrite
    replaces the inode)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _write_atomic(path: Path, data: bytes) -> None:
    """A file of the cache appears whole or not at all (db.write_json_atomic sits a layer above this one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RetroError(f"{path}: cannot write the local copy ({err.strerror or err})") from None


@contextlib.contextmanager
def _flock(file: Path, mode: int) -> Iterator[bool]:
    """An flock on `file` (created if missing) for the body; yields False when LOCK_NB found it taken.
    The kernel drops it when the process dies, so a killed command leaves no stale lock."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(file, "a+b")  # held for the body
    except OSError as err:
        raise RetroError(f"{file}: cannot lock the cache copy ({err.strerror or err})") from None
    with handle:
        try:
            fcntl.flock(handle, mode)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Mirror:
    """One DB URL and its local copy; `pull` fetches, `push` commits local changes (manifest last).
    A partial mirror (a Dask worker's) holds only what its tasks read: see pull_partial.

    `record` ({relative file: {"tag": store version tag, "stamp": local stamp}}) says which cached files
    equal the store's: a file is trusted only while both the store's tag and its own stamp are unchanged.
    It is saved beside the copy; a lost update (two processes saving at once) only costs a fetch."""

    def __init__(self, url: str, cache_dir: str | os.PathLike | None, partial: bool = False):
        self.url = canonical_url(url)
        self.fs, self.root = _filesystem(self.url)
        self.local = mirror_path(self.url, cache_dir_for(self.url, cache_dir), partial)
        self.record: dict[str, dict] = {}
        if not partial:
            _SHOWN[str(self.local)] = _SHOWN[os.path.abspath(self.local)] = self.url

    def _beside(self, suffix: str) -> Path:
        return self.local.with_name(f".{self.local.name}.{suffix}")

    # -- what the store holds ---------------------------------------------------------------------------
    def _remote_files(self) -> dict[str, str]:
        """{relative file: version tag} of the DB's objects in the store."""
        self.fs.invalidate_cache()  # another writer may have committed since this process last listed
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise RetroError(f"{self.url}: cannot list the store ({err})") from None
        prefix = self.root + "/"
        return {path[len(prefix):]: _version_tag(info) for path, info in found.items()
                if path.startswith(prefix) and _is_synced_file(path[len(prefix):])}

    def _stored_tag(self, relative: str) -> str:
        key = f"{self.root}/{relative}"
        self.fs.invalidate_cache(key)
        try:
            return _version_tag(self.fs.info(key))
        except OSError as err:
            raise RetroError(f"{self.url}/{relative}: cannot read from the store ({err})") from None

    def _remote_manifest(self) -> tuple[bytes, dict] | None:
        """The store's manifest, read before anything else is fetched: None when there is none."""
        try:
            data = self.fs.cat_file(f"{self.root}/{MANIFEST}")
        except FileNotFoundError:
            return None
        except OSError as err:
            raise RetroError(f"{self.url}/{MANIFEST}: cannot read from the store ({err})") from None
        try:
            manifest = json.loads(data)
        except ValueError as err:
            raise RetroError(f"{self.url}/{MANIFEST}: unreadable manifest ({err})") from None
        if not isinstance(manifest, dict):
            raise RetroError(f"{self.url}/{MANIFEST}: unreadable manifest (not a JSON object)")
        return data, manifest

    def _not_a_db(self) -> RetroError:
        return RetroError(f"{self.url}: not a retro DB (no {MANIFEST} in the store); build one with `retro chunk`")

    @staticmethod
    def _shard_checksums(manifest: dict | None) -> dict[str, str]:
        shards = (manifest or {}).get("index", {}).get("shards", [])
        return {s.get("file"): s.get("sha256") for s in shards if isinstance(s, dict)}

    # -- the local copy and its record --------------------------------------------------------------------
    def _local_files(self) -> dict[str, Path]:
        if not self.local.is_dir():
            return {}
        return {f.relative_to(self.local).as_posix(): f for f in sorted(self.local.rglob("*"))
                if f.is_file() and not f.is_symlink() and _is_synced_file(f.relative_to(self.local).as_posix())}

    def _load_record(self) -> None:
        try:
            record = json.loads(self._beside("retro-fetched.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        self.record = {rel: entry for rel, entry in record.items() if isinstance(entry, dict)} \
            if isinstance(record, dict) else {}

    def _save_record(self) -> None:
        self.local.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self._beside("retro-fetched.json"), json.dumps(dict(sorted(self.record.items()))).encode())

    def _unchanged(self, relative: str) -> bool:
        """The local file is as it was when recorded (fetched or uploaded)."""
        try:
            stamp = _stamp(self.local / relative)
        except OSError:
            return False
        return self.record.get(relative, {}).get("stamp") == stamp

    def _current(self, relative: str, tag: str, shard_sha: dict[str, str]) -> bool:
        """The cached file equals the store's object that carries `tag`."""
        if self.record.get(relative, {}).get("tag") != tag or not self._unchanged(relative):
            return False
        return relative not in shard_sha or _sha256(self.local / relative) == shard_sha[relative]

    def _fetch(self, relative: str, tag: str) -> None:
        """Download one file; `tag` is the store's tag read before the download, so a change racing it
        only makes the record name an older tag and the file is fetched again next time."""
        self._download(relative)
        self.record[relative] = {"tag": tag, "stamp": _stamp(self.local / relative)}

    def _fetch_stale(self, remote: dict[str, str], shard_sha: dict[str, str]) -> None:
        """Download each file (not the manifest) that is not current: see `_current`."""
        try:
            for relative, tag in remote.items():
                if relative != MANIFEST and not self._current(relative, tag, shard_sha):
                    self._fetch(relative, tag)
        finally:
            self._save_record()  # what was fetched stays recorded, also after an error

    def _write_manifest(self, data: bytes, tag: str | None) -> None:
        """The manifest the store gave, byte for byte (segments pin manifests by sha256), written last."""
        target = self.local / MANIFEST
        _write_atomic(target, data)
        if tag is not None:
            self.record[MANIFEST] = {"tag": tag, "stamp": _stamp(target)}

    # -- bringing the copy up to date ---------------------------------------------------------------------
    def pull(self) -> Path:
        """For a reader: the store's current version in the local copy. Nothing is copied from a location
        that holds no manifest. While a writer in this cache works on the copy, the copy is read as the
        writer keeps it (its manifests are the store's), and nothing in it is changed."""
        with _flock(self._beside("retro-pull.lock"), fcntl.LOCK_EX), \
                _flock(self._beside("retro-writer.lock"), fcntl.LOCK_EX | fcntl.LOCK_NB) as no_writer:
            if not no_writer:
                if not (self.local / MANIFEST).is_file():
                    raise self._not_a_db()
                return self.local
            stored = self._remote_manifest()
            if stored is None:
                raise self._not_a_db()
            self._sync(stored)
        return self.local

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """For the writer, under the store's writer lock: hold the copy against readers sharing this cache,
        and bring it to the store's state, files only the copy has removed (an interrupted run's leftovers,
        or a version the store no longer has)."""
        with _flock(self._beside("retro-writer.lock"), fcntl.LOCK_EX):
            self._sync(self._remote_manifest())
            yield self.local

    def _sync(self, stored: tuple[bytes, dict] | None) -> None:
        self._load_record()
        remote = self._remote_files()
        if not remote:  # no DB there (yet): nor here, so a new DB can be written
            if self.local.is_dir() and not self.local.is_symlink():
                shutil.rmtree(self.local)
            self.record = {}
            self._save_record()
            return
        self._fetch_stale(remote, self._shard_checksums(stored[1] if stored else None))
        for relative, path in self._local_files().items():
            if relative not in remote:
                path.unlink()
                self.record.pop(relative, None)
        if stored is not None:  # last: a local reader sees it only with every file it names
            self._write_manifest(stored[0], remote.get(MANIFEST))
        self.record = {rel: entry for rel, entry in self.record.items() if rel in remote}
        self._save_record()

    def pull_partial(self, shards: set[int] = frozenset(), rows: dict[str, tuple[int, int]] | None = None) -> Path:
        """What one worker's tasks read, and nothing more: the manifest, the DB's small arrays and metadata,
        the index shards numbered in `shards`, and of the bulk arrays (embeddings, chunk tokens) only the
        zarr chunks holding rows [start, stop) of `rows` ({array path in the DB: (start, stop)}). Nothing
        local is removed (other tasks of this worker may be reading it)."""
        stored = self._remote_manifest()
        if stored is None:
            raise self._not_a_db()
        self._load_record()
        remote = self._remote_files()
        manifest = stored[1]
        shard_sha = self._shard_checksums(manifest)
        owned = {s.get("file") for s in manifest.get("index", {}).get("shards", [])
                 if isinstance(s, dict) and s.get("shard") in shards}
        small = {rel: tag for rel, tag in remote.items()
                 if (rel in owned if rel in shard_sha else not _BULK_DATA.search(rel))}
        self._fetch_stale(small, shard_sha)  # first: the arrays' zarr.json say how many rows a chunk holds
        bulk = {}
        for relative, tag in remote.items():
            found = _BULK_DATA.search(relative)
            if found and found.group("array") in (rows or {}):
                start, stop = rows[found.group("array")]
                per_chunk = self._rows_per_chunk(found.group("array"))
                first = int(found.group("row")) * per_chunk
                if first < stop and first + per_chunk > start:
                    bulk[relative] = tag
        self._fetch_stale(bulk, shard_sha)
        self._write_manifest(stored[0], remote.get(MANIFEST))
        self._save_record()
        return self.local

    def _rows_per_chunk(self, array: str) -> int:
        try:
            meta = json.loads((self.local / array / "zarr.json").read_text())
            return int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            raise RetroError(f"{self.url}/{array}/zarr.json: unreadable array metadata ({err})") from None

    # -- sending changes to the store --------------------------------------------------------------------
    def _put(self, relative: str) -> None:
        """Upload one file of the copy and record the tag the store gave it, with the file's stamp from
        before the upload (a change during it shows as changed next time)."""
        stamp = _stamp(self.local / relative)
        try:
            self.fs.put_file(str(self.local / relative), f"{self.root}/{relative}")
        except OSError as err:
            raise RetroError(f"{self.url}/{relative}: cannot upload ({err})") from None
        self.record[relative] = {"tag": self._stored_tag(relative), "stamp": stamp}

    def upload(self, relatives: list[str]) -> None:
        """Put these files of the local copy into the store (a worker's finished block or shard). The
        manifest never goes this way: only the writer commits it."""
        for relative in relatives:
            if relative == MANIFEST:
                raise ValueError("the manifest is committed by the writer, not uploaded by a worker")
            self._put(relative)
        self._save_record()

    def _download(self, relative: str) -> None:
        _download_file(self.fs, f"{self.root}/{relative}", self.local / relative, f"{self.url}/{relative}")

    def adopt(self, relative: str) -> None:
        """Fetch a file a worker put into the store, recorded as equal to the store's."""
        self._fetch(relative, self._stored_tag(relative))

    def push(self) -> None:
        """Upload what changed since it was fetched or last uploaded, the manifest last; then delete from the
        store what the copy no longer has."""
        local = self._local_files()
        changed = [rel for rel in local if not self._unchanged(rel)]
        try:
            for relative in sorted(changed, key=lambda r: r == MANIFEST):
                self._put(relative)
            for relative in sorted(set(self.record) - local.keys()):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(f"{self.root}/{relative}")
                del self.record[relative]
        finally:
            self._save_record()

    # -- the writer lock, beside the DB in the store ----------------------------------------------------
    @property
    def lock_key(self) -> str:
        parent, _, name = self.root.rpartition("/")
        return f"{parent}/.{name}.lock"

    @contextlib.contextmanager
    def writer_lock(self, command: str) -> Iterator[None]:
        if "/" not in self.root:  # the bucket itself: no place beside it for the lock
            protocol = _URL.match(self.url).group(1)
            raise RetroError(f"{self.url}: a DB on object storage is written under a name inside the bucket "
                             f"({protocol}://{self.root.strip('/')}/NAME), not as the bucket itself")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": round(time.time(), 3)}
        body = json.dumps(me).encode()
        for _attempt in range(3):
            try:
                self.fs.pipe_file(self.lock_key, body, mode="create")
                break
            except FileExistsError:
                try:
                    holder = json.loads(self.fs.cat_file(self.lock_key))
                except FileNotFoundError:
                    continue
                except (OSError, ValueError):
                    holder = {}
                pid, host = holder.get("pid"), holder.get("host")
                if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(self.lock_key)
                    sys.stderr.write(f"warning: {self.url}: took over the lock of {holder.get('command', 'a writer')} "
                                     f"(pid {pid}), which is no longer running\n")
                    continue
                raise RetroError(
                    f"{self.url}: another writer holds the DB ({holder.get('command', '?')}, pid {pid} on {host}); "
                    f"wait for it to finish, or delete {self._lock_url()} if it is gone"
                ) from None
        else:
            raise RetroError(f"{self.url}: could not take the writer lock {self._lock_url()}; try again")
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.fs.cat_file(self.lock_key)).get("pid") == me["pid"]:
                    self.fs.rm_file(self.lock_key)

    def _lock_url(self) -> str:
        protocol = _URL.match(self.url).group(1)
        return f"{protocol}://{self.lock_key}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Local copies being written: each change committed under one of them goes up to its store at once.
_SYNCED: dict[Path, Mirror] = {}


def is_synced_copy(path: str | os.PathLike) -> bool:
    """`path` is the local copy of a DB on object storage being written here (under the store's lock)."""
    return Path(os.path.abspath(path)) in _SYNCED


def push_synced_copy(db_path: str | os.PathLike) -> None:
    """Upload a committed change of the DB at db_path to its store, when it is the local copy of a DB on
    object storage being written here (under the store's lock); nothing for a local DB."""
    mirror = _SYNCED.get(Path(os.path.abspath(db_path)))
    if mirror is not None:
        mirror.push()


# Local copies of DB URLs in this process -> (URL, cache directory): so that Dask workers can be sent the URL
# and fetch what they need into their own cache, instead of a path that exists only on this machine.
_ORIGINS: dict[str, tuple[str, str]] = {}


def origin_of(path: str | os.PathLike) -> tuple[str, str] | None:
    """(URL, cache directory) of a DB's local copy made here, or None for a DB that is a local path."""
    return _ORIGINS.get(os.path.abspath(path))


def fetch_db(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path to read a DB location at: itself, or for a URL its mirror, brought up to date."""
    text = as_location(location)
    if not is_url(text):
        return Path(text)
    mirror = Mirror(text, cache_dir)
    path = mirror.pull()
    _ORIGINS[os.path.abspath(path)] = (mirror.url, str(cache_dir_for(text, cache_dir)))
    return path


def worker_mirror(url: str, cache_dir: str | os.PathLike | None) -> Mirror:
    """On a Dask worker: the partial mirror of a DB URL. The worker's own RETRO_CACHE_DIR, when set, wins
    over the client's --cache-dir path (which need not exist on the worker's machine)."""
    return Mirror(url, os.environ.get(CACHE_ENV) or cache_dir, partial=True)


def fetch_for_search(url: str, cache_dir: str | os.PathLike | None, shards: set[int]) -> Path:
    """On a Dask worker: the partial copy of a DB URL holding what searching index shards `shards` needs."""
    return worker_mirror(url, cache_dir).pull_partial(shards=shards)


def task_location(path: str | os.PathLike) -> str | tuple[str, str]:
    """What a Dask task is given to reach a DB: the local path, or for the copy of a DB URL made here
    (URL, cache directory), so that the worker reads and writes the store itself and needs no filesystem
    shared with this machine."""
    return origin_of(path) or str(path)


def adopt_uploaded(path: str | os.PathLike, relatives: list[str]) -> None:
    """On the writer, for files a worker has put into the store (a block, a shard): fetch them into this
    copy, marked as already pushed, so the manifest about to be committed names only files the store and
    this copy both hold."""
    mirror = _SYNCED.get(Path(os.path.abspath(path)))
    if mirror is None:
        raise RetroError(f"{path}: not a DB copy being written here; cannot take the workers' uploads")
    for relative in relatives:
        mirror.adopt(relative)
    mirror._save_record()


@contextlib.contextmanager
def local_db(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
             write: str | None = None) -> Iterator[Path]:
    """The local path to work on for a DB location. For a URL: its pulled mirror; with `write` (the
    command, for the lock) the store's writer lock is held and every change committed (db.commit_manifest)
    goes up to the store, and a last push runs when the body ends (also after an error: what finished is kept)."""
    text = as_location(location)
    if not is_url(text):
        yield Path(text)
        return
    if write is None:
        yield fetch_db(text, cache_dir)
        return
    mirror = Mirror(text, cache_dir)
    with mirror.writer_lock(write), mirror.writing() as path:
        key = Path(os.path.abspath(path))
        _SYNCED[key] = mirror
        _ORIGINS[str(key)] = (mirror.url, str(cache_dir_for(text, cache_dir)))
        try:
            yield path
        finally:
            _SYNCED.pop(key, None)
            if path.exists():
                mirror.push()


# Corpus files fetched from object storage: the local copy's root -> the URL it came from. Sources and the
# DB's file list name the URL, so a DB built from `s3://…` inputs does not record one machine's cache path.
FETCHED_ROOTS: dict[str, str] = {}
_FETCHED_CACHES: dict[str, str] = {}  # the same roots -> the cache directory they were fetched into


def fetched_origin(path: str | os.PathLike) -> tuple[str, str] | None:
    """(URL, cache directory) of a corpus file fetched from object storage here, or None for a local one:
    what a Dask task is given so that its worker fetches the file into its own cache."""
    text = os.path.abspath(os.fspath(path))
    for root, url in FETCHED_ROOTS.items():
        if text.startswith(root + os.sep):
            return url + text[len(root):].replace(os.sep, "/"), _FETCHED_CACHES[root]
    return None


def source_name(path: str | os.PathLike) -> str:
    """The name a corpus file is recorded under: its absolute path, or the URL it was fetched from."""
    if _URL.match(os.fspath(path)):
        return os.fspath(path)
    text = os.path.abspath(os.fspath(path))
    for root, url in FETCHED_ROOTS.items():
        if text == root or text.startswith(root + os.sep):
            return url + text[len(root):].replace(os.sep, "/")
    return text


INPUTS_RECORD = ".retro-fetched.json"


def _version_tag(info: dict) -> str:
    """What identifies one version of a stored object: its ETag (S3, GCS) or, failing that, size and mtime."""
    for key in ("ETag", "etag", "md5Hash", "md5"):
        if info.get(key):
            return str(info[key]).strip('"')
    return f"{info.get('size')}:{info.get('LastModified') or info.get('mtime') or info.get('updated')}"


def fetch_input(url: str, cache_dir: str | os.PathLike | None) -> Path:
    """A corpus or test-set URL (one object, or a prefix holding many) copied into the cache at the same
    place a DB would go. An object already fetched is kept while its ETag is unchanged; each download lands
    under a temporary name first, so an interrupted fetch never leaves a half file under a real name."""
    url = canonical_url(url)
    fs, root = _filesystem(url)
    target = mirror_path(url, cache_dir_for(url, cache_dir))
    fs.invalidate_cache()
    try:
        single = fs.isfile(root)
        if single:
            found = {root: fs.info(root)}
            files = {target.name: root}
            target = target.parent
        else:
            found = fs.find(root, detail=True)
            files = {path[len(root) + 1:]: path for path in found if path.startswith(root + "/")}
    except OSError as err:
        raise RetroError(f"{url}: cannot list the store ({err})") from None
    files = {rel: path for rel, path in files.items() if _is_synced_file(rel) and rel != INPUTS_RECORD}
    if not files:
        raise RetroError(f"{url}: no such object or prefix in the store")
    for relative in files:
        if any(part in (".", "..") for part in relative.split("/")):
            raise RetroError(f"{url}/{relative}: a stored name with . or .. is not fetched")
    record_file = target / INPUTS_RECORD
    try:
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    except (OSError, ValueError):
        record = {}
    for relative, path in sorted(files.items()):
        tag = _version_tag(found[path])
        local = target / relative
        size = int(found[path].get("size") or 0)
        if record.get(relative) == tag and local.is_file() and local.stat().st_size == size:
            continue
        _download_file(fs, path, local, f"{url}/{relative}")
        record[relative] = tag
        tmp_record = record_file.with_name(f".{INPUTS_RECORD}.{os.getpid()}.partial")
        tmp_record.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp_record, record_file)
    FETCHED_ROOTS[os.path.abspath(target)] = url.rsplit("/", 1)[0] if single else url
    _SHOWN[str(target)] = _SHOWN[os.path.abspath(target)] = FETCHED_ROOTS[os.path.abspath(target)]
    _FETCHED_CACHES[os.path.abspath(target)] = str(cache_dir_for(url, cache_dir))
    return target / next(iter(files)) if single else target


def local_inputs(inputs, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Corpus, test-set or query inputs as local paths: a URL of a DB (it holds a manifest.json) becomes
    its pulled mirror, any other URL its fetched copy in the cache; a local path stays as it is."""
    paths = []
    for value in inputs:
        text = as_location(value)
        if not is_url(text):
            paths.append(Path(text))
            continue
        fs, root = _filesystem(text)
        try:
            is_db = fs.isfile(f"{root}/{MANIFEST}")
        except OSError as err:
            raise RetroError(f"{text}: cannot reach the store ({err})") from None
        paths.append(fetch_db(text, cache_dir) if is_db else fetch_input(text, cache_dir))
    return paths
