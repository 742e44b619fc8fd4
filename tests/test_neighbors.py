import json
import shutil

import numpy as np
import pytest
from helpers import tree_snapshot

from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.neighbors import batch_neighbors, open_neighbors, query_neighbors


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
    out = batch_neighbors(tiny_db, [tiny_db], tmp_path / "nb", k=3, exclude_same_doc=True, block_size=16)
    arrays = open_neighbors(out)
    assert arrays.ids.shape == (db.num_chunks, 12)  # 4·k candidates, for training's per-window filter
    assert arrays.manifest["settings"]["candidates"] == 12
    valid = arrays.ids >= 0
    assert valid.all()
    docs = db.chunk_doc[arrays.ids]
    assert (docs != db.chunk_doc[:, None]).all()
    assert (np.diff(arrays.distances, axis=1) >= -1e-6).all()


def test_batch_resume_equals_uninterrupted(tiny_db, tmp_path):
    full = open_neighbors(batch_neighbors(tiny_db, [tiny_db], tmp_path / "a", k=2, block_size=10))
    batch_neighbors(tiny_db, [tiny_db], tmp_path / "b", k=2, block_size=10, max_blocks=3)
    state = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert state["status"] == "running" and state["done_blocks"] == [0, 1, 2]
    with pytest.raises(RetroError, match="incomplete"):
        open_neighbors(tmp_path / "b")
    resumed = open_neighbors(batch_neighbors(tiny_db, [tiny_db], tmp_path / "b", k=2, block_size=10))
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
