"""Integrity, tried as a hostile user would: outputs never land on, inside or around the input DB."""

import json
import shutil

import pytest
from helpers import RETRO_BIN, tree_snapshot

from retrocli.options import EmbedOptions
from retrocli.staging import staging_path


def refused(result, *fragments):
    """One clear line, exit 2, no traceback."""
    text = result.output
    return result.exit_code == 2 and "Traceback" not in text and all(f in text for f in fragments)


@pytest.mark.parametrize("spelling", ["dotdot", "symlink", "trailing-slash"])
def test_dedupe_never_deletes_its_input_db(tiny_db_copy, planted, cli, spelling):
    db = tiny_db_copy
    out = {"dotdot": db / ".." / db.name, "trailing-slash": f"{db}/", "symlink": db.parent / "link"}[spelling]
    if spelling == "symlink":
        out.symlink_to(db, target_is_directory=True)
    before = tree_snapshot(db)
    result = cli("dedupe", db, "--test", planted, "--out", out, "--overwrite")
    assert refused(result, "--out", "is the input DB"), result.output
    assert tree_snapshot(db) == before
    assert not staging_path(db).exists()


def test_dedupe_refuses_an_out_inside_or_around_the_db(tiny_db_copy, planted, cli):
    db = tiny_db_copy
    before = tree_snapshot(db)
    assert refused(cli("dedupe", db, "--test", planted, "--out", db / "clean"), "is inside the input DB")
    assert refused(cli("dedupe", db, "--test", planted, "--out", db.parent, "--overwrite"), "contains the input DB")
    assert tree_snapshot(db) == before


def test_dedupe_replaces_a_symlinked_out_with_one_line_not_a_traceback(tiny_db, planted, cli, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere, target_is_directory=True)
    assert refused(cli("dedupe", tiny_db, "--test", planted, "--out", link, "--overwrite"), "symbolic link")


@pytest.mark.parametrize("option, target", [
    ("--json-out", "manifest.json"), ("--html", "report.html"), ("--work-dir", "work"), ("--work-dir", "."),
])
def test_leakage_report_never_writes_into_the_db(tiny_db_copy, planted, cli, option, target):
    db = tiny_db_copy
    before = tree_snapshot(db)
    result = cli("leakage-report", db, "--test", planted, option, db / target)
    assert refused(result, option), result.output
    assert tree_snapshot(db) == before


def test_report_files_stay_out_of_the_work_dir(tiny_db, planted, cli, tmp_path):
    work = tmp_path / "work"
    result = cli("leakage-report", tiny_db, "--test", planted, "--work-dir", work, "--json-out", work / "r.json")
    assert refused(result, "--json", "--work-dir")


def test_eval_work_dir_and_neighbors_out_and_train_out_stay_outside_the_db(tiny_db_copy, small_jsonl, cli):
    db = tiny_db_copy
    before = tree_snapshot(db)
    assert refused(cli("eval", db, "--test", small_jsonl, "--work-dir", db / "w"), "--work-dir", "inside")
    assert refused(cli("neighbors", db, "--input", small_jsonl, "--out", db / "nb"), "--out", "inside")
    assert refused(cli("neighbors", db, "--input", db, "--out", db.parent, "--overwrite"), "--out", "contains")
    assert refused(cli("train", db, "--neighbors", db.parent / "nb", "--out", db / "model"), "--out", "inside")
    assert tree_snapshot(db) == before


def test_chunk_out_never_holds_or_replaces_its_input(tmp_path, small_jsonl, cli):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text " * 50)
    assert refused(cli("chunk", corpus, "--out", corpus, "--overwrite"), "--out", "is the input")
    assert refused(cli("chunk", corpus / "a.txt", "--out", corpus, "--overwrite"), "contains the input")
    assert (corpus / "a.txt").read_text() == "some text " * 50
    # a DB inside the corpus directory is fine: the corpus is only read
    assert cli("chunk", corpus, "--out", corpus / "db").exit_code == 0


# -- index shards and paths read from a manifest -------------------------------------------------------

