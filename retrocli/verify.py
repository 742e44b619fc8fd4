"""`retro verify`: check a whole DB (or a kNN-LM datastore) against what its stages recorded, and
`stage_health` for `retro info`.

verify reads every file a command opens once: the tokenizer and each complete stage's zarr files against their
sha256, the metadata of the zarr groups that hold them, the index shards against theirs (and that they cover
the DB), the array shapes against the manifest's counts, and every added segment the same way. A file that is
there but cannot be read is reported as such, never as missing. Nothing is written. stage_health is the cheap
version `retro info` runs on every call: which files exist and their sizes (one stat each), so a deleted or
truncated chunk shows without reading the data; a changed byte of the same size needs verify (or the read that
meets it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from retrocli.checksums import check_files, check_groups, file_sha256, groups_of, unreadable
from retrocli.db import MANIFEST, STORE, TOKENIZER_FILE, content_id, read_manifest
from retrocli.errors import RetroError
from retrocli.index import check_shard_coverage, checked_shard_file, index_files
from retrocli.neighbor_arrays import NEIGHBOR_ARRAYS, NEIGHBORS_FORMAT, read_neighbors_manifest, store_name
from retrocli.progress import NullProgress, Progress


@dataclass
class StageCheck:
    stage: str
    status: str  # complete, running, damaged, unverified (complete but recorded no checksums)
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyResult:
    path: str
    ok: bool
    stages: list[StageCheck]
    seconds: float

    @property
    def problems(self) -> list[str]:
        return [p for stage in self.stages for p in stage.problems]

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "seconds": round(self.seconds, 3),
                "files": sum(s.files for s in self.stages), "bytes": sum(s.bytes for s in self.stages),
                "stages": [asdict(s) for s in self.stages], "problems": self.problems}


def _check_counts(db_path: Path, manifest: dict, files: dict) -> list[str]:
    """The recorded arrays' shapes against the manifest's counts (their zarr.json matched its checksum, so
    a mismatch here is a manifest edited after the stage, or a stage that recorded the wrong thing)."""
    # the base's own arrays: the counts less what added segments hold
    segments = manifest.get("segments", [])
    chunks = manifest["counts"]["chunks"] - sum(seg["chunks"] for seg in segments)
    docs = manifest["counts"]["documents"] - sum(seg["documents"] for seg in segments)
    m = manifest["chunk_size"]
    expected = {"chunks/tokens": [chunks, m], "chunks/length": [chunks], "chunks/doc": [chunks],
                "docs/chunk_offset": [docs + 1], "docs/file": [docs], "docs/position": [docs],
                "docs/external_id": [docs], "embeddings": [chunks, (manifest.get("embedder") or {}).get("dim")]}
    problems = []
    for name in files:
        meta = db_path / STORE / name / "zarr.json"
        try:
            shape = json.loads(meta.read_text(encoding="utf-8")).get("shape")
        except (OSError, ValueError, AttributeError) as err:
            problems.append(f"{meta}: unreadable array metadata ({err})")
            continue
        if name in expected and shape != expected[name]:
            problems.append(f"{meta}: shape {shape} does not match the manifest's counts {expected[name]}")
    return problems


def record_files(files: dict) -> int:
    """How many files a stage's `files` record ({array: {file: [bytes, sha256]}}) names."""
    return sum(len(entries) for entries in files.values())


def record_bytes(files: dict) -> int:
    """Their bytes, as recorded."""
    return sum(size for entries in files.values() for size, _ in entries.values())


def verify_path(path: str | os.PathLike, progress: Progress | None = None) -> VerifyResult:
    """`retro verify PATH` for a DB or batch neighbours, told apart by their manifest's format (a kNN-LM
    datastore: retrocli.datastore.verify_datastore; `artefact_format` tells which)."""
    if artefact_format(path) == NEIGHBORS_FORMAT:
        return verify_neighbors(path, progress)
    return verify_db(path, progress)  # says what is wrong with anything else


