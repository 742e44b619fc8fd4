import json
import shutil

import numpy as np
import pytest
from helpers import tree_snapshot

from retrocli.batch_neighbors import batch_neighbors
from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.neighbor_arrays import open_neighbors
from retrocli.neighbors import query_neighbors
from retrocli.options import NeighborOptions


def test_query_returns_db_text_with_its_continuation(tiny_db):
    db = open_db(tiny_db)
    target = 3
    result = query_neighbors(db, [db.chunk_text(target)], k=2)
    chunk = result[0][0]
    top = chunk.neighbors[0]
    assert top.id == target and top.distance == pytest.approx(0.0, abs=1e-3)
    assert top.continuation_id == target + 1 and top.continuation == db.chunk_text(target + 1)
    assert top.source == db.source(db.doc_of(target))
    assert len(chunk.neighbors) == 2


def test_continuation_is_none_at_document_end(tiny_db):
    db = open_db(tiny_db)
    last = db.doc_chunks(0).stop - 1
    result = query_neighbors(db, [db.chunk_text(last)], k=1)
    nb = result[0][0].neighbors[0]
    assert nb.id == last and nb.continuation is None and nb.continuation_id is None
    assert db.continuation(last) is None and db.continuation(last - 1) == last


def test_multi_chunk_query_and_exclude_same_doc(tiny_db):
    db = open_db(tiny_db)
    doc = 1
    chunks = db.doc_chunks(doc)
    text = db.chunk_text(chunks.start) + db.chunk_text(chunks.start + 1)
    plain = query_neighbors(db, [text], k=3)[0]
    assert len(plain) >= 2 and plain[0].neighbors[0].doc == doc
    excluded = query_neighbors(db, [text], k=3, exclude_same_doc=True)[0]
    for chunk in excluded:
        assert len(chunk.neighbors) == 3
        assert all(nb.doc != doc for nb in chunk.neighbors)


def test_query_errors(tiny_db):
    db = open_db(tiny_db)
    with pytest.raises(RetroError, match="larger than the DB"):
        query_neighbors(db, ["x"], k=db.num_chunks + 1)
    with pytest.raises(RetroError, match="empty"):
        query_neighbors(db, ["   "], k=1)
    with pytest.raises(RetroError, match="no query"):
        query_neighbors(db, [], k=1)