def edit_manifest(db, change):
    import json

    path = db / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_changed_shard_byte_is_caught_before_hnswlib_reads_it(tiny_db_copy, retro_proc):
    shard = next((tiny_db_copy / "index").glob("*.hnsw"))
    data = bytearray(shard.read_bytes())
    data[9] ^= 0x55  # inside the header, size unchanged
    shard.write_bytes(bytes(data))
    result = retro_proc("neighbors", tiny_db_copy, "--query", "some text")  # a real process: a crash shows
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "sha256 differs" in result.stderr and "retro index" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("change, message", [
    (lambda m: m["index"].update(shards=[]), "do not cover"),
    (lambda m: m["index"]["shards"].__setitem__(0, {**m["index"]["shards"][0], "count": 3}), "do not cover"),
    (lambda m: m["index"].update(dim=m["index"]["dim"] + 1), "embedder gives"),
    (lambda m: m["index"]["shards"][0].update(file="../../outside/evil.hnsw"), "outside the DB"),
    (lambda m: m["index"]["shards"][0].update(file="/etc/passwd"), "outside the DB"),
    (lambda m: m["index"]["shards"][0].pop("sha256"), "no checksum"),
])
def test_a_damaged_index_manifest_is_refused_not_answered(tiny_db_copy, cli, change, message):
    edit_manifest(tiny_db_copy, change)
    assert refused(cli("neighbors", tiny_db_copy, "--query", "some text"), message)


def test_a_manifest_cannot_point_the_embedder_at_other_weights(tiny_db_copy, cli, tmp_path):
    """The weights are checked against the recorded sha256 before transformers loads anything."""
    evil = tmp_path / "evil-model"
    evil.mkdir()
    (evil / "config.json").write_text("{not json: loading this would fail differently")
    (evil / "model.safetensors").write_bytes(b"not the DB's weights")
    edit_manifest(tiny_db_copy, lambda m: m["embedder"].update(name=str(evil)))
    assert refused(cli("neighbors", tiny_db_copy, "--query", "some text"), "weights differ")


def test_pickled_weights_are_refused(tiny_bert, cli, tmp_path):
    import shutil

    pickled = tmp_path / "pickled-bert"
    shutil.copytree(tiny_bert, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    fresh = tmp_path / "fresh"
    (tmp_path / "x.txt").write_text("a short document " * 40)
    assert cli("chunk", tmp_path / "x.txt", "--out", fresh).exit_code == 0
    assert refused(cli("embed", fresh, "--embedder", pickled), "safetensors")


# -- the terminal -----------------------------------------------------------------------------------------

class RecordingProgress:
    """A Progress that remembers every advance of every stage."""

    def __init__(self):
        self.advances: dict[str, list[int]] = {}

    def start(self, name, total, unit, completed=0):
        record = self.advances.setdefault(name, [])

        class Task:
            def advance(self, n=1):
                record.append(n)

            def finish(self):
                pass

        return Task()


def test_embed_progress_moves_per_batch_on_a_db_smaller_than_one_block(tmp_path, small_jsonl, tiny_bert):
    from retrocli.chunk import chunk_corpus
    from retrocli.embed import embed_db

    db = chunk_corpus([small_jsonl], tmp_path / "db")
    assert db.num_chunks < 4096  # one block: the bar used to sit at 0 % until the very end
    progress = RecordingProgress()
    embed_db(db.path, progress=progress, options=EmbedOptions(embedder=tiny_bert, batch_size=8))
    steps = progress.advances["embed"]
    from retrocli.embed import chunk_texts, get_embedder, length_batches

    embedder = get_embedder(tiny_bert, "auto", 8)
    encoded = embedder.tokenizer(chunk_texts(db, 0, db.num_chunks), truncation=True,
                                 max_length=embedder.info.max_seq_length)["input_ids"]
    assert sum(steps) == db.num_chunks and len(steps) == len(length_batches(encoded, 8)) > 1 and max(steps) <= 8


WEIRD = "we[/]ird:fire:[bold]x"  # rich markup and an emoji code in a directory name


def test_markup_and_emoji_in_user_text_print_as_typed(tmp_path, small_jsonl, planted, tiny_bert, retro_proc,
                                                      monkeypatch):
    """Every command that prints a user path, query or corpus text: exit 0, the text verbatim, no emoji."""
    monkeypatch.setenv("COLUMNS", "400")  # tables fold long cells; how long tmp_path is must not matter
    root = tmp_path / WEIRD  # "[/]" spans two directories: "we[" and "]ird:fire:[bold]x"
    root.mkdir(parents=True)
    db, nb, model = root / "db", root / "nb", root / "model"

    def ok(*args):
        result = retro_proc(*args, timeout=300)
        text = result.stdout + result.stderr
        assert result.exit_code == 0 and "Traceback" not in text, (args, text)
        assert "🔥" not in text, (args, text)
        return text

    def verbatim(text):  # long paths wrap in tables, so look for the pieces rich would have eaten
        return all(piece in text for piece in ("[/]", ":fire:", "[bold]"))

    assert verbatim(ok("chunk", small_jsonl, "--out", root / "chunks"))
    assert verbatim(ok("info", root / "chunks"))
    assert verbatim(ok("build-db", small_jsonl, "--out", db, "--embedder", tiny_bert, "--block-size", "64"))
    query = ":fire: [/] [bold]class definitions"
    assert verbatim(ok("neighbors", db, "--query", query, "--k", "1"))
    assert verbatim(ok("neighbors", db, "--input", db, "--out", nb, "--k", "2", "--exclude-same-doc"))
    assert verbatim(ok("leakage-report", db, "--test", planted, "--k", "2", "--json-out", root / "r.json",
                       "--html", root / "r.html"))
    assert verbatim(ok("dedupe", db, "--test", planted, "--k", "2", "--out", root / "clean",
                       "--jaccard-threshold", "1"))
    assert verbatim(ok("train", db, "--neighbors", nb, "--out", model, "--config", "tiny", "--seq-len", "128",
                       "--steps", "2", "--warmup", "1"))
    ok("eval", db, "--test", small_jsonl, "--model", model, "--no-leakage")
    ok("generate", "--db", db, "--model", model, "--prompt", query, "--max-new-tokens", "4", "--show-neighbors")


# -- one writer at a time ---------------------------------------------------------------------------------

def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tiny_db_copy, cli):
    from retrocli.lock import writer_lock

    before = tree_snapshot(tiny_db_copy)
    with writer_lock(tiny_db_copy, "retro embed (test)"):
        assert refused(cli("index", tiny_db_copy, "--overwrite"), "another writer holds the DB", "retro embed")
        assert refused(cli("embed", tiny_db_copy), "another writer holds the DB")
        # readers never need it
        assert cli("neighbors", tiny_db_copy, "--query", "some text", "--k", "1").exit_code == 0
    assert tree_snapshot(tiny_db_copy) == before


