"""`retro chunk` through the API: exact round trip, chunk boundaries, continuations, manifest, atomicity."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import SUBSET_TRAIN

import retrocli
from retrocli import RetroError, open_db
from retrocli.chunk import ChunkOptions, _token_dtype, chunk_corpus
from retrocli.db import BUILT_FORMAT_VERSION, FORMAT_NAME, FORMAT_VERSION, ROWS_PER_ZARR_CHUNK
from retrocli.staging import begin_staging, staging_path
from retrocli.tokenizer import default_tokenizer_path, load_tokenizer

# -- round trip -----------------------------------------------------------------------------------------


def test_document_text_reproduces_every_document(subset_db, subset_texts):
    db = open_db(subset_db)
    assert db.num_docs == len(subset_texts)
    for d, text in enumerate(subset_texts):
        assert db.document_text(d) == text, f"document {d} differs"


def test_concatenated_chunk_tokens_reproduce_every_document(subset_db, subset_texts):
    db = open_db(subset_db)
    tok = load_tokenizer()
    tokens, lengths = db.tokens_block(0, db.num_chunks)  # the bulk path, for every document
    encoded = tok.encode_batch(subset_texts)
    for d, text in enumerate(subset_texts):
        ids = np.concatenate([tokens[c, : lengths[c]] for c in db.doc_chunks(d)])
        assert tok.decode(ids.tolist()) == text
        # and the tokens are exactly what the tokenizer gives for the whole document
        assert ids.tolist() == encoded[d]
    # the per-chunk path (one zarr read each) agrees, on a few documents
    for d in (0, 1, len(subset_texts) - 1):
        ids = np.concatenate([db.chunk_tokens(c) for c in db.doc_chunks(d)])
        assert tok.decode(ids.tolist()) == subset_texts[d]


def test_chunk_text_concatenates_to_document_for_ascii(subset_db, subset_texts):
    # chunk_text decodes one chunk alone; for pure-ASCII documents no character can straddle a boundary
    db = open_db(subset_db)
    ascii_docs = [d for d, t in enumerate(subset_texts) if t.isascii()]
    assert ascii_docs
    for d in sorted(ascii_docs, key=lambda d: len(subset_texts[d]))[:5]:
        assert "".join(db.chunk_text(c) for c in db.doc_chunks(d)) == subset_texts[d]


# -- chunk boundaries ---------------------------------------------------------------------------------------


def check_boundaries(db, texts, chunk_size):
    tok = load_tokenizer(db.path / "tokenizer.json")
    n = db.num_chunks
    lengths = db.chunk_length
    chunk_doc = db.chunk_doc
    offsets = db.doc_offsets
    assert len(lengths) == len(chunk_doc) == n
    assert db.root["chunks/tokens"].shape == (n, chunk_size)
    assert len(offsets) == db.num_docs + 1
    assert offsets[0] == 0 and offsets[-1] == n
    assert np.all(np.diff(offsets) >= 1)  # every stored document has at least one chunk
    assert np.all(np.diff(chunk_doc) >= 0) and np.all(np.diff(chunk_doc) <= 1)
    assert int(lengths.sum()) == db.manifest["counts"]["tokens"]
    all_tokens, _ = db.tokens_block(0, n)
    encoded = tok.encode_batch(texts)
    for d, ids in enumerate(encoded):
        span = db.doc_chunks(d)
        assert len(span) == -(-len(ids) // chunk_size)  # ceil: as few chunks as possible
        assert np.all(chunk_doc[span.start : span.stop] == d)  # no chunk crosses a document
        assert np.all(lengths[span.start : span.stop - 1] == chunk_size)  # full except possibly the last
        assert 1 <= lengths[span.stop - 1] <= chunk_size
        last = all_tokens[span.stop - 1]
        assert np.all(last[lengths[span.stop - 1] :] == 0)  # padding is 0
        assert np.concatenate([all_tokens[c, : lengths[c]] for c in span]).tolist() == ids


def test_chunk_boundaries_default_size(subset_db, subset_texts):
    db = open_db(subset_db)
    assert db.chunk_size == 64
    check_boundaries(db, subset_texts, 64)


@pytest.mark.parametrize("chunk_size", [1, 17, 300])
def test_other_chunk_sizes(tmp_path, make_corpus, chunk_size):
    texts = [
        "short",
        "a somewhat longer document that takes more than a single token " * 7,
        "ünïcödé 文字 🙂 " * 11,
        "x",
    ]
    root = make_corpus({"c.jsonl": [{"text": t} for t in texts]})
    db = chunk_corpus([root], tmp_path / "db", ChunkOptions(chunk_size=chunk_size))
    assert db.chunk_size == chunk_size == db.manifest["chunk_size"]
    assert db.root["chunks/length"].dtype == (np.uint8 if chunk_size <= 255 else np.uint16)
    check_boundaries(db, texts, chunk_size)
    assert [db.document_text(d) for d in range(db.num_docs)] == texts


def test_many_flushes_and_tokenize_batches(tmp_path, subset_texts, monkeypatch):
    # chunk size 4 on the subset gives > 3 zarr chunks of rows; tiny tokenize batches cut across
    # documents many times: ids, offsets and the aligned zarr writes must still line up.
    import retrocli.chunk as chunk_mod

    monkeypatch.setattr(chunk_mod, "TOKENIZE_BATCH_CHARS", 20_000)
    db = chunk_corpus([SUBSET_TRAIN], tmp_path / "db", ChunkOptions(chunk_size=4))
    assert db.num_chunks > 3 * ROWS_PER_ZARR_CHUNK
    check_boundaries(db, subset_texts, 4)
    for d in (0, len(subset_texts) // 2, len(subset_texts) - 1):
        assert db.document_text(d) == subset_texts[d]


def test_chunk_size_out_of_range(tmp_path):
    for size in (0, -3, 5000):
        with pytest.raises(RetroError, match="--chunk-size"):
            chunk_corpus([SUBSET_TRAIN], tmp_path / "db", ChunkOptions(chunk_size=size))
    assert not (tmp_path / "db").exists()


# -- continuation, chunk records, sources --------------------------------------------------------------------


def test_continuation_is_next_chunk_of_same_document(subset_db):
    db = open_db(subset_db)
    ends = set(int(o) - 1 for o in db.doc_offsets[1:])
    for c in range(db.num_chunks):
        nxt = db.continuation(c)
        if c in ends:
            assert nxt is None
        else:
            assert nxt == c + 1 and db.doc_of(nxt) == db.doc_of(c)
    assert db.continuation(db.num_chunks - 1) is None
    with pytest.raises(RetroError, match="out of range"):
        db.continuation(db.num_chunks)
    with pytest.raises(RetroError, match="out of range"):
        db.chunk_tokens(-1)


def test_single_chunk_documents_have_no_continuation(tmp_path, make_corpus):
    root = make_corpus({"a.txt": "one", "b.txt": "two", "c.txt": "three"})
    db = chunk_corpus([root], tmp_path / "db")
    assert db.num_chunks == 3
    assert [db.continuation(c) for c in range(3)] == [None, None, None]


def test_chunk_record_and_sources(subset_db, subset_texts):
    db = open_db(subset_db)
    path = str(SUBSET_TRAIN.absolute())
    for d in (0, 5, db.num_docs - 1):
        assert db.location(d, relative=False) == f"{path}:line {d + 1}"  # the subset has no blank lines
        assert db.source(d) == f"{db.external_id(d)} ({db.location(d)})"
    c = int(db.doc_offsets[5]) + 1
    ref = db.chunk(c)
    assert ref.id == c and ref.doc == 5
    assert ref.source == db.source(5)
    assert ref.tokens.tolist() == db.chunk_tokens(c).tolist() and len(ref.tokens) == 64
    assert ref.text == db.tokenizer.decode(ref.tokens) and ref.text in subset_texts[5]
    assert len(db) == db.num_chunks
    for bad in (-1, db.num_docs):
        with pytest.raises(RetroError, match="out of range"):
            db.document_text(bad)
        with pytest.raises(RetroError, match="out of range"):
            db.source(bad)


def test_open_db_is_the_package_api(subset_db):
    db = retrocli.open_db(str(subset_db))
    assert isinstance(db, retrocli.RetroDB)
    assert db.stage("chunk") == "complete"
    assert db.stage("embed") == "missing"


# -- the stored form -------------------------------------------------------------------------------------


def test_manifest_fields(subset_db, subset_texts):
    manifest = json.loads((subset_db / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_NAME == "retrocli-db"
    assert manifest["format_version"] == BUILT_FORMAT_VERSION
    assert len(manifest["db_id"]) == 32
    assert manifest["created_by"] == f"retrocli {retrocli.__version__}"
    tok = manifest["tokenizer"]
    assert tok["sha256"] == hashlib.sha256((subset_db / "tokenizer.json").read_bytes()).hexdigest()
    assert tok["sha256"] == hashlib.sha256(default_tokenizer_path().read_bytes()).hexdigest()
    assert tok["vocab_size"] == load_tokenizer().vocab_size
    assert tok["name"] == "smollm2"  # the bundled model's tokens
    assert manifest["chunk_size"] == 64
    db = open_db(subset_db)
    counts = manifest["counts"]
    assert counts["documents"] == len(subset_texts)
    assert counts["chunks"] == db.root["chunks/tokens"].shape[0]
    assert counts["tokens"] == int(db.chunk_length.sum())
    assert counts["files"] == 1
    stage = manifest["stages"]["chunk"]
    assert stage["status"] == "complete"
    assert stage["seconds"] >= 0
    assert stage["inputs"] == [str(SUBSET_TRAIN.absolute())]
    assert stage["options"] == {
        "chunk_size": 64,
        "tokenizer": None,
        "text_field": "text",
        "id_field": None,
        "strict": False,
        "allow_duplicates": False,
    }
    assert stage["corpus"]["documents"] == len(subset_texts)
    assert stage["corpus"]["bytes_read"] == SUBSET_TRAIN.stat().st_size
    assert stage["corpus"]["empty_skipped"] == 0 and stage["corpus"]["binary_skipped"] == []


def test_arrays_dtypes_and_zarr_chunking(subset_db):
    db = open_db(subset_db)
    root = db.root
    assert root["chunks/tokens"].dtype == np.uint16  # an 8k vocabulary fits in 16 bits
    assert root["chunks/tokens"].chunks == (ROWS_PER_ZARR_CHUNK, 64)
    assert root["chunks/length"].dtype == np.uint8
    assert root["chunks/doc"].dtype == np.int64
    assert root["docs/chunk_offset"].dtype == np.int64
    assert root["docs/file"].dtype == np.int32
    assert root["docs/position"].dtype == np.int64
    assert root["docs/file"].shape == (db.num_docs,)
    assert list(root["files/path"][:]) == [str(SUBSET_TRAIN.absolute())]
    assert int(db.root["chunks/tokens"][:].max()) < db.manifest["tokenizer"]["vocab_size"]
    assert (subset_db / "store.zarr" / "zarr.json").exists()
    assert json.loads((subset_db / "store.zarr" / "zarr.json").read_text())["zarr_format"] == 3


def test_token_dtype_is_smallest_that_fits():
    assert _token_dtype(8192) == np.uint16
    assert _token_dtype(65536) == np.uint16
    assert _token_dtype(65537) == np.uint32
    assert _token_dtype(200_000) == np.uint32


# -- overwrite and atomicity --------------------------------------------------------------------------------


def test_existing_db_refused_without_overwrite_and_replaced_with_it(tmp_path, make_corpus):
    first = make_corpus({"a.txt": "the first corpus"})
    second = make_corpus({"b.txt": "the second corpus", "c.txt": "more"})
    out = tmp_path / "db"
    db1 = chunk_corpus([first], out)
    old_id = db1.manifest["db_id"]
    with pytest.raises(RetroError, match="already exists; pass --overwrite"):
        chunk_corpus([second], out)
    assert open_db(out).manifest["db_id"] == old_id
    assert open_db(out).document_text(0) == "the first corpus"
    db2 = chunk_corpus([second], out, overwrite=True)
    assert db2.manifest["db_id"] != old_id
    assert [db2.document_text(d) for d in range(db2.num_docs)] == ["the second corpus", "more"]
    assert not staging_path(tmp_path / "db").exists()


def test_overwrite_refuses_a_directory_that_is_not_a_db(tmp_path, make_corpus):
    corpus = make_corpus({"a.txt": "text"})
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(RetroError, match="not a retro DB; refusing"):
        chunk_corpus([corpus], out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "do not delete"
    assert not staging_path(tmp_path / "precious").exists()
    plain_file = tmp_path / "file.txt"
    plain_file.write_text("x")
    with pytest.raises(RetroError, match="not a retro DB"):
        chunk_corpus([corpus], plain_file, overwrite=True)
    assert plain_file.read_text() == "x"


def test_overwrite_accepts_an_empty_directory(tmp_path, make_corpus):
    out = tmp_path / "empty"
    out.mkdir()
    db = chunk_corpus([make_corpus({"a.txt": "text"})], out, overwrite=True)
    assert db.document_text(0) == "text"


def test_failed_run_leaves_nothing_and_keeps_the_old_db(tmp_path, make_corpus):
    good = make_corpus({"a.txt": "good"})
    out = tmp_path / "db"
    chunk_corpus([good], out)
    old_id = open_db(out).manifest["db_id"]
    # the bad line is in the last file read, after plenty of good documents have been written
    bad = make_corpus(
        {"a.jsonl": [{"text": f"doc {i} " * 50} for i in range(3000)], "z.jsonl": [{"text": "ok"}, "{oops"]}
    )
    with pytest.raises(RetroError, match=r"z\.jsonl:2"):
        chunk_corpus([bad], out, overwrite=True)
    assert open_db(out).manifest["db_id"] == old_id
    assert not staging_path(tmp_path / "db").exists()

    fresh = tmp_path / "fresh"
    with pytest.raises(RetroError, match=r"z\.jsonl:2"):
        chunk_corpus([bad], fresh)
    assert not fresh.exists()
    assert not staging_path(tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["db", "corpus1", "corpus2"])


def test_stale_staging_directory_from_a_killed_run_is_replaced(tmp_path, make_corpus):
    partial = begin_staging(tmp_path / "db", "retro chunk")  # what a run killed mid-write leaves
    (partial / "store.zarr").mkdir()
    (partial / "junk").write_text("left by kill -9")
    db = chunk_corpus([make_corpus({"a.txt": "text"})], tmp_path / "db")
    assert db.document_text(0) == "text"
    assert not partial.exists() and not (tmp_path / "db" / ".retro-staging").exists()


def test_a_users_folder_named_like_the_old_staging_directory_is_never_touched(tmp_path, make_corpus, cli):
    # issue 35.1: `mkdir mydata.partial; ... chunk few.jsonl --out mydata` deleted keep.txt
    mine = tmp_path / "mydata.partial"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    assert cli("chunk", make_corpus({"few.jsonl": [{"text": "a few words"}]}), "--out", tmp_path / "mydata"
               ).exit_code == 0
    assert (mine / "keep.txt").read_text() == "x"
    # and `retro chunk docs.partial --out docs` reads its corpus, never deletes it
    docs = make_corpus({"n.txt": "text"}, name="docs.partial")
    result = cli("chunk", docs, "--out", tmp_path / "docs")
    assert result.exit_code == 0, result.output
    assert (docs / "n.txt").read_text() == "text" and open_db(tmp_path / "docs").document_text(0) == "text"


def test_a_foreign_directory_at_the_staging_path_is_one_line_and_untouched(tmp_path, make_corpus, cli):
    corpus = make_corpus({"a.txt": "text"})
    foreign = staging_path(tmp_path / "db")
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    result = cli("chunk", corpus, "--out", tmp_path / "db")
    assert result.exit_code == 2 and len(result.error_lines) == 1, result.output
    assert "was not made by retro" in result.error_lines[0] and str(foreign) in result.error_lines[0]
    assert (foreign / "keep.txt").read_text() == "mine" and not (tmp_path / "db").exists()
    # a corpus that is (or holds) the staging directory is refused too, and kept
    (foreign / "more.txt").write_text("more")
    for given in (foreign, foreign / "more.txt"):
        result = cli("chunk", given, "--out", tmp_path / "db")
        assert result.exit_code == 2 and f"where retro stages {tmp_path / 'db'}" in result.error_lines[0]
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt", "more.txt"]


def test_chunk_records_the_content_of_each_source_file(tmp_path, make_corpus):
    corpus = make_corpus({"a.txt": "alpha", "b.txt": "beta"})
    db = chunk_corpus([corpus], tmp_path / "db")
    digests = dict(zip(db.root["files/path"][:].tolist(), db.root["files/sha256"][:].tolist(), strict=True))
    assert digests == {str(corpus / name): hashlib.sha256(text.encode()).hexdigest()
                       for name, text in (("a.txt", "alpha"), ("b.txt", "beta"))}
    assert "files/sha256" in db.manifest["stages"]["chunk"]["files"]  # checksummed like every array


def test_out_dot_with_overwrite(tmp_path, make_corpus, monkeypatch):
    corpus = make_corpus({"a.txt": "first"})
    out = tmp_path / "db"
    chunk_corpus([corpus], out)
    monkeypatch.chdir(out)
    chunk_corpus([make_corpus({"b.txt": "second"})], ".", overwrite=True)
    monkeypatch.chdir(tmp_path)
    assert open_db(out).document_text(0) == "second"
    assert not staging_path(tmp_path / "db").exists()


# -- opening DBs that are not usable ----------------------------------------------------------------------


def _copy_db(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(db_path, edit):
    path = db_path / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "newer retrocli"),
        (lambda m: m.update(format_version="1"), "must be a positive integer"),
        (lambda m: m.update(format="something-else"), "not a retro DB manifest"),
        (lambda m: m["stages"]["chunk"].update(status="running"), "chunk stage is not complete"),
    ],
    ids=["newer-version", "bad-version", "wrong-format", "incomplete"],
)
def test_open_rejects_bad_manifest(subset_db, tmp_path, edit, fragment):
    db_path = _copy_db(subset_db, tmp_path)
    _edit_manifest(db_path, edit)
    with pytest.raises(RetroError, match=fragment):
        open_db(db_path)


def test_open_rejects_missing_or_broken(tmp_path, subset_db):
    with pytest.raises(RetroError, match="no such DB"):
        open_db(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RetroError, match="not a retro DB"):
        open_db(tmp_path / "plain")
    db_path = _copy_db(subset_db, tmp_path)
    (db_path / "manifest.json").write_text("{truncated")
    with pytest.raises(RetroError, match="unreadable manifest"):
        open_db(db_path)


def test_tokenizer_copy_is_checked_against_manifest(subset_db, tmp_path):
    db_path = _copy_db(subset_db, tmp_path)
    text = (db_path / "tokenizer.json").read_text()
    (db_path / "tokenizer.json").write_text(text + " ")
    db = open_db(db_path)
    with pytest.raises(RetroError, match="sha256 does not match"):
        db.document_text(0)


def test_read_only_open_writes_nothing(subset_db):
    before = {p: p.stat().st_mtime_ns for p in subset_db.rglob("*")}
    db = open_db(subset_db)
    db.document_text(0)
    db.disk_usage()
    assert {p: p.stat().st_mtime_ns for p in subset_db.rglob("*")} == before