def test_cli_neighbors_json_and_table_leave_db_untouched(tiny_db, cli, tmp_path):
    before = tree_snapshot(tiny_db)
    db = open_db(tiny_db)
    result = cli("neighbors", tiny_db, "--query", db.chunk_text(5), "--k", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["chunks"][0]["neighbors"][0]["id"] == 5
    assert data["chunks"][0]["neighbors"][0]["continuation"] == db.chunk_text(6)
    qfile = tmp_path / "q.txt"
    qfile.write_text("first query about lists\n\nsecond query about dictionaries\n")
    result = cli("neighbors", tiny_db, "--query-file", qfile, "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == ["first query about lists", "second query about dictionaries"]
    result = cli("neighbors", tiny_db, "--query", "lists and tuples")
    assert result.exit_code == 0 and "continuation" in result.stdout
    assert tree_snapshot(tiny_db) == before


@pytest.mark.parametrize("args, message", [
    (["--query", "x", "--k", "100000"], "larger than the DB"),
    (["--query", " "], "empty"),
    ([], "no query"),
    (["--query", "x", "--embedder", "bert-base-uncased"], "does not match"),
    (["--input", "nowhere"], "both --input and --out"),
])
def test_cli_bad_input(tiny_db, cli, args, message):
    result = cli("neighbors", tiny_db, *args)
    assert result.exit_code != 0 and result.exception is None
    assert message in result.output and len(result.error_lines) == 1


def test_stage_missing_is_refused(tmp_path, small_jsonl, cli):
    from retrocli.chunk import chunk_corpus

    db = chunk_corpus([small_jsonl], tmp_path / "db")
    result = cli("neighbors", db.path, "--query", "x")
    assert result.exit_code != 0 and "not complete" in result.output


def test_newer_format_version_refused(tiny_db_copy, cli):
    manifest = json.loads((tiny_db_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tiny_db_copy / "manifest.json").write_text(json.dumps(manifest))
    result = cli("neighbors", tiny_db_copy, "--query", "x")
    assert result.exit_code != 0 and "newer retrocli" in result.output


def test_batch_self_exclude_same_doc(tiny_db, tmp_path):
    db = open_db(tiny_db)
    out = batch_neighbors(
        tiny_db, [tiny_db], tmp_path / "nb", options=NeighborOptions(k=3, exclude_same_doc=True, block_size=16),
    )
    arrays = open_neighbors(out)
    assert arrays.ids.shape == (db.num_chunks, 12)  # 4·k candidates, for training's per-window filter
    assert arrays.manifest["settings"]["candidates"] == 12
    valid = arrays.ids >= 0
    assert valid.all()
    docs = db.chunk_doc[arrays.ids]
    assert (docs != db.chunk_doc[:, None]).all()
    assert (np.diff(arrays.distances, axis=1) >= -1e-6).all()


def test_batch_resume_equals_uninterrupted(tiny_db, tmp_path):
    full = open_neighbors(batch_neighbors(
        tiny_db, [tiny_db], tmp_path / "a", options=NeighborOptions(k=2, block_size=10),
    ))
    batch_neighbors(tiny_db, [tiny_db], tmp_path / "b", max_blocks=3, options=NeighborOptions(k=2, block_size=10))
    state = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert state["status"] == "running" and state["done_blocks"] == [0, 1, 2]
    with pytest.raises(RetroError, match="incomplete"):
        open_neighbors(tmp_path / "b")
    resumed = open_neighbors(batch_neighbors(
        tiny_db, [tiny_db], tmp_path / "b", options=NeighborOptions(k=2, block_size=10),
    ))
    assert (resumed.ids == full.ids).all() and (resumed.distances == full.distances).all()
    # without exclusion each chunk's nearest neighbour is itself
    assert (full.ids[:, 0] == np.arange(len(full.ids))).all()


def test_batch_corpus_input(tiny_db, tmp_path, small_jsonl, cli):
    db = open_db(tiny_db)
    doc_text = db.document_text(2)
    corpus = tmp_path / "queries.jsonl"
    corpus.write_text(json.dumps({"text": doc_text}) + "\n")
    result = cli("neighbors", tiny_db, "--input", corpus, "--out", tmp_path / "nb", "--k", "1", "--json")
    assert result.exit_code == 0, result.output
    arrays = open_neighbors(tmp_path / "nb")
    assert (arrays.ids[:, 0] == np.array(list(db.doc_chunks(2)))).all()
    result = cli("neighbors", tiny_db, "--input", corpus, "--out", tmp_path / "nb2", "--exclude-same-doc")
    assert result.exit_code != 0 and "needs --input to be the DB itself" in result.output
    shutil.rmtree(tmp_path / "nb")


# -- which DB the neighbours belong to: content, not (db_id, version) ------------------------------------------


@pytest.fixture
def two_copies(tiny_db, tmp_path):
    """Two `cp -r` copies of one DB that each took a different remove: both version 2 of one db_id."""
    from retrocli.remove import remove_documents

    x, y = tmp_path / "x", tmp_path / "y"
    shutil.copytree(tiny_db, x)
    shutil.copytree(tiny_db, y)
    remove_documents(x, docs=[0])
    remove_documents(y, docs=[1])
    return x, y


def test_copies_that_took_other_changes_have_other_content_ids(two_copies, tiny_db, tmp_path):
    x, y = (open_db(p) for p in two_copies)
    same = (open_db(tiny_db).manifest["db_id"], 2)
    assert (x.manifest["db_id"], x.version) == (y.manifest["db_id"], y.version) == same
    assert x.content_id != y.content_id
    shutil.copytree(two_copies[0], tmp_path / "x-again")
    assert open_db(tmp_path / "x-again").content_id == x.content_id  # a plain copy holds the same content


def test_neighbours_of_one_copy_are_refused_for_another(two_copies, tmp_path):
    from retrocli.train import TrainOptions, train

    x, y = two_copies
    nb = batch_neighbors(x, [x], tmp_path / "nb", options=NeighborOptions(k=2, exclude_same_doc=True))
    with pytest.raises(RetroError, match="computed on another copy"):
        train(y, nb, tmp_path / "m", TrainOptions(config="tiny", seq_len=128, steps=1), device="cpu")
    # the same path now holding the other copy: the finished neighbours are not taken as up to date
    shutil.rmtree(x)
    shutil.copytree(y, x)
    with pytest.raises(RetroError, match="another copy of"):
        batch_neighbors(x, [x], nb, options=NeighborOptions(k=2, exclude_same_doc=True))
    with pytest.raises(RetroError, match="another copy of"):
        batch_neighbors(x, [x], nb, update=True, options=NeighborOptions(k=2, exclude_same_doc=True))


def test_update_refuses_a_db_that_went_back_to_an_older_version(tiny_db, tmp_path, cli):
    from retrocli.add import add_documents

    db, old = tmp_path / "db", tmp_path / "old"
    shutil.copytree(tiny_db, db)
    shutil.copytree(tiny_db, old)
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": f"Added page {i}: " + "grows the DB past its old size. " * 40}) + "\n"
                             for i in range(3)))
    add_documents(db, [extra])
    nb = batch_neighbors(db, [db], tmp_path / "nb", options=NeighborOptions(k=2, exclude_same_doc=True))
    shutil.rmtree(db)
    shutil.copytree(old, db)  # version 1 back in place: fewer chunks than the neighbours hold
    result = cli("neighbors", db, "--input", db, "--out", nb, "--k", "2", "--exclude-same-doc", "--update")
    assert result.exit_code != 0 and "older version 1" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_update_takes_the_writer_lock_of_its_output(tiny_db_copy, tmp_path, retro_proc):
    from retrocli.lock import writer_lock
    from retrocli.remove import remove_documents

    nb = batch_neighbors(
        tiny_db_copy, [tiny_db_copy], tmp_path / "nb", options=NeighborOptions(k=2, exclude_same_doc=True),
    )
    remove_documents(tiny_db_copy, docs=[3])
    with writer_lock(nb, "a concurrent retro neighbors --update"):
        result = retro_proc("neighbors", tiny_db_copy, "--input", tiny_db_copy, "--out", nb, "--k", "2",
                            "--exclude-same-doc", "--update")
    assert result.exit_code != 0 and "another writer holds" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((nb / "manifest.json").read_text())["settings"]["db_version"] == 1  # untouched
    done = retro_proc("neighbors", tiny_db_copy, "--input", tiny_db_copy, "--out", nb, "--k", "2",
                      "--exclude-same-doc", "--update")
    assert done.exit_code == 0, done.stderr
