"""The `retro` command itself: chunk, info and info --json, and what users see when input is bad."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import SUBSET_TRAIN

from retrocli import open_db
from retrocli.db import BUILT_FORMAT_VERSION, FORMAT_VERSION
from retrocli.staging import staging_path


def test_chunk_then_info_then_info_json(cli, tmp_path, subset_texts):
    out = tmp_path / "db"
    result = cli("chunk", SUBSET_TRAIN, "--out", out)
    assert result.exit_code == 0, result.output
    db = open_db(out)
    counts = db.manifest["counts"]
    summary = " ".join(result.stdout.split())  # rich may wrap the line
    assert f"chunked {counts['documents']:,} documents into {counts['chunks']:,} chunks" in summary
    assert counts["documents"] == len(subset_texts)
    assert [db.document_text(d) for d in (0, len(subset_texts) - 1)] == [subset_texts[0], subset_texts[-1]]

    result = cli("info", out)
    assert result.exit_code == 0, result.output
    assert f"{counts['documents']:,}" in result.stdout
    assert f"{counts['chunks']:,}" in result.stdout and "chunk size 64" in result.stdout
    assert f"{counts['tokens']:,}" in result.stdout
    assert "chunk: complete" in result.stdout
    assert db.manifest["tokenizer"]["sha256"][:12] in result.stdout
    for array in ("chunks/tokens", "chunks/length", "chunks/doc", "docs/chunk_offset", "files/path"):
        assert array in result.stdout

    result = cli("info", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["counts"] == counts
    assert data["chunk_size"] == 64
    assert data["format_version"] == BUILT_FORMAT_VERSION
    assert data["db_id"] == db.manifest["db_id"]
    assert data["tokenizer"] == db.manifest["tokenizer"]
    assert data["stages"] == {"chunk": "complete"}
    assert data["corpus"]["documents"] == len(subset_texts)
    on_disk = {
        p.parent.relative_to(out / "store.zarr").as_posix(): sum(
            f.stat().st_size for f in p.parent.rglob("*") if f.is_file()
        )
        for p in (out / "store.zarr").rglob("zarr.json")
        if json.loads(p.read_text())["node_type"] == "array"
    }
    assert data["disk_bytes"] == on_disk
    assert data["disk_bytes"]["chunks/tokens"] > data["disk_bytes"]["chunks/length"]


def test_chunk_json_output_and_options(cli, tmp_path, make_corpus):
    root = make_corpus(
        {
            "b.jsonl": [
                {"body": "first doc", "key": "k1"},
                {"body": "", "key": "k2"},
                {"body": "third", "key": "k3"},
            ]
        }
    )
    args = ["--text-field", "body", "--id-field", "key", "--chunk-size", "3", "--json"]
    result = cli("chunk", root, "--out", tmp_path / "db", *args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # --json: nothing else on stdout
    assert data["counts"]["documents"] == 2
    assert data["corpus"]["empty_skipped"] == 1
    db = open_db(tmp_path / "db")
    assert data["counts"] == db.manifest["counts"]
    assert db.chunk_size == 3
    assert db.source(1).startswith("k3 (") and db.source(1).endswith("b.jsonl:line 3)")
    assert db.manifest["stages"]["chunk"]["options"]["id_field"] == "key"
    assert db.manifest["stages"]["chunk"]["options"]["text_field"] == "body"


def test_chunk_reports_skips_and_replacements(cli, tmp_path, make_corpus):
    root = make_corpus({"a.txt": "fine", "b.txt": "", "bin.txt": b"\x00\x01\x02", "c.txt": b"caf\xe9"})
    result = cli("chunk", root, "--out", tmp_path / "db")
    assert result.exit_code == 0, result.output
    assert "skipped 1 empty documents" in result.stdout
    assert "replaced invalid UTF-8 in 1 documents" in result.stdout
    assert f"warning: skipped binary file {root / 'bin.txt'}" in result.stderr
    result = cli("chunk", root, "--out", tmp_path / "db2", "--strict")
    assert result.exit_code == 2
    assert f"{root / 'c.txt'}: invalid UTF-8" in result.error_lines[0]


def test_overwrite_through_cli(cli, tmp_path, make_corpus):
    out = tmp_path / "db"
    assert cli("chunk", make_corpus({"a.txt": "one"}), "--out", out).exit_code == 0
    result = cli("chunk", make_corpus({"b.txt": "two"}), "--out", out)
    assert result.exit_code == 2
    assert result.error_lines == [f"error: {out}: already exists; pass --overwrite to replace it"]
    assert open_db(out).document_text(0) == "one"
    result = cli("chunk", make_corpus({"b.txt": "two"}), "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert open_db(out).document_text(0) == "two"


# -- bad input: exit 2, one line naming the file (and line/row), never a traceback ---------------------------

BAD = {
    "missing-path": ({}, ["{root}/nope.jsonl"], ["nope.jsonl", "no such file"]),
    "invalid-json": (
        {"c.jsonl": [{"text": "a"}, "{bad json"]},
        ["{root}/c.jsonl"],
        ["c.jsonl:2", "invalid JSON"],
    ),
    "missing-text-field": (
        {"c.jsonl": [{"txt": "a"}]},
        ["{root}/c.jsonl"],
        ["c.jsonl:1", "missing text field"],
    ),
    "non-string-text": ({"c.jsonl": [{"text": ["a"]}]}, ["{root}/c.jsonl"], ["c.jsonl:1", "is list"]),
    "parquet-null-row": (
        {"p.parquet": [{"text": "a"}, {"text": "b"}, {"text": None}]},
        ["{root}/p.parquet"],
        ["p.parquet", "row 2"],
    ),
    "unsupported-extension": ({"x.docx": "?"}, ["{root}/x.docx"], ["x.docx", "unsupported file type"]),
    "empty-corpus": ({"e.txt": "   "}, ["{root}"], ["empty corpus", "e.txt"]),
    # a directory without any corpus file: the message names the directory the user gave
    "no-corpus-files": ({"sub/notes.csv": "a,b"}, ["{root}"], ["empty corpus", "{root}", ".jsonl"]),
    # many empty files: the one line stays short
    "many-empty-files": ({f"f{i:02d}.txt": " " for i in range(40)}, ["{root}"], ["f00.txt", "and 37 more"]),
    "bad-gzip": (
        {"c.jsonl.gz": gzip.compress(b'{"text": "x"}\n')[:12]},
        ["{root}/c.jsonl.gz"],
        ["c.jsonl.gz"],
    ),
    "lone-surrogate-strict": (
        {"c.jsonl": ['{"text": "\\udc80"}']},
        ["{root}/c.jsonl", "--strict"],
        ["c.jsonl:1", "surrogate"],
    ),
    "markup-like-path": ({}, ["{root}/data[/bold]x.jsonl"], ["data[/bold]x.jsonl", "no such file"]),
    "bad-chunk-size": ({"a.txt": "x"}, ["{root}", "--chunk-size", "0"], ["--chunk-size"]),
    "bad-tokenizer": (
        {"a.txt": "x"},
        ["{root}", "--tokenizer", "{root}/none.json"],
        ["none.json", "not found"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_chunk_bad_input(cli, tmp_path, make_corpus, case):
    files, args, fragments = BAD[case]
    root = make_corpus(files)
    args = [a.replace("{root}", str(root)) for a in args]
    out = tmp_path / "db"
    result = cli("chunk", *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert result.exception is None, result.exception
    assert "Traceback" not in result.output
    assert len(result.error_lines) == 1, result.output
    for fragment in fragments:
        fragment = fragment.replace("{root}", str(root))
        assert fragment in result.error_lines[0], (fragment, result.error_lines[0])
    assert len(result.error_lines[0]) < 500
    assert result.stdout == ""  # errors go to stderr
    assert not out.exists() and not staging_path(tmp_path / "db").exists()


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [("missing", "no such DB directory"), ("not-db", "not a retro DB"), ("newer", "newer retrocli")],
)
def test_info_bad_db(cli, tmp_path, subset_db, setup, fragment):
    import shutil

    target = tmp_path / "db"
    if setup == "not-db":
        target.mkdir()
    elif setup == "newer":
        shutil.copytree(subset_db, target)
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["format_version"] = FORMAT_VERSION + 1
        (target / "manifest.json").write_text(json.dumps(manifest))
    for extra in ([], ["--json"]):
        result = cli("info", target, *extra)
        assert result.exit_code == 2, result.output
        assert result.exception is None
        assert len(result.error_lines) == 1 and fragment in result.error_lines[0]
        assert str(target) in result.error_lines[0]


def test_subprocess_errors_have_no_traceback(retro_proc, tmp_path, make_corpus):
    # the real console script, real stderr: same one-line contract as in-process
    root = make_corpus({"c.jsonl": [{"text": "ok"}, {"text": 3}]})
    result = retro_proc("chunk", root, "--out", tmp_path / "db")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert len(result.error_lines) == 1 and "c.jsonl:2" in result.error_lines[0]
    assert not (tmp_path / "db").exists()

    result = retro_proc("chunk", SUBSET_TRAIN, "--out", tmp_path / "db", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["counts"]["documents"] == open_db(tmp_path / "db").num_docs
    result = retro_proc("info", tmp_path / "db", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["stages"]["chunk"] == "complete"


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("chunk", "info", "train-tokenizer"):
        assert command in result.stdout


# -- usage errors, generate's output, a full disk ------------------------------------------------------------

@pytest.mark.parametrize(("args", "fragment"), [
    (["neighbors", "{db}", "--query", "a query", "--k", "abc"], "'--k'"),
    (["remove", "{db}", "--doc", "abc"], "'--doc'"),
    (["remove", "{db}", "--doc", "1.5"], "'--doc'"),
    (["info"], "Missing argument 'db'"),
    (["info", "{db}", "--bogus"], "No such option: --bogus"),
    (["nope"], "No such command 'nope'"),
])
def test_usage_errors_are_one_line(retro_proc, tmp_path, args, fragment):
    result = retro_proc(*[a.replace("{db}", str(tmp_path / "db")) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == result.error_lines, result.stderr  # no usage box around it
    assert len(result.error_lines) == 1 and fragment in result.error_lines[0], result.stderr
    assert f"see `retro{' ' + args[0] if args[0] != 'nope' else ''} --help`" in result.error_lines[0]


def test_usage_errors_leave_help_alone(cli):
    for args in (["--help"], ["info", "--help"]):
        result = cli(*args)
        assert result.exit_code == 0 and "Usage: retro" in result.stdout and not result.error_lines


def test_generate_prints_nothing_before_an_error(cli, tmp_path):
    result = cli("generate", "--db", tmp_path / "nope", "--prompt", "hello there")
    assert result.exit_code == 2 and result.exception is None
    assert result.stdout == ""  # the prompt used to come first
    assert len(result.error_lines) == 1 and "nope" in result.error_lines[0]


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs, mounted for the test (needs root and mount permission; skipped otherwise)."""
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("filler_kb", [300, 700, 900])
def test_a_full_disk_is_one_line_naming_the_file(retro_proc, full_disk, filler_kb):
    # the subset's DB takes ~850 KB: the disk fills in the tokenizer, the store metadata or a zarr chunk
    (full_disk / "filler").write_bytes(b"\0" * filler_kb * 1024)
    result = retro_proc("chunk", SUBSET_TRAIN, "--out", full_disk / "db")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.error_lines) == 1, result.output
    line = result.error_lines[0]
    assert line.startswith(f"error: no space left on device writing {full_disk}/"), line
    assert "rerun the same command" in line