def test_a_lock_from_another_host_is_refused_and_says_how_to_clear_it(tiny_db_copy, cli):
    import json

    from retrocli.lock import lock_path

    lock_path(tiny_db_copy).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "command": "retro x"}))
    assert refused(cli("index", tiny_db_copy, "--overwrite"), "elsewhere.example", "delete")


def test_kill_9_leaves_a_dead_lock_that_the_next_writer_takes_over(tmp_path, subset_db, tiny_bert, retro_proc):
    import json
    import shutil
    import signal
    import subprocess
    import time

    import numpy as np
    from helpers import RETRO_BIN

    from retrocli.db import open_db
    from retrocli.lock import lock_path

    db = tmp_path / "db"
    shutil.copytree(subset_db, db)
    slow = subprocess.Popen([str(RETRO_BIN), "embed", str(db), "--embedder", tiny_bert, "--batch-size", "1",
                             "--block-size", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            manifest = json.loads((db / "manifest.json").read_text())
            if manifest.get("stages", {}).get("embed", {}).get("done_blocks"):
                break
            time.sleep(0.05)
        assert lock_path(db).exists() and slow.poll() is None, "the first writer finished too soon to be killed"
        second = retro_proc("embed", db, "--embedder", tiny_bert)
        assert second.exit_code == 2 and "another writer holds the DB" in second.stderr
        slow.send_signal(signal.SIGKILL)
        slow.wait()
    finally:
        if slow.poll() is None:
            slow.kill()
    assert lock_path(db).exists()  # kill -9 ran no cleanup
    third = retro_proc("embed", db, "--embedder", tiny_bert, timeout=300)
    assert third.exit_code == 0 and "took over the lock" in third.stderr, third.stderr
    assert not lock_path(db).exists()
    vectors = open_db(db).root["embeddings"][:]
    assert open_db(db).stage("embed") == "complete" and not (np.abs(vectors).sum(axis=1) == 0).any()


# -- inputs given twice, and inputs that are DBs ----------------------------------------------------------

def test_the_same_input_twice_is_refused_unless_allowed(tmp_path, small_jsonl, cli):
    assert refused(cli("chunk", small_jsonl, small_jsonl, "--out", tmp_path / "a"), "given twice",
                   "--allow-duplicates")
    assert refused(cli("chunk", small_jsonl.parent, small_jsonl, "--out", tmp_path / "b"), "given twice")
    assert not (tmp_path / "a").exists() and not staging_path(tmp_path / "a").exists()
    once = cli("chunk", small_jsonl, "--out", tmp_path / "once", "--json")
    twice = cli("chunk", small_jsonl, small_jsonl, "--out", tmp_path / "twice", "--allow-duplicates", "--json")
    assert twice.exit_code == 0
    import json

    assert json.loads(twice.stdout)["counts"]["documents"] == 2 * json.loads(once.stdout)["counts"]["documents"]


def test_neighbors_never_embeds_an_input_db_in_place(tiny_db, tmp_path, small_jsonl, cli):
    other = tmp_path / "other"
    assert cli("chunk", small_jsonl, "--out", other, "--tokenizer", "retrocli-bpe-8k").exit_code == 0
    before = tree_snapshot(other)
    result = cli("neighbors", tiny_db, "--input", other, "--out", tmp_path / "nb")
    assert refused(result, "not embedded", "retro embed")
    assert tree_snapshot(other) == before


# -- help text and --json ---------------------------------------------------------------------------------

def test_leakage_report_json_is_a_flag_like_everywhere_and_json_out_writes_a_file(tiny_db, planted, cli, tmp_path):
    import json

    flag = cli("leakage-report", tiny_db, "--test", planted, "--k", "2", "--json", "--examples", "1")
    assert flag.exit_code == 0, flag.output
    data = json.loads(flag.stdout)  # stdout is the JSON alone
    assert data["num_test_docs"] == 3 and data["k"] == 2
    out = tmp_path / "r.json"
    written = cli("leakage-report", tiny_db, "--test", planted, "--k", "2", "--json-out", out)
    assert written.exit_code == 0 and json.loads(out.read_text())["leaking_chunks"] == data["leaking_chunks"]
    old = tmp_path / "old.json"  # `--json PATH` is not a spelling: the path is an unexpected argument
    assert refused(cli("leakage-report", tiny_db, "--test", planted, "--k", "2", "--json", old), "unexpected")
    assert not old.exists()
    assert refused(cli("leakage-report", tiny_db, "--test", planted, "stray", "args"), "unexpected")


def test_flags_have_no_no_twin_and_show_no_type(cli):
    generate = cli("generate", "--help").stdout
    assert "--no-retrieval" in generate and "--no-no-retrieval" not in generate
    for command in ("chunk", "index", "dedupe", "train", "neighbors", "generate"):
        text = cli(command, "--help").stdout
        assert "--no-overwrite" not in text and "--no-resume" not in text and "--no-strict" not in text
        assert "<bool>" not in text, command  # neither our flags nor typer's own --help
    assert "<bool>" not in cli("--help").stdout
    assert "--dask" not in cli("train", "--help").stdout


def test_usage_lines_name_arguments_in_capitals_not_braces(cli):
    assert "Usage: retro info [OPTIONS] DB" in cli("info", "--help").stdout
    assert "Usage: retro chunk [OPTIONS] INPUTS..." in cli("chunk", "--help").stdout
    assert "{" not in cli("neighbors", "--help").stdout.splitlines()[1]


def test_version(cli):
    from retrocli import __version__

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"retro {__version__}"


# -- every bad input is one line, exit 2 --------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    (lambda m: m.pop("counts"), "counts"),
    (lambda m: m.update(stages="x"), "stages"),
    (lambda m: m.update(chunk_size="abc"), "chunk_size"),
    (lambda m: m.update(format_version=0), "format_version"),
    (lambda m: m.update(format_version=-1), "format_version"),
    (lambda m: m["counts"].update(chunks=None), "counts.chunks"),
    (lambda m: m["tokenizer"].pop("sha256"), "tokenizer.sha256"),
    (lambda m: m["stages"].update(embed="done"), "stages.embed"),
    (lambda m: m["embedder"].update(dim="384"), "embedder.dim"),
    (lambda m: m["index"]["shards"].append("shard"), "index.shards[1]"),
    (lambda m: m["index"]["shards"][0].update(count=-5), "index.shards[0].count"),
])
@pytest.mark.parametrize("command", ["info", "neighbors"])
def test_a_manifest_of_the_wrong_shape_is_one_line_naming_the_field(tiny_db_copy, cli, change, field, command):
    edit_manifest(tiny_db_copy, change)
    args = ["--query", "text"] if command == "neighbors" else []
    assert refused(cli(command, tiny_db_copy, *args), "manifest.json", f"'{field}'")


