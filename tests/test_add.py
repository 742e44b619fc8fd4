"""`retro add`: new documents become the DB's next ids, equal to a rebuild, committed whole or not at all."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrocli.add import PAUSE_ENV, add_documents
from retrocli.build_db import build_db
from retrocli.db import load_embeddings, open_db
from retrocli.errors import RetroError
from retrocli.index import ShardedIndex
from retrocli.neighbors import query_neighbors
from retrocli.options import EmbedOptions, NeighborOptions
from retrocli.verify import verify_db

RETRO = Path(sys.executable).with_name("retro")


@pytest.fixture(scope="module")
def parts(tmp_path_factory, small_jsonl):
    """The small corpus split in two files: A (8 documents) and B (the rest)."""
    where = tmp_path_factory.mktemp("parts")
    lines = small_jsonl.read_text().splitlines()
    (where / "a.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (where / "b.jsonl").write_text("\n".join(lines[8:]) + "\n")
    return where / "a.jsonl", where / "b.jsonl"


@pytest.fixture(scope="module")
def built_a(tmp_path_factory, parts, tiny_bert):
    path = tmp_path_factory.mktemp("a") / "db"
    build_db([parts[0]], path, embed_options=EmbedOptions(embedder=tiny_bert, block_size=16))
    return path


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory, parts, tiny_bert):
    """build-db(A then B): what an add of B to A must equal."""
    path = tmp_path_factory.mktemp("ab") / "db"
    build_db(list(parts), path, embed_options=EmbedOptions(embedder=tiny_bert, block_size=16))
    return open_db(path)


@pytest.fixture
def db_a(built_a, tmp_path):
    shutil.copytree(built_a, tmp_path / "db")
    return tmp_path / "db"


def assert_same_db(db, other):
    assert (db.num_docs, db.num_chunks) == (other.num_docs, other.num_chunks)
    assert np.array_equal(db.tokens_block(0, db.num_chunks)[0], other.tokens_block(0, other.num_chunks)[0])
    assert np.array_equal(db.chunk_length, other.chunk_length)
    assert np.array_equal(db.chunk_doc, other.chunk_doc) and np.array_equal(db.doc_offsets, other.doc_offsets)
    assert [db.source(d) for d in range(db.num_docs)] == [other.source(d) for d in range(other.num_docs)]
    assert [db.document_text(d) for d in range(db.num_docs)] == [other.document_text(d) for d in range(db.num_docs)]
    assert load_embeddings(db).tobytes() == load_embeddings(other).tobytes()


def recall_at(db, k=10):
    """HNSW's recall@k against exact search over the DB's own vectors, every chunk a query."""
    vectors = load_embeddings(db)
    found, _ = ShardedIndex(db, ef=16).search(vectors, k)
    exact = np.argsort(((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(-1), axis=1, kind="stable")[:, :k]
    return np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)])


def test_build_then_add_equals_building_both(db_a, parts, rebuilt):
    before = open_db(db_a)
    summary = add_documents(db_a, [parts[1]])
    db = open_db(db_a)
    assert summary["version"] == db.version == 2 and summary["first_doc"] == before.num_docs
    assert summary["first_chunk"] == before.num_chunks and summary["documents"] == db.num_docs - before.num_docs
    assert_same_db(db, rebuilt)
    # existing ids, chunks and files never moved: every file of version 1 is still there, byte for byte
    assert np.array_equal(db.tokens_block(0, before.num_chunks)[0], before.tokens_block(0, before.num_chunks)[0])
    assert verify_db(db_a).ok
    # exact search agrees (same vectors); HNSW's recall is within 0.005 of the rebuilt DB's
    assert abs(recall_at(db) - recall_at(rebuilt)) <= 0.005
    text = rebuilt.document_text(db.num_docs - 1)[:400]
    ours = query_neighbors(db, [text], k=3)[0][0].neighbors
    theirs = query_neighbors(rebuilt, [text], k=3)[0][0].neighbors
    assert [(n.id, n.source) for n in ours] == [(n.id, n.source) for n in theirs]
    assert ours[0].doc >= summary["first_doc"]  # the new text is found in the new documents


def test_cli_add_and_info(db_a, parts, cli):
    result = cli("add", db_a, parts[1], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    info = json.loads(cli("info", db_a, "--json").stdout)
    assert info["version"] == 2 and info["segments"] == 1 and info["counts"]["documents"] == 8 + summary["documents"]
    assert info["stages"] == {"chunk": "complete", "embed": "complete", "index": "complete"}
    # the same files again are refused: a rerun after a commit cannot add them twice
    again = cli("add", db_a, parts[1])
    assert again.exit_code == 2 and "is already in" in again.error_lines[0] and len(again.error_lines) == 1
    assert open_db(db_a).version == 2


def test_bad_input_is_one_line_and_commits_nothing(db_a, tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    manifest = (db_a / "manifest.json").read_bytes()
    result = cli("add", db_a, bad)
    assert result.exit_code == 2 and len(result.error_lines) == 1 and "bad.jsonl" in result.error_lines[0]
    assert (db_a / "manifest.json").read_bytes() == manifest
    inside = cli("add", db_a, db_a / "manifest.json")
    assert inside.exit_code == 2 and "lies inside the DB" in inside.error_lines[0]
    missing = cli("add", db_a, tmp_path / "nope.jsonl")
    assert missing.exit_code == 2 and "no such file" in missing.error_lines[0]


def test_add_needs_a_built_db(parts, tmp_path, tiny_bert):
    from retrocli.chunk import chunk_corpus

    chunk_corpus([parts[0]], tmp_path / "db")
    with pytest.raises(RetroError, match="is not fully built"):
        add_documents(tmp_path / "db", [parts[1]])


def _paused_add(db, inputs, step, marker):
    env = dict(os.environ, **{PAUSE_ENV: f"{step}:{marker}"})
    proc = subprocess.Popen([str(RETRO), "add", str(db), *map(str, inputs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the add never reached its pause point"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("step", ["chunk", "embed", "index", "commit"])
def test_kill_9_at_any_step_leaves_the_old_version_and_a_rerun_commits_the_new(db_a, parts, rebuilt, tmp_path,
                                                                                 step):
    old = open_db(db_a)
    proc = _paused_add(db_a, [parts[1]], step, tmp_path / "marker")
    # a reader while the add is under way sees version 1 whole, and can search it
    reader = open_db(db_a)
    assert (reader.version, reader.num_docs, reader.num_chunks) == (1, old.num_docs, old.num_chunks)
    assert query_neighbors(reader, ["words of a query"], k=2)[0][0].neighbors
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    after = open_db(db_a)
    assert (after.version, after.num_docs) == (1, old.num_docs) and verify_db(db_a).ok
    result = subprocess.run([str(RETRO), "add", str(db_a), str(parts[1])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert_same_db(open_db(db_a), rebuilt)
    assert open_db(db_a).version == 2 and verify_db(db_a).ok


def test_kill_9_in_the_middle_of_embedding_keeps_finished_blocks(db_a, parts, rebuilt):
    proc = subprocess.Popen([str(RETRO), "add", str(db_a), str(parts[1]), "--batch-size", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    manifest, deadline = db_a / "segments" / "00002" / "manifest.json", time.time() + 120
    done = []
    while time.time() < deadline and proc.poll() is None and not done:
        try:
            done = json.loads(manifest.read_text())["stages"]["embed"].get("done_blocks", [])
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if not done:
        pytest.skip("the add finished its embedding before it could be killed")
    assert open_db(db_a).version == 1
    add_documents(db_a, [parts[1]])
    assert_same_db(open_db(db_a), rebuilt)


def test_a_second_writer_is_refused_while_an_add_runs(db_a, parts, tmp_path, cli):
    proc = _paused_add(db_a, [parts[1]], "index", tmp_path / "marker")
    try:
        result = cli("remove", db_a, "--doc", "0")
        assert result.exit_code == 2 and "retro add" in result.error_lines[0], result.output
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert open_db(db_a).removed_docs == frozenset()


def test_a_segment_that_was_tampered_with_is_refused(db_a, parts):
    add_documents(db_a, [parts[1]])
    manifest = db_a / "segments" / "00002" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["counts"]["documents"] += 0  # same content, other bytes: the recorded checksum no longer matches
    manifest.write_text(json.dumps(data))
    with pytest.raises(RetroError, match="does not match the checksum the DB recorded"):
        open_db(db_a)
    assert not verify_db(db_a).ok


def test_stale_neighbours_are_refused_for_training(db_a, parts, tmp_path):
    from retrocli.batch_neighbors import batch_neighbors
    from retrocli.train import TrainOptions, train

    nb = batch_neighbors(db_a, [db_a], tmp_path / "nb", options=NeighborOptions(k=2, exclude_same_doc=True))
    add_documents(db_a, [parts[1]])
    with pytest.raises(RetroError, match="computed on version 1 of .*now at version 2"):
        train(db_a, nb, tmp_path / "m", TrainOptions(config="tiny", seq_len=128, steps=1), device="cpu")
    with pytest.raises(RetroError, match="holds neighbours of version 1 of .*now at version 2"):
        batch_neighbors(db_a, [db_a], nb, options=NeighborOptions(k=2, exclude_same_doc=True))


def test_update_recomputes_only_changed_rows_and_equals_a_full_recomputation(db_a, parts, tmp_path, cli):
    from retrocli.batch_neighbors import batch_neighbors
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.remove import remove_documents

    args = dict(options=NeighborOptions(k=2, exclude_same_doc=True, ef=512))  # ef above the DB's size: exact search
    nb = batch_neighbors(db_a, [db_a], tmp_path / "nb", **args)
    # a test set's rows
    test_nb = batch_neighbors(db_a, [parts[1]], tmp_path / "test-nb", options=NeighborOptions(k=3, ef=512))
    add_documents(db_a, [parts[1]])
    remove_documents(db_a, docs=[2])
    result = cli("neighbors", db_a, "--input", db_a, "--out", nb, "--k", "2", "--exclude-same-doc", "--ef", "512",
                 "--update", "--json")
    assert result.exit_code == 0, result.output
    update = json.loads(result.stdout)["update"]
    assert update["from_version"] == 1 and update["to_version"] == 3
    db = open_db(db_a)
    added = db.num_chunks - db.manifest["segments"][0]["first_chunk"]
    assert update["rows"] == db.num_chunks and added <= update["rows_recomputed"] < update["rows"], update
    full = batch_neighbors(db_a, [db_a], tmp_path / "full", **args)
    got, want = open_neighbors(nb), open_neighbors(full)
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.distances, want.distances)
    assert not np.isin(got.ids, np.flatnonzero(db.removed_chunks)).any()
    # the test set's neighbours follow too (what eval and leakage-report do with their work dirs)
    batch_neighbors(db_a, [parts[1]], test_nb, update=True, options=NeighborOptions(k=3, ef=512))
    fresh = batch_neighbors(db_a, [parts[1]], tmp_path / "test-full", options=NeighborOptions(k=3, ef=512))
    assert np.array_equal(open_neighbors(test_nb).ids, open_neighbors(fresh).ids)
    assert len(list(nb.glob("store*.zarr"))) == 1  # the old store is gone once the update is committed


def test_a_file_already_added_is_refused_under_any_other_name(db_a, parts, tmp_path, cli):
    # issue 35.3: `ln -s ../few.jsonl alias.jsonl; retro add DB alias.jsonl` added the documents twice
    assert cli("add", db_a, parts[1]).exit_code == 0
    manifest = (db_a / "manifest.json").read_bytes()
    (tmp_path / "names").mkdir()
    link = tmp_path / "names" / "alias.jsonl"
    link.symlink_to(parts[1])
    copy = shutil.copy(parts[1], tmp_path / "names" / "copy.jsonl")
    base_link = tmp_path / "names" / "base.jsonl"
    base_link.symlink_to(parts[0])  # a file of the built DB, not of the added segment
    for given, recorded in ((link, parts[1]), (copy, parts[1]), (base_link, parts[0])):
        result = cli("add", db_a, given)
        assert result.exit_code == 2 and len(result.error_lines) == 1, result.output
        assert f"{given}: is already in {db_a} (as {recorded})" in result.error_lines[0]
        assert "--allow-duplicates" in result.error_lines[0]
    assert (db_a / "manifest.json").read_bytes() == manifest
    # asked for, it is added again
    assert cli("add", db_a, copy, "--allow-duplicates").exit_code == 0
    assert open_db(db_a).version == 3


def test_a_writer_through_a_symlink_meets_the_lock_of_the_add(db_a, parts, tmp_path, cli):
    # issue 35.2: `retro add A new.jsonl & retro remove B --doc 0` (B -> A) both committed "version 2"
    alias = tmp_path / "alias"
    alias.symlink_to(db_a)
    proc = _paused_add(db_a, [parts[1]], "index", tmp_path / "marker")
    try:
        for name in (alias, db_a.parent / "." / ".." / db_a.parent.name / db_a.name):
            result = cli("remove", name, "--doc", "0")
            assert result.exit_code == 2 and "another writer holds the DB (retro add" in result.error_lines[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert open_db(db_a).removed_docs == frozenset() and open_db(db_a).version == 1


def test_a_file_whose_name_reads_like_an_escaped_byte_is_another_file(db_a, tmp_path, cli):
    # probe item 2: b'nu2.\xfe.jsonl' is recorded as 'nu2.\\xfe.jsonl'; a file literally named so is another file
    raw = tmp_path / os.fsdecode(b"nu2.\xfe.jsonl")
    raw.write_text(json.dumps({"text": "A file whose name holds a byte that is not UTF-8. " * 4}) + "\n")
    literal = tmp_path / "nu2.\\xfe.jsonl"
    literal.write_text(json.dumps({"text": "A file whose name holds a backslash, an x and two letters. " * 4}) + "\n")
    assert cli("add", db_a, raw).exit_code == 0
    result = cli("add", db_a, literal)
    assert result.exit_code == 0, result.output
    assert open_db(db_a).version == 3
    # each is still known again under its own name
    for given in (raw, literal):
        result = cli("add", db_a, given)
        assert result.exit_code == 2 and "is already in" in result.error_lines[0], result.output
