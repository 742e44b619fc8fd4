"""Corpus readers through the API (retrocli.corpus) and, where it matters, the stored DB."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import run_retro, write_corpus_file
from helpers import SUBSET_TRAIN

from retrocli import RetroError, open_db
from retrocli.chunk import ChunkOptions, chunk_corpus
from retrocli.corpus import CorpusOptions, CorpusStats, iter_documents
from retrocli.staging import staging_path


def read_all(inputs, **opts):
    stats = CorpusStats()
    docs = list(iter_documents([str(p) for p in inputs], CorpusOptions(**opts), stats))
    return docs, stats


# -- formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".md", ".rst", ".TXT"])
def test_plain_text_file_is_one_document(make_corpus, suffix):
    text = "Title\n=====\n\n  indented line\r\nünïcödé 文字 🙂\n\n"
    root = make_corpus({f"doc{suffix}": text})
    docs, stats = read_all([root / f"doc{suffix}"])
    assert [d.text for d in docs] == [text]
    assert docs[0].position == 0
    assert docs[0].path == str((root / f"doc{suffix}").absolute())
    assert docs[0].source == docs[0].path
    assert stats.files == 1 and stats.documents == 1
    assert stats.bytes_read == len(text.encode("utf-8"))


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz"])
def test_jsonl_one_document_per_line_with_line_numbers(make_corpus, name):
    records = [{"text": "first"}, "", {"text": "second", "other": 1}, "   ", {"text": "third\nline"}]
    root = make_corpus({name: records})
    docs, stats = read_all([root / name])
    assert [d.text for d in docs] == ["first", "second", "third\nline"]
    # 1-based physical line numbers: blank lines are skipped but still counted
    assert [d.position for d in docs] == [1, 3, 5]
    path = str((root / name).absolute())
    assert [d.source for d in docs] == [f"{path}:line {n}" for n in (1, 3, 5)]
    assert stats.documents == 3 and stats.empty_skipped == 0


def test_jsonl_gz_reads_same_documents_as_plain(make_corpus):
    records = [{"text": f"document {i} " + "x" * i} for i in range(300)]
    root = make_corpus({"a.jsonl": records, "a.jsonl.gz": records})
    plain, _ = read_all([root / "a.jsonl"])
    gz, _ = read_all([root / "a.jsonl.gz"])
    assert [d.text for d in plain] == [d.text for d in gz] == [r["text"] for r in records]
    assert [d.position for d in plain] == [d.position for d in gz]
    assert gzip.decompress((root / "a.jsonl.gz").read_bytes()) == (root / "a.jsonl").read_bytes()


def test_parquet_rows_across_batches_and_row_groups(make_corpus):
    rows = [{"text": f"row {i} text", "id": f"r{i}"} for i in range(2500)]  # > 2 reader batches of 1024
    root = make_corpus({"t.parquet": rows})
    docs, stats = read_all([root / "t.parquet"])
    assert [d.text for d in docs] == [r["text"] for r in rows]
    assert [d.position for d in docs] == list(range(2500))  # 0-based rows
    path = str((root / "t.parquet").absolute())
    assert docs[0].source == f"{path}:row 0"
    assert docs[2499].source == f"{path}:row 2499"
    assert stats.bytes_read == (root / "t.parquet").stat().st_size


def test_text_field_option(make_corpus):
    root = make_corpus(
        {"a.jsonl": [{"body": "from jsonl", "text": 5}], "b.parquet": [{"body": "from parquet"}]}
    )
    docs, _ = read_all([root / "a.jsonl", root / "b.parquet"], text_field="body")
    assert [d.text for d in docs] == ["from jsonl", "from parquet"]


@pytest.mark.parametrize(
    ("name", "ids"),
    [("a.jsonl", ["A-1", 42]), ("a.parquet", ["A-1", "ü/2"]), ("b.parquet", [7, 42])],
)
def test_id_field_kept_and_stored(make_corpus, tmp_path, name, ids):
    rows = [{"text": "alpha text", "doc_id": ids[0]}, {"text": "beta text", "doc_id": ids[1]}]
    root = make_corpus({name: rows})
    docs, _ = read_all([root / name], id_field="doc_id")
    assert [d.external_id for d in docs] == [str(i) for i in ids]
    db = chunk_corpus([root / name], tmp_path / "db", ChunkOptions(id_field="doc_id"))
    assert db.source(0).startswith(f"{ids[0]} (") and db.external_id(0) == str(ids[0])
    assert db.source(1).startswith(f"{ids[1]} (")
    assert str((root / name).absolute()) in db.source(1)  # outside the working directory: absolute
    assert list(db.root["docs/external_id"][:]) == [str(i) for i in ids]


def test_without_ids_no_id_array(make_corpus, tmp_path):
    root = make_corpus({"a.jsonl": [{"text": "alpha text"}, {"text": "beta text"}]})
    db = chunk_corpus([root / "a.jsonl"], tmp_path / "db")
    assert "docs/external_id" not in db.root and db.external_id(0) is None
    assert db.source(0) == db.location(0) and db.source(0).endswith("a.jsonl:line 1")
    assert db.manifest["stages"]["chunk"]["corpus"]["id_field"] is None


def test_an_id_field_is_used_by_default_and_empty_turns_it_off(subset_db, tmp_path):
    import json

    db = open_db(subset_db)  # the committed subset's records carry "id"
    first = json.loads(SUBSET_TRAIN.read_text(encoding="utf-8").splitlines()[0])["id"]
    assert db.external_id(0) == first and db.source(0).startswith(f"{first} (")
    assert db.source(0).endswith("train.jsonl:line 1)")
    assert db.manifest["stages"]["chunk"]["corpus"]["id_field"] == "id"
    off = chunk_corpus([SUBSET_TRAIN], tmp_path / "off", ChunkOptions(id_field=""))
    assert "docs/external_id" not in off.root and off.source(0).endswith("train.jsonl:line 1")


@pytest.mark.parametrize("name", ["a.jsonl", "a.parquet"])
def test_missing_id_field_is_an_error(make_corpus, name):
    root = make_corpus({name: [{"text": "x", "id": "1"}]})
    with pytest.raises(RetroError, match="missing id"):
        read_all([root / name], id_field="nope")


# -- directories, order, ids ----------------------------------------------------------------------------


def test_directory_walk_is_recursive_sorted_and_filters_suffixes(make_corpus):
    files = {
        "b/z.txt": "b/z",
        "a.txt": "a",
        "b/a.md": "b/a",
        "c.rst": "c",
        "b/deeper/q.jsonl": [{"text": "q1"}, {"text": "q2"}],
        "0.parquet": [{"text": "p0"}],
        "notes.csv": "ignored",
        "image.png": b"\x89PNG\x00\x00",
    }
    root = make_corpus(files)
    docs, stats = read_all([root])
    assert [d.text for d in docs] == ["p0", "a", "b/a", "q1", "q2", "b/z", "c"]
    assert stats.files == 6  # the .csv and .png are not corpus files
    # the walk order is the sorted order of the relative paths
    walked = [Path(d.path).relative_to(root).as_posix() for d in docs]
    assert walked == sorted(walked, key=lambda p: Path(p).parts)


def test_doc_ids_stable_and_follow_input_order(make_corpus, tmp_path):
    root = make_corpus(
        {"d/x.txt": "dir doc x", "d/y.txt": "dir doc y", "f.jsonl": [{"text": "f1"}, {"text": "f2"}]}
    )
    inputs = [root / "f.jsonl", root / "d"]
    db1 = chunk_corpus(inputs, tmp_path / "db1")
    db2 = chunk_corpus(inputs, tmp_path / "db2")
    texts1 = [db1.document_text(d) for d in range(db1.num_docs)]
    assert texts1 == ["f1", "f2", "dir doc x", "dir doc y"]
    assert texts1 == [db2.document_text(d) for d in range(db2.num_docs)]
    assert [db1.source(d) for d in range(4)] == [db2.source(d) for d in range(4)]
    assert db1.source(1) == f"{(root / 'f.jsonl').absolute()}:line 2"
    assert db1.source(3) == str((root / "d" / "y.txt").absolute())
    # reversed inputs give the reversed grouping: ids are input order, not sorted globally
    db3 = chunk_corpus(list(reversed(inputs)), tmp_path / "db3")
    assert [db3.document_text(d) for d in range(4)] == ["dir doc x", "dir doc y", "f1", "f2"]


def test_empty_documents_skipped_counted_and_ids_contiguous(make_corpus, tmp_path):
    root = make_corpus(
        {
            "a.jsonl": [{"text": ""}, {"text": "real one"}, {"text": " \n\t "}, {"text": "real two"}],
            "b.txt": "",
            "c.txt": "\n\n",
            "d.parquet": [{"text": ""}, {"text": "real three"}],
        }
    )
    docs, stats = read_all([root])
    assert [d.text for d in docs] == ["real one", "real two", "real three"]
    assert stats.empty_skipped == 5
    assert stats.documents == 3
    db = chunk_corpus([root], tmp_path / "db")
    assert db.num_docs == 3
    assert db.manifest["stages"]["chunk"]["corpus"]["empty_skipped"] == 5
    assert db.source(1).endswith("a.jsonl:line 4")
    assert db.source(2).endswith("d.parquet:row 1")


# -- encodings and binary files -----------------------------------------------------------------------------


def test_invalid_utf8_replaced_and_counted(make_corpus, tmp_path):
    root = make_corpus(
        {
            "bad.txt": b"caf\xe9 au lait\n",
            "good.txt": "fine\n",
            "lines.jsonl": b'{"text": "ok"}\n{"text": "bro\xffken"}\n{"text": "also \xc3"}\n',
        }
    )
    docs, stats = read_all([root])
    assert [d.text for d in docs] == ["caf\ufffd au lait\n", "fine\n", "ok", "bro\ufffdken", "also \ufffd"]
    assert stats.replaced_bytes_docs == 3
    db = chunk_corpus([root], tmp_path / "db")
    assert db.manifest["stages"]["chunk"]["corpus"]["invalid_utf8_documents"] == 3
    assert db.document_text(0) == "caf\ufffd au lait\n"


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("bad.txt", b"ok\ncaf\xe9\n", "bad.txt"),
        ("lines.jsonl", b'{"text": "ok"}\n{"text": "bro\xffken"}\n', "lines.jsonl:2"),
        ("lines.jsonl.gz", gzip.compress(b'{"text": "ok"}\n\n{"text": "bro\xffken"}\n'), "lines.jsonl.gz:3"),
    ],
)
def test_invalid_utf8_strict_is_an_error(make_corpus, name, content, where):
    root = make_corpus({name: content})
    with pytest.raises(RetroError, match="invalid UTF-8") as info:
        read_all([root / name], strict=True)
    assert where in str(info.value)
    assert "--strict" in str(info.value)


def test_json_lone_surrogate_escape_replaced_or_strict_error(make_corpus, tmp_path):
    # Valid JSON, but "\ud800" alone is not a character: it must not reach the tokenizer as is.
    root = make_corpus(
        {"s.jsonl": ['{"text": "before \\ud800 after"}', '{"text": "pair \\ud83d\\ude00 ok"}']}
    )
    docs, stats = read_all([root / "s.jsonl"])
    assert [d.text for d in docs] == ["before \ufffd after", "pair \U0001f600 ok"]
    assert stats.replaced_bytes_docs == 1
    db = chunk_corpus([root / "s.jsonl"], tmp_path / "db")
    assert db.document_text(0) == "before \ufffd after"
    with pytest.raises(RetroError, match=r"s\.jsonl:1: .*surrogate"):
        read_all([root / "s.jsonl"], strict=True)


def test_binary_file_skipped_and_named(make_corpus, tmp_path):
    root = make_corpus(
        {"a.txt": "text before", "blob.txt": b"\x7fELF\x02\x01\x00\x00binary", "z.md": "after"}
    )
    docs, stats = read_all([root])
    assert [d.text for d in docs] == ["text before", "after"]
    assert stats.binary_skipped == [str(root / "blob.txt")]
    assert stats.files == 3
    db = chunk_corpus([root], tmp_path / "db")
    assert db.manifest["stages"]["chunk"]["corpus"]["binary_skipped"] == [str(root / "blob.txt")]
    assert db.num_docs == 2


# -- bad input: one clear RetroError naming the file and line/row ------------------------------------------

_GZ = gzip.compress("".join(f'{{"text": "line {i} {i * i * 7919}"}}\n' for i in range(3000)).encode())
BAD_INPUTS = {
    # id: (files, which input to pass, fragments the message must contain)
    "missing-path": ({}, "nope.jsonl", ["nope.jsonl", "no such file"]),
    "invalid-json": (
        {"c.jsonl": [{"text": "ok"}, {"text": "ok"}, '{"text": "unterminated']},
        "c.jsonl",
        ["c.jsonl:3", "invalid JSON"],
    ),
    "json-not-object": (
        {"c.jsonl": [{"text": "ok"}, ["a", "list"]]},
        "c.jsonl",
        ["c.jsonl:2", "JSON object"],
    ),
    "missing-text-field": (
        {"c.jsonl": [{"text": "ok"}, {"body": "no text"}]},
        "c.jsonl",
        ["c.jsonl:2", "missing text field 'text'"],
    ),
    "text-field-number": ({"c.jsonl": [{"text": 12}]}, "c.jsonl", ["c.jsonl:1", "'text' is int"]),
    "text-field-null": ({"c.jsonl.gz": [{"text": None}]}, "c.jsonl.gz", ["c.jsonl.gz:1", "'text' is null"]),
    "parquet-missing-column": (
        {"p.parquet": [{"body": "x"}]},
        "p.parquet",
        ["p.parquet", "missing text column"],
    ),
    "parquet-null-text": (
        {"p.parquet": [{"text": "ok"}] * 1500 + [{"text": None}]},
        "p.parquet",
        ["p.parquet", "row 1500", "null"],
    ),
    "parquet-non-string": (
        {"p.parquet": [{"text": 3.5}]},
        "p.parquet",
        ["p.parquet", "row 0", "'text' is float"],
    ),
    "parquet-corrupt": ({"p.parquet": b"PAR1 this is not parquet"}, "p.parquet", ["p.parquet", "Parquet"]),
    "unsupported-extension": ({"data.csv": "a,b\n"}, "data.csv", ["data.csv", "unsupported file type"]),
    "not-gzip": ({"c.jsonl.gz": b'{"text": "plain"}\n'}, "c.jsonl.gz", ["c.jsonl.gz", "cannot read"]),
    "truncated-gzip": (
        {"c.jsonl.gz": _GZ[: len(_GZ) // 2]},
        "c.jsonl.gz",
        ["c.jsonl.gz", "cannot read"],
    ),
    "corrupt-gzip": (  # a damaged deflate stream: zlib.error, not an OSError
        {"c.jsonl.gz": _GZ[:20] + bytes(b ^ 0xFF for b in _GZ[20:60]) + _GZ[60:]},
        "c.jsonl.gz",
        ["c.jsonl.gz", "cannot read", "invalid code"],
    ),
    "empty-corpus": ({"e.jsonl": [{"text": ""}], "e.txt": "  \n"}, ".", ["empty corpus"]),
    "empty-directory": ({"only.csv": "x"}, ".", ["empty corpus"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(make_corpus, case):
    files, target, fragments = BAD_INPUTS[case]
    root = make_corpus(files)
    with pytest.raises(RetroError) as info:
        read_all([root / target])
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_input_leaves_no_db(make_corpus, tmp_path):
    root = make_corpus({"a.jsonl": [{"text": "fine"}] * 10, "b.jsonl": [{"text": "fine"}, "{broken"]})
    out = tmp_path / "db"
    with pytest.raises(RetroError, match=r"b\.jsonl:2"):
        chunk_corpus([root], out)
    assert not out.exists()
    assert not staging_path(tmp_path / "db").exists()


def test_no_inputs_is_an_error():
    with pytest.raises(RetroError, match="no input"):
        read_all([])


def test_unreadable_file_is_a_clean_error(tmp_path):
    if os.geteuid() != 0:
        path = write_corpus_file(tmp_path / "locked.jsonl", [{"text": "secret"}])
        path.chmod(0)
        try:
            with pytest.raises(RetroError, match=r"locked\.jsonl: cannot read file \(permission denied\)"):
                read_all([path])
        finally:
            path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        return
    # Root reads any file regardless of mode bits, so the check has to run as an unprivileged user.
    if shutil.which("setpriv") is None:
        pytest.skip("running as root (permission bits do not apply) and setpriv is not available")
    work = Path(tempfile.mkdtemp(prefix="retro-perm-"))
    try:
        work.chmod(0o777)
        path = write_corpus_file(work / "locked.jsonl", [{"text": "secret"}])
        path.chmod(0)
        probe = run_retro("--help", user=65534, cwd=work)
        if probe.exit_code != 0:
            pytest.skip(f"the unprivileged user cannot run the venv's retro script: {probe.stderr[:200]}")
        # Inside a directory the reader's own check reports it: one line naming the file.
        result = run_retro("chunk", work, "--out", work / "db", user=65534, cwd=work)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert f"error: {path}: cannot read file (permission denied)" in result.stderr
        assert not (work / "db").exists() and not staging_path(work / "db").exists()
        # Named directly: the same one line.
        result = run_retro("chunk", path, "--out", work / "db", user=65534, cwd=work)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert f"error: {path}: cannot read file (permission denied)" in result.stderr
        assert not (work / "db").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- file names that are not UTF-8 ------------------------------------------------------------------------

def test_recorded_file_names_are_text_and_give_the_bytes_back():
    from retrocli.corpus import file_name, record_name

    for raw in (b"/d/caf\xff.txt", b"/d/\xc3\xa9t\xc3\xa9.txt", b"/d/a\\b.txt", b"/d/x\\xff\xfe.txt", b"/d/\\\\x.txt"):
        recorded = record_name(os.fsdecode(raw))
        recorded.encode("utf-8")  # valid text: a zarr string
        assert os.fsencode(file_name(recorded)) == raw
    assert record_name(os.fsdecode(b"/d/caf\xff.txt")) == "/d/caf\\xff.txt"
    assert file_name("/old/db\\name.txt") == "/old/db\\name.txt"  # a lone backslash, as older DBs wrote it


def test_a_file_name_that_is_not_utf8_is_recorded_and_shown_escaped(tmp_path, tiny_bert):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    odd = os.fsdecode(bytes(corpus) + b"/caf\xff.txt")
    Path(odd).write_text("Zebras graze on the open savanna near the river every morning.", encoding="utf-8")
    (corpus / "plain.txt").write_text("Compilers translate source code into machine instructions.", encoding="utf-8")
    db = tmp_path / "db"
    result = run_retro("build-db", corpus, "--out", db, "--embedder", tiny_bert, "--precision", "fp32")
    assert result.exit_code == 0, result.output  # was a TypeError traceback
    opened = open_db(db)
    recorded = [str(p) for p in opened.root["files/path"][:]]
    assert f"{corpus}/caf\\xff.txt" in recorded
    assert opened.source(0).endswith("caf\\xff.txt")
    result = run_retro("neighbors", db, "--query", "Zebras graze on the savanna", "--k", "2")
    assert result.exit_code == 0, result.output
    assert "caf\\xff.txt" in result.stdout  # shown escaped, never as a raw byte or a lone surrogate
    (corpus / "plain.txt").unlink()
    Path(odd).write_bytes(b"bad \xe9 bytes")
    result = run_retro("chunk", corpus, "--out", tmp_path / "strict", "--strict")
    assert result.exit_code == 2 and result.error_lines == [f"error: {corpus}/caf\\xff.txt: invalid UTF-8 at byte 4 "
                                                            "(--strict)"], result.output