@pytest.mark.parametrize("args, option", [
    (["embed", "{db}", "--threads", "-1"], "--threads"),
    (["index", "{db}", "--threads", "0"], "--threads"),
    (["neighbors", "{db}", "--query", "x", "--ef", "0"], "--ef"),
    (["neighbors", "{db}", "--query", "x", "--ef", "-1"], "--ef"),
    (["neighbors", "{db}", "--input", "{db}", "--out", "{tmp}/nb", "--ef", "0"], "--ef"),
    (["eval", "{db}", "--test", "{corpus}", "--model", "{model}", "--batch-size", "0"], "--batch-size"),
    (["train", "{db}", "--neighbors", "{nb}", "--out", "{tmp}/m", "--lr", "nan"], "--lr"),
    (["train", "{db}", "--neighbors", "{nb}", "--out", "{tmp}/m", "--batch-size", "0"], "--batch-size"),
    (["train", "{db}", "--neighbors", "{nb}", "--out", "{tmp}/m", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["train", "{db}", "--neighbors", "{nb}", "--out", "{tmp}/m", "--window-exclusion", "none"], "--window-exclusion"),
    (["generate", "--db", "{db}", "--model", "{model}", "--prompt", "x", "--top-p", "2"], "--top-p"),
    (["generate", "--db", "{db}", "--model", "{model}", "--prompt", "x", "--top-k", "0"], "--top-k"),
    (["generate", "--db", "{db}", "--model", "{model}", "--prompt", "x", "--k", "0"], "--k"),
    (["generate", "--db", "{db}", "--model", "{model}", "--prompt", "x", "--temperature", "nan"], "--temperature"),
])
def test_out_of_range_options_are_one_line(tiny_db_copy, self_neighbors, trained, small_jsonl, tmp_path, cli, args,
                                           option):
    fill = {"{db}": tiny_db_copy, "{nb}": self_neighbors, "{model}": trained[0], "{corpus}": small_jsonl}
    real = [str(fill.get(a, a)).replace("{tmp}", str(tmp_path)) for a in args]
    before = tree_snapshot(tiny_db_copy)
    assert refused(cli(*real), option)
    assert tree_snapshot(tiny_db_copy) == before
    assert not (tmp_path / "m").exists() and not (tmp_path / "nb").exists()


def test_a_chunk_only_db_asks_for_retro_embed_before_touching_the_test_set(tmp_path, small_jsonl, cli):
    db, work = tmp_path / "chunks", tmp_path / "work"
    assert cli("chunk", small_jsonl, "--out", db).exit_code == 0
    assert refused(cli("leakage-report", db, "--test", small_jsonl, "--work-dir", work), "run `retro embed")
    assert refused(cli("eval", db, "--test", small_jsonl, "--work-dir", work), "run `retro embed")
    assert not work.exists()


@pytest.mark.parametrize("damage", ["missing", "garbage", "other"])
def test_a_missing_or_garbage_tokenizer_is_one_line(tiny_db_copy, trained, cli, damage):
    file = tiny_db_copy / "tokenizer.json"
    if damage == "missing":
        file.unlink()
    else:
        file.write_text("{not json" if damage == "garbage" else '{"version": "1.0", "model": {}}')
    assert refused(cli("neighbors", tiny_db_copy, "--query", "some text"), "tokenizer.json")
    assert refused(cli("generate", "--db", tiny_db_copy, "--model", trained[0], "--prompt", "x"), "tokenizer.json")


@pytest.mark.parametrize("change, message", [
    ({"n_head": 0}, "n_head must be a positive integer"),
    ({"n_layer": 10**6}, "parameters"),
    ({"d_ff": 10**10}, "parameters"),
    ({"d_model": "wide"}, "d_model must be a positive integer"),
])
def test_a_model_config_out_of_range_is_refused_before_allocating(trained, tiny_db, tmp_path, cli, change, message):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(trained[0], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    assert refused(cli("generate", "--db", tiny_db, "--model", model, "--prompt", "x"), "config.json", message)


@pytest.mark.parametrize("meta", ["{garbage", "{}", "[]", '{"tokenizer_sha256": 5, "chunk_size": 64}'])
def test_garbage_model_metadata_is_one_line(trained, tiny_db, tmp_path, cli, meta):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(trained[0], model)
    (model / "retrocli_model.json").write_text(meta)
    assert refused(cli("generate", "--db", tiny_db, "--model", model, "--prompt", "x"), "retrocli_model.json")


# -- documents are named by their ids ---------------------------------------------------------------------

def test_documents_are_named_by_id_first_in_neighbors_and_the_leakage_report(tiny_db, planted, cli):
    import json

    from retrocli.db import open_db

    db = open_db(tiny_db)
    ext = db.external_id(3)
    assert ext  # the subset's records carry an "id" field, used by default
    shown = cli("neighbors", tiny_db, "--query", db.chunk_text(int(db.doc_chunks(3).start)), "--k", "1",
                "--json").stdout
    top = json.loads(shown)["chunks"][0]["neighbors"][0]
    assert top["source"].startswith(f"{ext} (") and "line 4)" in top["source"]
    report = json.loads(cli("leakage-report", tiny_db, "--test", planted, "--k", "2", "--json").stdout)
    pair = report["near_duplicates"][0]
    assert pair["db_source"].startswith(f"{db.external_id(1)} (")


# -- very long documents ------------------------------------------------------------------------------------

def test_long_documents_are_tokenized_in_windows_with_identical_chunks(tmp_path, subset_db, monkeypatch):
    """With windows of 500 characters every subset document is cut many times; the chunks are the same."""
    import numpy as np
    from helpers import SUBSET_TRAIN

    import retrocli.chunk as chunk_module
    from retrocli.chunk import chunk_corpus, whitespace_windows
    from retrocli.db import open_db

    text = "word " * 300 + "x" * 1200 + " tail\n\nend"
    pieces = whitespace_windows(text, 500)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 500
    assert all(p[0].isspace() for p in pieces[1:] if not p.startswith("x"))  # cut before the next word
    monkeypatch.setattr(chunk_module, "LONG_DOC_WINDOW", 500)
    calls = []
    real = chunk_module.whitespace_windows
    monkeypatch.setattr(chunk_module, "whitespace_windows", lambda t, size: calls.append(size) or real(t, size))
    windowed = chunk_corpus([SUBSET_TRAIN], tmp_path / "db")
    whole = open_db(subset_db)
    assert windowed.num_chunks == whole.num_chunks
    assert np.array_equal(windowed.root["chunks/tokens"][:], whole.root["chunks/tokens"][:])
    assert np.array_equal(windowed.chunk_length, whole.chunk_length)
    assert len(calls) > 50 and set(calls) == {500}  # most documents really went through windows


# -- 3. a missing or damaged zarr file is an error naming the array and the chunk, never fill values ----------

def zarr_file(db, array, chunk="c/0/0"):
    return db / "store.zarr" / array / chunk


@pytest.mark.parametrize("array, chunk", [("chunks/tokens", "c/0/0"), ("embeddings", "c/1/0"),
                                          ("docs/chunk_offset", "c/0"), ("chunks/tokens", "zarr.json")])
def test_a_deleted_zarr_file_is_refused_naming_array_and_chunk(tiny_db_copy, cli, array, chunk):
    zarr_file(tiny_db_copy, array, chunk).unlink()
    label = "zarr.json" if chunk == "zarr.json" else "chunk " + ",".join(chunk.split("/")[1:])
    result = cli("neighbors", tiny_db_copy, "--query", "some text")
    assert refused(result, f"{label} of array {array} is missing", "retro verify"), result.output
    assert "damaged" in cli("info", tiny_db_copy).output
    report = cli("verify", tiny_db_copy)
    assert report.exit_code == 1 and f"{label} of array {array} is missing" in report.output


def test_a_truncated_chunk_is_one_line_not_a_zstd_traceback(tiny_db_copy, retro_proc):
    file = zarr_file(tiny_db_copy, "chunks/tokens")
    file.write_bytes(file.read_bytes()[:100])
    result = retro_proc("neighbors", tiny_db_copy, "--query", "some text")
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert "chunk 0,0 of array chunks/tokens is 100 bytes" in result.stderr


def test_a_changed_byte_of_the_same_size_is_caught_when_read_and_by_verify(tiny_db_copy, cli):
    file = zarr_file(tiny_db_copy, "chunks/tokens")
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    assert cli("info", tiny_db_copy).exit_code == 0  # a stat per file cannot see it: verify and reads do
    result = cli("neighbors", tiny_db_copy, "--query", "some text")
    assert refused(result, "chunk 0,0 of array chunks/tokens does not match its recorded sha256"), result.output
    report = cli("verify", tiny_db_copy, "--json")
    data = json.loads(report.stdout)
    assert report.exit_code == 1 and not data["ok"]
    assert [s["status"] for s in data["stages"]] == ["complete", "damaged", "complete", "complete"]


def test_leakage_gate_fails_on_a_damaged_db_instead_of_passing(tiny_db_copy, planted, cli):
    gate = ("leakage-report", tiny_db_copy, "--test", planted, "--fail-above", "0")
    assert cli(*gate).exit_code == 1  # intact: the planted text leaks
    zarr_file(tiny_db_copy, "chunks/tokens").unlink()
    assert refused(cli(*gate), "of array chunks/tokens is missing")


def test_a_chunk_file_the_stage_never_wrote_is_reported(tiny_db_copy, cli):
    extra = zarr_file(tiny_db_copy, "embeddings", "c/99/0")
    extra.parent.mkdir()
    extra.write_bytes(zarr_file(tiny_db_copy, "embeddings", "c/0/0").read_bytes())
    report = cli("verify", tiny_db_copy)
    assert report.exit_code == 1 and "chunk 99,0 of array embeddings was not written by its stage" in report.output


def test_an_intact_db_verifies_and_info_says_complete(tiny_db, cli):
    before = tree_snapshot(tiny_db)
    report = cli("verify", tiny_db, "--json")
    data = json.loads(report.stdout)
    assert report.exit_code == 0 and data["ok"] and data["problems"] == []
    assert {s["stage"] for s in data["stages"]} == {"tokenizer", "chunk", "embed", "index"}
    assert data["files"] > 4 and data["bytes"] > 0
    assert json.loads(cli("info", tiny_db, "--json").stdout)["stages"] == {
        "chunk": "complete", "embed": "complete", "index": "complete"}
    assert tree_snapshot(tiny_db) == before  # verify and info are reads


def test_a_db_without_recorded_checksums_reads_but_does_not_verify(tiny_db_copy, cli):
    edit_manifest(tiny_db_copy, lambda m: m["stages"]["chunk"].pop("files"))
    assert cli("neighbors", tiny_db_copy, "--query", "some text").exit_code == 0
    assert json.loads(cli("info", tiny_db_copy, "--json").stdout)["stages"]["chunk"] == "complete (unverified)"
    report = cli("verify", tiny_db_copy)
    assert report.exit_code == 1 and "records no checksums" in report.output


@pytest.mark.parametrize("files", [{"../../outside": {}}, {"chunks/tokens": {"../../../etc/passwd": [1, "x"]}},
                                   {"chunks/tokens": {"c/0/0": "abc"}}, "x"])
def test_a_files_record_that_points_outside_or_has_the_wrong_shape_is_refused(tiny_db_copy, cli, files):
    edit_manifest(tiny_db_copy, lambda m: m["stages"]["chunk"].update(files=files))
    assert refused(cli("verify", tiny_db_copy), "stages.chunk.files")
    assert refused(cli("info", tiny_db_copy), "stages.chunk.files")


def test_deduped_and_query_dbs_record_their_files_too(tiny_db, planted, tmp_path, cli):
    out = tmp_path / "clean"
    assert cli("dedupe", tiny_db, "--test", planted, "--out", out).exit_code == 0
    assert cli("verify", out).exit_code == 0
    nb = tmp_path / "nb"
    assert cli("neighbors", tiny_db, "--input", planted, "--out", nb).exit_code == 0
    assert cli("verify", nb / "queries").exit_code == 0


def test_damaged_or_moved_batch_neighbours_are_refused(tiny_db, planted, tmp_path, cli):
    from retrocli.errors import RetroError
    from retrocli.neighbor_arrays import open_neighbors, query_db_of

    nb = tmp_path / "nb"
    assert cli("neighbors", tiny_db, "--input", planted, "--out", nb).exit_code == 0
    moved = tmp_path / "moved"
    nb.rename(moved)  # the chunked test set is recorded relative to the directory: it moves with it
    assert query_db_of(moved, open_neighbors(moved)).num_chunks > 0
    edit_manifest(moved, lambda m: m.update(query_db="../../elsewhere"))
    with pytest.raises(RetroError, match="lies outside"):
        query_db_of(moved, open_neighbors(moved))
    edit_manifest(moved, lambda m: m.update(query_db=str(tiny_db)))
    with pytest.raises(RetroError, match="content differs"):
        query_db_of(moved, open_neighbors(moved))
    zarr_file(moved, "ids").unlink()
    with pytest.raises(RetroError, match="chunk 0,0 of array ids is missing"):
        open_neighbors(moved)


# -- 7. a full disk is one line, and the same command resumes once space is freed ----------------------------

def run_on_small_disk(tmp_path, script: str, **env) -> dict:
    """Run a bash script in a private mount namespace with a small tmpfs at $DISK; returns each step's
    rc and stderr, written by the script as $OUT/<step>.rc / .err (outside the tmpfs). Skipped where no
    mount namespace can be made."""
    import os
    import subprocess

    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    step = 'step() { name=$1; shift; "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"; echo $? > "$OUT/$name.rc"; }\n'
    body = f"set -u\nmount -t tmpfs -o size=$SIZE tmpfs \"$DISK\"\n{step}{script}"
    result = subprocess.run([*prefix, "bash", "-c", body], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DISK": str(disk), "OUT": str(out), "RETRO": str(RETRO_BIN),
                                 **{k: str(v) for k, v in env.items()}}, check=False)
    assert result.returncode == 0, result.stderr
    steps = {}
    for rc in out.glob("*.rc"):
        steps[rc.stem] = (int(rc.read_text()), (out / f"{rc.stem}.err").read_text())
    return steps


FILL = 'avail=$(df --output=avail -B1 "$DISK" | tail -1); fallocate -l $((avail - LEAVE)) "$DISK/filler"\n'


def test_a_full_disk_during_embed_is_one_line_and_the_rerun_resumes(tmp_path, small_jsonl, tiny_bert, cli):
    from retrocli.db import open_db

    chunked = tmp_path / "chunked"
    assert cli("chunk", small_jsonl, "--out", chunked).exit_code == 0
    reference = tmp_path / "reference"
    shutil.copytree(chunked, reference)
    assert cli("embed", reference, "--embedder", tiny_bert, "--block-size", "8").exit_code == 0
    blocks = len(list((reference / "store.zarr" / "embeddings" / "c").glob("*/*")))
    embed = f'"$RETRO" embed "$DISK/db" --embedder {tiny_bert} --block-size 8'
    steps = run_on_small_disk(tmp_path, f'''
cp -r {chunked} "$DISK/db"
{FILL}step full {embed}
cp "$DISK/db/manifest.json" "$OUT/manifest-after-full.json"
rm "$DISK/filler"
step rerun {embed}
step verify "$RETRO" verify "$DISK/db"
cp -r "$DISK/db" "$OUT/db"
''', SIZE="8m", LEAVE=4096 * (blocks // 2))
    rc, err = steps["full"]
    assert rc == 2 and "no space left on device" in err and "rerun the same command" in err, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    half = json.loads((tmp_path / "out" / "manifest-after-full.json").read_text())
    assert half["stages"]["embed"]["status"] == "running" and 0 < len(half["stages"]["embed"]["done_blocks"]) < blocks
    assert steps["rerun"][0] == 0, steps["rerun"][1]
    assert steps["verify"][0] == 0, steps["verify"][1]
    resumed, whole = open_db(tmp_path / "out" / "db"), open_db(reference)
    assert (resumed.root["embeddings"][:] == whole.root["embeddings"][:]).all()


def test_a_full_disk_while_saving_an_index_shard_is_caught_not_recorded(tmp_path, small_jsonl, tiny_bert, cli):
    embedded = tmp_path / "embedded"
    assert cli("chunk", small_jsonl, "--out", embedded).exit_code == 0
    assert cli("embed", embedded, "--embedder", tiny_bert).exit_code == 0
    steps = run_on_small_disk(tmp_path, f'''
cp -r {embedded} "$DISK/db"
{FILL}step full "$RETRO" index "$DISK/db"
cp "$DISK/db/manifest.json" "$OUT/manifest-after-full.json"
ls "$DISK/db/index" > "$OUT/index-files.txt" 2>/dev/null || true
rm "$DISK/filler"
step rerun "$RETRO" index "$DISK/db"
step verify "$RETRO" verify "$DISK/db"
''', SIZE="8m", LEAVE=16384)  # room for the manifest's updates, not for the ~27 KB shard
    rc, err = steps["full"]
    assert rc == 2 and "no space left on device" in err and "Traceback" not in err, err
    assert "index shard was cut short" in err or "shard-00000" in err, err
    half = json.loads((tmp_path / "out" / "manifest-after-full.json").read_text())
    assert half["stages"]["index"]["status"] == "running" and not half["index"]["shards"]
    assert ".partial" not in (tmp_path / "out" / "index-files.txt").read_text()  # the cut shard is removed
    assert steps["rerun"][0] == 0 and steps["verify"][0] == 0, steps


# -- 12. an HF id with no network is one line at once, not the hub client's retries --------------------------

def test_an_uncached_hf_id_offline_fails_fast_in_one_line(tmp_path, small_jsonl, cli, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    db = tmp_path / "db"
    assert cli("chunk", small_jsonl, "--out", db).exit_code == 0
    result = cli("embed", db, "--embedder", "retro-tests/no-such-model")
    assert refused(result, "not in the Hugging Face cache", "out of reach", "--embedder DIR"), result.output
    assert len(result.output.strip().splitlines()) == 1  # no retry lines
    assert refused(cli("embed", db, "--embedder", "./no/such/dir"), "no such directory")
