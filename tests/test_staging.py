"""Staging directories: named beside the real output, marked as ours, never anything else deleted."""

import re

import pytest

from retrocli.errors import RetroError
from retrocli.staging import MARKER, begin_staging, staged, staging_path


def test_the_staging_directory_lies_beside_where_the_output_really_goes(tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    # `link/../out` is real/out for the OS (the link first, then `..`), not a lexical ./out
    assert staging_path(tmp_path / "link" / ".." / "out") == tmp_path / "real" / ".out.retro-partial"
    with staged(tmp_path / "link" / ".." / "out", "test") as where:
        (where / "file").write_text("x")
    assert (tmp_path / "real" / "out" / "file").read_text() == "x" and not (tmp_path / "out").exists()
    assert not (tmp_path / "real" / "out" / MARKER).exists()


def test_only_a_marked_or_empty_leftover_is_replaced(tmp_path):
    target = tmp_path / "out"
    first = begin_staging(target, "test")
    (first / "half-written").write_text("x")
    assert begin_staging(target, "test") == first and list(first.iterdir()) == [first / MARKER]
    (first / MARKER).unlink()
    (first / "half-written").write_text("x")  # no marker: not ours
    with pytest.raises(RetroError, match="was not made by retro"):
        begin_staging(target, "test")
    assert (first / "half-written").exists()


def test_a_failure_in_the_body_leaves_the_old_output_and_no_staging_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "manifest.json").write_text("{}")
    with pytest.raises(RuntimeError), staged(target, "test") as where:
        (where / "new").write_text("x")
        raise RuntimeError("disk full")
    assert (target / "manifest.json").exists() and not staging_path(target).exists()


def test_a_marked_leftover_staged_for_another_target_is_refused_and_kept(tmp_path):
    # probe item L4: a marker naming /tmp/other/Z, moved to Y's staging path with a user's file, was deleted
    other = begin_staging(tmp_path / "other" / "Z", "retro chunk")
    (other / "data.txt").write_text("mine")
    moved = staging_path(tmp_path / "Y")
    other.rename(moved)
    with pytest.raises(RetroError, match=re.escape(f"was staged by retro for {tmp_path / 'other' / 'Z'}; move it")):
        begin_staging(tmp_path / "Y", "retro chunk")
    assert (moved / "data.txt").read_text() == "mine"
