"""The DB reader: documents, chunks and continuations agree with each other; atomic writes; one
tokenizer/chunk-size check for everything that reads token ids."""

import json

import pytest

from retrocli.artifacts import write_json_atomic
from retrocli.chunk import chunk_corpus
from retrocli.db import check_same_chunking, open_db, read_manifest
from retrocli.errors import RetroError
from retrocli.options import ChunkOptions
from retrocli.tokenizer import BPE_8K_NAME


def test_documents_chunks_and_continuations_agree(tiny_db):
    db = open_db(tiny_db)
    assert db.doc_chunks(0).start == 0 and db.doc_chunks(db.num_docs - 1).stop == db.num_chunks
    for doc in range(db.num_docs):
        chunks = db.doc_chunks(doc)
        assert all(db.doc_of(c) == doc for c in chunks)
        assert db.continuation(chunks.stop - 1) is None
        assert all(db.continuation(c) == c + 1 for c in chunks[:-1])
        assert db.document_text(doc) == db.tokenizer.decode(
            [t for c in chunks for t in db.chunk_tokens(c).tolist()])
    with pytest.raises(RetroError):
        db.chunk_tokens(db.num_chunks)


def test_check_same_chunking_names_what_differs(tiny_db, tmp_path, small_jsonl):
    db = open_db(tiny_db)
    sha = db.manifest["tokenizer"]["sha256"]
    check_same_chunking(db, "other", sha, db.chunk_size)
    with pytest.raises(RetroError, match="other: uses a different tokenizer"):
        check_same_chunking(db, "other", "0" * 64, db.chunk_size)
    with pytest.raises(RetroError, match="other: model chunk size 32 differs"):
        check_same_chunking(db, "other", sha, 32, subject="model ")
    small = chunk_corpus([small_jsonl], tmp_path / "db32", ChunkOptions(chunk_size=32, tokenizer=BPE_8K_NAME))
    with pytest.raises(RetroError, match="chunk size 32 differs"):
        check_same_chunking(db, small.path, small.manifest["tokenizer"]["sha256"], small.chunk_size)


def test_write_json_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"b": [1, 2]})
    assert json.loads(target.read_text()) == {"b": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"b": [1, 2]}  # the failed write left the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_read_manifest_refuses_a_directory_that_is_not_a_db(tmp_path):
    with pytest.raises(RetroError):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RetroError):
        read_manifest(tmp_path)


def test_an_atomic_report_write_never_touches_a_users_file_beside_it(tmp_path):
    from retrocli.artifacts import write_text_atomic

    users = tmp_path / ".report.html.partial"  # the temp name an older retrocli used
    users.write_text("mine")
    write_text_atomic(tmp_path / "report.html", "<p>report</p>")
    assert users.read_text() == "mine" and (tmp_path / "report.html").read_text() == "<p>report</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".report.html.partial", "report.html"]
