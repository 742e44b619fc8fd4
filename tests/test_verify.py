"""`retro verify` checks every file a command opens (the zarr groups' metadata too, in the base and in every
segment), and a file that is there but cannot be read is "cannot be read", never "missing"."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import run_retro
from helpers import tree_snapshot


def _problems(report) -> list[str]:
    return json.loads(report.stdout)["problems"]


@pytest.mark.parametrize("group, message", [
    ("store.zarr/zarr.json", "metadata of the store's root group is missing"),
    ("store.zarr/chunks/zarr.json", "metadata of group chunks is missing"),
    ("store.zarr/docs/zarr.json", "metadata of group docs is missing"),
])
def test_a_deleted_group_metadata_file_is_found_by_verify(tiny_db_copy, cli, group, message):
    (tiny_db_copy / group).unlink()
    report = cli("verify", tiny_db_copy, "--json")
    assert report.exit_code == 1 and _problems(report) == [f"{tiny_db_copy / group}: {message}"], report.output


def test_a_root_group_that_is_not_a_group_is_one_line_naming_the_file(tiny_db_copy, cli):
    root = tiny_db_copy / "store.zarr" / "zarr.json"
    root.write_text('{"zarr_format": 3, "node_type": "array"}')
    result = cli("neighbors", tiny_db_copy, "--query", "some text")
    assert result.exit_code == 2 and result.exception is None, result.output
    assert result.error_lines == [f"error: {root}: metadata of the store's root group is not a zarr v3 group's "
                                  f"metadata; the DB is damaged; `retro verify {tiny_db_copy}` lists every problem"]
    root.unlink()
    result = cli("info", tiny_db_copy)
    assert result.exit_code == 2 and result.error_lines[0].startswith(f"error: {root}: metadata of the store's root "
                                                                       "group is missing")
    assert not cli("verify", tiny_db_copy).exit_code == 0


def test_a_segments_group_metadata_is_checked_too(tiny_db_copy, small_jsonl, tmp_path, cli):
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": f"An added document number {i}. " * 40}) + "\n" for i in range(3)))
    assert cli("add", tiny_db_copy, extra).exit_code == 0
    assert cli("verify", tiny_db_copy).exit_code == 0
    segment_root = next((tiny_db_copy / "segments").iterdir()) / "store.zarr" / "zarr.json"
    segment_root.unlink()
    report = cli("verify", tiny_db_copy, "--json")
    assert report.exit_code == 1 and _problems(report) == [
        f"{segment_root}: metadata of the store's root group is missing"], report.output
    result = cli("neighbors", tiny_db_copy, "--query", "some text")
    assert result.exit_code == 2 and len(result.error_lines) == 1 and str(segment_root) in result.error_lines[0]


@pytest.fixture
def unprivileged(tiny_db):
    """A copy of tiny_db in a directory the unprivileged user 65534 can reach, and a runner as that user.
    Root reads whatever the mode bits say, so an unreadable folder has to be tried by another user."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to run `retro` as another user (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("running as root (permission bits do not apply) and setpriv is not available")
    work = Path(tempfile.mkdtemp(prefix="retro-verify-perm-"))
    work.chmod(0o777)
    db = work / "db"
    shutil.copytree(tiny_db, db)
    for path in [db, *db.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    run = lambda *args: run_retro(*args, user=65534, cwd=work)  # noqa: E731
    probe = run("--help")
    if probe.exit_code != 0:
        shutil.rmtree(work)
        pytest.skip(f"the unprivileged user cannot run the venv's retro script: {probe.stderr[:200]}")
    yield db, run
    for path in [db, *db.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(work, ignore_errors=True)


def test_an_unreadable_folder_is_cannot_read_not_missing(unprivileged):
    db, run = unprivileged
    before = tree_snapshot(db)
    embeddings = db / "store.zarr" / "embeddings"
    embeddings.chmod(0)
    report = run("verify", db, "--json")
    assert report.exit_code == 1 and "Traceback" not in report.output, report.output
    assert _problems(report) == [f"{embeddings}: directory of array embeddings cannot be read (permission denied)"]
    info = run("info", db, "--json")
    assert info.exit_code == 0 and "Traceback" not in info.output, info.output
    assert json.loads(info.stdout)["stages"]["embed"] == "damaged"
    embeddings.chmod(0o755)

    tokens = db / "store.zarr" / "chunks" / "tokens"
    tokens.chmod(0)
    report = run("verify", db)
    assert report.exit_code == 1 and "Traceback" not in report.output and "missing" not in report.output
    assert f"{tokens}: directory of array chunks/tokens cannot be read (permission denied)" in report.stderr
    info = run("info", db)
    assert info.exit_code == 2 and "Traceback" not in info.output, info.output
    assert info.error_lines[0].startswith(f"error: {tokens}/zarr.json: zarr.json of array chunks/tokens cannot be "
                                          "read (permission denied)")
    tokens.chmod(0o755)

    shard = next((db / "index").glob("*.hnsw"))
    shard.chmod(0)
    report = run("verify", db, "--json")
    assert report.exit_code == 1 and _problems(report) == [f"{shard}: index shard cannot be read (permission denied)"]
    shard.chmod(0o644)
    assert tree_snapshot(db) == before


def test_verify_takes_batch_neighbours_and_names_a_damaged_file(self_neighbors, tmp_path, cli):
    nb = tmp_path / "nb"
    shutil.copytree(self_neighbors, nb)
    before = tree_snapshot(nb)
    report = cli("verify", nb, "--json")
    assert report.exit_code == 0 and json.loads(report.stdout)["ok"], report.output
    assert tree_snapshot(nb) == before  # verify only reads
    chunk = next((nb / "store.zarr" / "distances" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (nb / "store.zarr" / "zarr.json").unlink()
    report = cli("verify", nb, "--json")
    problems = _problems(report)
    assert report.exit_code == 1 and len(problems) == 2, report.output
    assert "root group is missing" in problems[0] and "does not match its recorded sha256" in problems[1]


def test_verify_of_batch_neighbours_checks_the_query_db_inside_them(tiny_db, planted, tmp_path, cli):
    # probe item 3: a flipped byte in NB/queries, or NB/queries deleted, passed `retro verify NB`
    built = tmp_path / "built"
    assert cli("neighbors", tiny_db, "--input", planted, "--out", built).exit_code == 0
    report = cli("verify", built, "--json")
    assert report.exit_code == 0 and any(s["stage"] == "queries chunk" for s in json.loads(report.stdout)["stages"])

    nb = tmp_path / "flipped"
    shutil.copytree(built, nb)
    chunk = nb / "queries" / "store.zarr" / "chunks" / "tokens" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = _problems(cli("verify", nb, "--json"))
    assert len(problems) == 1 and f"{chunk}: " in problems[0] and "sha256" in problems[0], problems

    nb = tmp_path / "gone"
    shutil.copytree(built, nb)
    shutil.rmtree(nb / "queries")
    report = cli("verify", nb, "--json")
    assert report.exit_code == 1 and str(nb / "queries") in _problems(report)[0], report.output

    nb = tmp_path / "other"  # a query DB of other content under the same id
    shutil.copytree(built, nb)
    manifest = json.loads((nb / "manifest.json").read_text())
    manifest["query_db_content"] = "0" * 64
    (nb / "manifest.json").write_text(json.dumps(manifest))
    problems = _problems(cli("verify", nb, "--json"))
    assert problems == [f"{nb / 'queries'}: is not the DB these neighbours were computed for (its content differs); "
                        f"rerun `retro neighbors` with --overwrite"]
