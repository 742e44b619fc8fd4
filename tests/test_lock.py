"""The writer lock: one name per DB directory, a holder that is really gone is taken over, and the lock
file appears whole or not at all."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest
from test_integrity import FILL, run_on_small_disk

from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.lock import lock_path, writer_lock


def test_every_name_of_one_directory_meets_the_same_lock(tmp_path):
    # issue 35.2: the lock was named after the path as typed, so `B -> A` had a lock of its own
    (tmp_path / "A").mkdir()
    (tmp_path / "B").symlink_to("A")
    (tmp_path / "x").mkdir()
    names = [tmp_path / "A", tmp_path / "B", tmp_path / "x" / ".." / "A", Path(os.path.relpath(tmp_path / "B"))]
    assert {lock_path(name) for name in names} == {tmp_path / ".A.lock"}
    with writer_lock(tmp_path / "A", "retro add"):
        with pytest.raises(RetroError, match=r"another writer holds the DB \(retro add"):
            with writer_lock(tmp_path / "B", "retro remove"):
                pass
    assert not (tmp_path / ".A.lock").exists()


def _hold(db: Path, pid: int, started: float | None) -> None:
    record = {"pid": pid, "host": socket.gethostname(), "command": "retro remove", "since": 0}
    if started is not None:
        record["started"] = started
    lock_path(db).write_text(json.dumps(record))


def test_a_killed_but_unreaped_holder_does_not_hold_the_lock(tiny_db_copy, retro_proc):
    # issue 35.17: right after a kill -9 the holder is a zombie until reaped, and os.kill(pid, 0) still works
    child = subprocess.Popen(["sleep", "60"])
    try:
        _hold(tiny_db_copy, child.pid, psutil.Process(child.pid).create_time())
        child.send_signal(signal.SIGKILL)
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            pass
        result = retro_proc("remove", tiny_db_copy, "--doc", "0")
        assert result.exit_code == 0 and "took over the lock" in result.stderr, result.output
    finally:
        child.kill()
        child.wait()
    assert open_db(tiny_db_copy).removed_docs == {0} and not lock_path(tiny_db_copy).exists()


def test_a_pid_reused_by_another_process_does_not_hold_the_lock(tiny_db_copy, retro_proc):
    me = psutil.Process()
    _hold(tiny_db_copy, me.pid, me.create_time())  # this very process: alive, started when the lock says
    held = retro_proc("remove", tiny_db_copy, "--doc", "0")
    assert held.exit_code == 2 and "another writer holds the DB" in held.stderr, held.output
    _hold(tiny_db_copy, me.pid, me.create_time() - 3600)  # same pid, but the holder started an hour earlier
    result = retro_proc("remove", tiny_db_copy, "--doc", "0")
    assert result.exit_code == 0 and "took over the lock" in result.stderr, result.output
    assert open_db(tiny_db_copy).removed_docs == {0}


def test_a_garbage_lock_file_does_not_block_the_next_writer(tiny_db_copy, cli):
    for content in ("", "{not json", "[1, 2]"):
        lock_path(tiny_db_copy).write_text(content)
        assert cli("remove", tiny_db_copy, "--doc", "0").exit_code == 0
        assert not lock_path(tiny_db_copy).exists()


def test_a_full_disk_leaves_no_lock_file(tmp_path, tiny_db):
    # issue 35.17: a remove that hit a full disk left an empty lock file
    steps = run_on_small_disk(tmp_path, f'''
cp -r {tiny_db} "$DISK/db"
{FILL}step full "$RETRO" remove "$DISK/db" --doc 0
ls -a "$DISK" > "$OUT/after-full.txt"
rm "$DISK/filler"
step rerun "$RETRO" remove "$DISK/db" --doc 0
ls -a "$DISK" > "$OUT/after-rerun.txt"
''', SIZE="8m", LEAVE=0)
    rc, err = steps["full"]
    assert rc == 2 and "no space left on device" in err and "Traceback" not in err, err
    assert (tmp_path / "out" / "after-full.txt").read_text().split() == [".", "..", "db", "filler"]
    rc, err = steps["rerun"]
    assert rc == 0 and "took over" not in err, err
    assert (tmp_path / "out" / "after-rerun.txt").read_text().split() == [".", "..", "db"]


def test_a_parent_directory_that_is_not_writable_is_one_line(tiny_db, small_jsonl):
    # issue 35.15: PermissionError traceback on the lock in add/remove
    from conftest import run_retro

    user = None
    if os.geteuid() == 0:  # root writes anywhere: run as an unprivileged user
        if shutil.which("setpriv") is None:
            pytest.skip("running as root (permission bits do not apply) and setpriv is not available")
        user = 65534
    work = Path(tempfile.mkdtemp(prefix="retro-lock-"))
    try:
        db = work / "db"
        shutil.copytree(tiny_db, db)
        new = shutil.copy(small_jsonl, work / "new.jsonl")
        work.chmod(0o755 if user is not None else 0o555)  # readable, writable by its owner (root) only
        if run_retro("--help", user=user, cwd=work).exit_code != 0:
            pytest.skip("the unprivileged user cannot run the venv's retro script")
        manifest = (db / "manifest.json").read_bytes()
        for args in (("remove", db, "--doc", "0"), ("add", db, new)):
            result = run_retro(*args, user=user, cwd=work)
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output
            assert result.stderr.strip().startswith(f"error: {db}: cannot take the writer lock {work / '.db.lock'}")
            assert "needs a writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert (db / "manifest.json").read_bytes() == manifest
    finally:
        work.chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)


def test_a_directory_or_a_link_at_the_lock_path_is_one_line_and_left_untouched(tiny_db_copy, cli):
    # probe item 1: a directory there was renamed aside (.lock.stale-…) and then unlink() was a traceback;
    # a dangling link made every run say "try again"
    lock = lock_path(tiny_db_copy)
    lock.mkdir()
    (lock / "f").write_text("mine")
    result = cli("remove", tiny_db_copy, "--doc", "2")
    assert result.exit_code == 2 and result.exception is None, result.output
    assert result.error_lines == [f"error: {tiny_db_copy}: {lock} is in the way of the writer lock (a directory); "
                                  "move it away, it is left untouched"]
    assert (lock / "f").read_text() == "mine" and not list(lock.parent.glob("*.stale-*"))
    shutil.rmtree(lock)
    lock.symlink_to("/nonexistent/x")
    result = cli("remove", tiny_db_copy, "--doc", "2")
    assert result.exit_code == 2 and "(a symbolic link to /nonexistent/x)" in result.error_lines[0], result.output
    assert lock.is_symlink() and open_db(tiny_db_copy).removed_docs == set()