HUGE = "99999999999"  # torch.set_num_threads raised ValueError on it, as a traceback


@pytest.mark.parametrize("command", [
    ["build-db", "{corpus}", "--out", "{tmp}/built"],
    ["embed", "{db}"],
    ["serve", "{db}"],
    ["neighbors", "{db}", "--input", "{corpus}", "--out", "{tmp}/nb"],
    ["add", "{db}", "{corpus}"],
    ["eval", "{db}", "--test", "{corpus}"],
    ["knn-datastore", "{db}", "--out", "{tmp}/store"],
    ["train", "{db}", "--neighbors", "{tmp}/nb", "--out", "{tmp}/model"],
])
def test_a_huge_thread_count_is_one_line_before_any_work(cli, tmp_path, tiny_db_copy, small_jsonl, command):
    # probe item 5: build-db had committed its chunk stage before the traceback
    args = [a.format(corpus=small_jsonl, tmp=tmp_path, db=tiny_db_copy) for a in command]
    before = (tiny_db_copy / "manifest.json").read_bytes()
    result = cli(*args, "--threads", HUGE)
    assert result.exit_code == 2 and result.exception is None, result.output
    assert result.error_lines == [f"error: --threads: must be at most 4096, not {HUGE}"]
    assert not (tmp_path / "built").exists() and (tiny_db_copy / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("option, value, words", [
    ("--seed", "99999999999999999999999", "at most 9223372036854775807"),  # was: Overflow when unpacking long long
    ("--seed", "-1", "≥ 0"),
    ("--max-new-tokens", "99999999999999999999", "at most 1000000"),  # was: TypeError with C++ frames
])
def test_generate_refuses_an_out_of_range_seed_or_length_in_one_line(cli, tiny_db, option, value, words):
    result = cli("generate", "--db", tiny_db, "--prompt", "hi", option, value)
    assert result.exit_code == 2 and result.exception is None and result.stdout == "", result.output
    assert len(result.error_lines) == 1 and result.error_lines[0].startswith(f"error: {option}: must be")
    assert words in result.error_lines[0]


def test_an_error_before_any_work_is_not_preceded_by_a_blank_line(tiny_db_copy, tmp_path, cli):
    # probe item L5: the progress display, started empty, ended with a blank line before the error
    added = cli("add", tiny_db_copy, tmp_path / "missing.jsonl")
    compacted = cli("compact", tiny_db_copy, "--out", tiny_db_copy)
    for result in (added, compacted):
        assert result.exit_code == 2 and result.stderr.startswith("error: "), repr(result.stderr)
        assert len(result.stderr.splitlines()) == 1, repr(result.stderr)


def test_an_error_after_streamed_text_starts_on_a_line_of_its_own(capsys):
    # probe item L5: a retriever failing mid-generation printed `…Theerror: http://…`
    import typer

    from retrocli.cli.common import handle_errors, stream_text
    from retrocli.errors import RetroError

    @handle_errors
    def generate_then_fail():
        stream_text("Once upon a time. The")
        raise RetroError("http://127.0.0.1:1: the retriever went away")

    with pytest.raises(typer.Exit):
        generate_then_fail()
    captured = capsys.readouterr()
    assert captured.out == "Once upon a time. The\n"
    assert captured.err == "error: http://127.0.0.1:1: the retriever went away\n"