def artefact_format(path: str | os.PathLike) -> str | None:
    """The `format` a directory's manifest.json names, or None when there is no readable one."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def verify_db(path: str | os.PathLike, progress: Progress | None = None) -> VerifyResult:
    """Check every recorded file of the DB at `path` without opening its arrays through zarr. A DB whose
    manifest cannot be read at all raises RetroError; everything else is reported in the result."""
    progress = progress or NullProgress()
    started = time.time()
    db_path = Path(path)
    manifest = read_manifest(db_path)
    stages = manifest["stages"]
    complete = {name for name, rec in stages.items() if rec["status"] == "complete"}
    shards = index_files(manifest.get("index", {})) if "index" in complete else []
    total = sum(size for name in complete - {"index"} for arr in stages[name].get("files", {}).values()
                for size, _ in arr.values()) + sum(int(s["bytes"]) for s in shards)
    task = progress.start("verify", total=max(total, 1), unit="bytes")

    tokenizer = StageCheck("tokenizer", "complete", files=1)
    file = db_path / TOKENIZER_FILE
    try:
        tokenizer.bytes = file.stat().st_size
        if file_sha256(file) != manifest["tokenizer"]["sha256"]:
            tokenizer.problems.append(f"{file}: sha256 does not match the manifest")
    except OSError as err:
        tokenizer.problems.append(f"{file}: cannot read the DB's tokenizer ({err.strerror})")
    checks = [tokenizer]

    groups_checked: set[str] = set()  # the root group is checked once, with the first stage
    for stage, rec in stages.items():
        if stage not in complete:
            checks.append(StageCheck(stage, rec["status"]))
        elif stage == "index":
            checks.append(_verify_index(db_path, manifest, shards, task))
        elif "files" not in rec:
            checks.append(StageCheck(stage, "unverified", problems=[
                f"{db_path / MANIFEST}: stage {stage} records no checksums (written by an older retrocli); "
                f"rebuild the DB to verify it"]))
        else:
            files = rec["files"]
            problems = _check_groups_once(db_path / STORE, files, groups_checked) + \
                (check_files(db_path / STORE, files, on_file=task.advance) or _check_counts(db_path, manifest, files))
            checks.append(StageCheck(stage, "damaged" if problems else "complete",
                                     files=record_files(files), bytes=record_bytes(files), problems=problems))
    for record in manifest.get("segments", []):
        checks.append(_verify_segment(db_path, record))
    task.finish()
    return VerifyResult(str(db_path), not any(c.problems for c in checks), checks, time.time() - started)


def _check_groups_once(store: Path, files: dict, checked: set[str]) -> list[str]:
    """check_groups for the groups holding `files` that no earlier stage checked."""
    groups = [group for group in groups_of(files) if group not in checked]
    checked.update(groups)
    return check_groups(store, groups)


def _verify_segment(db_path: Path, record: dict) -> StageCheck:
    """An added segment: its manifest as the DB recorded it, then the segment checked as a DB of its own."""
    where = db_path / record["path"]
    check = StageCheck(f"segment {Path(record['path']).name}", "complete")
    try:
        digest = file_sha256(where / MANIFEST)
    except OSError as err:
        check.problems.append(f"{where / MANIFEST}: cannot read the segment's manifest ({err.strerror})")
        check.status = "damaged"
        return check
    if digest != record["manifest_sha256"]:
        check.problems.append(f"{where / MANIFEST}: does not match the checksum the DB recorded")
    else:
        try:
            inner = verify_db(where)
        except RetroError as err:
            inner = None
            check.problems.append(str(err))
        if inner is not None:
            check.problems.extend(inner.problems)
            check.files = sum(stage.files for stage in inner.stages)
            check.bytes = sum(stage.bytes for stage in inner.stages)
    check.status = "damaged" if check.problems else "complete"
    return check


def _verify_index(db_path: Path, manifest: dict, shards: list[dict], task) -> StageCheck:
    check = StageCheck("index", "complete", files=len(shards))
    try:
        check_shard_coverage(db_path, manifest)
    except RetroError as err:
        check.problems.append(str(err))
    check_shard_files(db_path, shards, check, task)
    return check


def check_shard_files(where: Path, shards: list[dict], check: StageCheck, task, rerun: str | None = None) -> None:
    """Hash every index shard of `where` against its record, adding each problem to `check` (and its
    bytes); a shard that cannot be read is 'cannot be read', like any other file."""
    for shard in shards:
        try:
            checked_shard_file(where, shard, cached=False, rerun=rerun)
        except RetroError as err:
            check.problems.append(str(err))
        except OSError as err:
            check.problems.append(f"{err.filename or where / shard['file']}: index shard {unreadable(err)}")
        check.bytes += int(shard["bytes"])
        task.advance(int(shard["bytes"]))
    check.status = "damaged" if check.problems else "complete"


def verify_neighbors(path: str | os.PathLike, progress: Progress | None = None) -> VerifyResult:
    """Check every file of a batch-neighbours directory: its manifest, the zarr files of `ids` and
    `distances` against their sha256 and their group's metadata. A manifest that cannot be read raises
    RetroError."""
    progress = progress or NullProgress()
    started = time.time()
    where = Path(path)
    manifest = read_neighbors_manifest(where)
    if manifest["status"] != "complete":
        return VerifyResult(str(where), False, [StageCheck("neighbors", str(manifest["status"]), problems=[
            f"{where}: batch neighbours are incomplete; rerun the same `retro neighbors` command"])],
            time.time() - started)
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(NEIGHBOR_ARRAYS):
        raise RetroError(f"{where / MANIFEST}: records no checksums for its arrays (an older retrocli); rerun "
                         "the same `retro neighbors` command with --overwrite")
    store = where / store_name(manifest)
    task = progress.start("verify", total=max(record_bytes(files), 1), unit="bytes")
    problems = check_groups(store, groups_of(files)) + check_files(store, files, on_file=task.advance)
    check = StageCheck("neighbors", "damaged" if problems else "complete", files=record_files(files),
                       bytes=record_bytes(files), problems=problems)
    task.finish()
    checks = [check, *_verify_query_db(where, manifest)]
    return VerifyResult(str(where), not any(c.problems for c in checks), checks, time.time() - started)


def _verify_query_db(where: Path, manifest: dict) -> list[StageCheck]:
    """The test set chunked inside the neighbours directory (a relative `query_db`), which commands open
    with them: verified as a DB, and still the content the neighbours were computed for. A query DB
    elsewhere is a DB of its own, verified by its own path."""
    recorded = manifest.get("query_db")
    if not isinstance(recorded, str) or not recorded or Path(recorded).is_absolute():
        return []
    query_path = where / recorded
    try:
        if where.resolve() not in query_path.resolve().parents:
            raise RetroError(f"{where / MANIFEST}: query_db '{recorded}' lies outside {where}")
        result = verify_db(query_path)
        queries = read_manifest(query_path)
    except RetroError as err:
        return [StageCheck("queries", "damaged", problems=[str(err)])]
    checks = [StageCheck(f"queries {c.stage}", c.status, c.files, c.bytes, c.problems) for c in result.stages]
    recorded_content = manifest.get("query_db_content")
    if queries.get("db_id") != manifest.get("query_db_id") or \
            (recorded_content is not None and recorded_content != content_id(queries)):
        checks.append(StageCheck("queries", "damaged", problems=[
            f"{query_path}: is not the DB these neighbours were computed for (its content differs); "
            f"rerun `retro neighbors` with --overwrite"]))
    return checks


def stage_health(db_path: Path, manifest: dict) -> dict[str, str]:
    """Each stage's status for `retro info`, with "damaged" for a complete stage whose recorded files are
    missing or of another size, and "complete (unverified)" for one that recorded none."""
    health = {}
    for stage, rec in manifest["stages"].items():
        status = rec["status"]
        if status == "complete" and stage == "index":
            try:
                check_shard_coverage(db_path, manifest)
                intact = all("sha256" in s and _size_of(db_path / s["file"]) == s["bytes"]
                             for s in index_files(manifest["index"]))
            except RetroError:
                intact = False
            status = "complete" if intact else "damaged"
        elif status == "complete" and "files" not in rec:
            status = "complete (unverified)"
        elif status == "complete" and check_files(db_path / STORE, rec["files"], hash_files=False):
            status = "damaged"
        health[stage] = status
    return health


def _size_of(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return -1
