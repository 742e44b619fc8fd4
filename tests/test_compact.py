"""`retro compact`: a DB without its removed documents, equal to building the documents it keeps."""

import json
import shutil

import numpy as np
import pytest
from helpers import tree_snapshot

from retrocli.add import add_documents
from retrocli.build_db import build_db
from retrocli.compact import compact_db
from retrocli.db import load_embeddings, open_db
from retrocli.options import EmbedOptions
from retrocli.remove import remove_documents
from retrocli.staging import staging_path
from retrocli.verify import verify_db


def test_compact_after_add_and_remove_equals_a_build_of_what_is_left(tmp_path, small_jsonl, tiny_bert, cli):
    lines = small_jsonl.read_text().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[:8]) + "\n")
    b.write_text("\n".join(lines[8:]) + "\n")
    build_db([a], tmp_path / "db", embed_options=EmbedOptions(embedder=tiny_bert, block_size=16))
    add_documents(tmp_path / "db", [b])
    remove_documents(tmp_path / "db", docs=[1, 9])  # one of the base, one added
    before = (tmp_path / "db" / "manifest.json").read_bytes()
    result = cli("compact", tmp_path / "db", "--out", tmp_path / "compact", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["derived_from"]["removed_documents"] == [1, 9]
    assert (tmp_path / "db" / "manifest.json").read_bytes() == before  # the input is only read

    kept = [line for i, line in enumerate(lines) if i not in (1, 9)]
    (tmp_path / "kept.jsonl").write_text("\n".join(kept) + "\n")
    fresh = build_db(
        [tmp_path / "kept.jsonl"], tmp_path / "fresh", embed_options=EmbedOptions(embedder=tiny_bert, block_size=16),
    )
    new = open_db(tmp_path / "compact")
    assert new.version == 1 and not new.manifest.get("segments") and not new.removed_docs
    assert (new.num_docs, new.num_chunks) == (fresh.num_docs, fresh.num_chunks)
    assert np.array_equal(new.tokens_block(0, new.num_chunks)[0], fresh.tokens_block(0, fresh.num_chunks)[0])
    assert np.array_equal(new.doc_offsets, fresh.doc_offsets)
    assert load_embeddings(new).tobytes() == load_embeddings(fresh).tobytes()  # copied, not re-embedded
    assert new.manifest["stages"]["embed"]["copied_from"] == open_db(tmp_path / "db").manifest["db_id"]
    # sources still name the original files and lines
    assert new.source(1) == open_db(tmp_path / "db").source(2) and new.source(8) == open_db(tmp_path / "db").source(10)
    assert new.stage("index") == "complete" and verify_db(new.path).ok


def test_compact_refuses_its_own_input_and_an_existing_out(tiny_db, tmp_path):
    from retrocli.errors import RetroError

    shutil.copytree(tiny_db, tmp_path / "db")
    with pytest.raises(RetroError, match="--out"):
        compact_db(tmp_path / "db", tmp_path / "db")
    (tmp_path / "taken").mkdir()
    with pytest.raises(RetroError, match="already exists"):
        compact_db(tmp_path / "db", tmp_path / "taken")


def test_compact_never_deletes_an_input_named_like_a_staging_directory(tiny_db, tmp_path, retro_proc):
    # issue 35.1: `cp -r DB A.partial; retro compact A.partial --out A` deleted the input
    source = tmp_path / "A.partial"
    shutil.copytree(tiny_db, source)
    before = tree_snapshot(source)
    result = retro_proc("compact", source, "--out", tmp_path / "A")
    assert result.exit_code == 0, result.output
    assert tree_snapshot(source) == before
    assert open_db(tmp_path / "A").num_docs == open_db(source).num_docs
    assert not staging_path(tmp_path / "A").exists() and not (tmp_path / "A" / ".retro-staging").exists()
    # the DB at the staging path itself is its input: refused, kept
    staged_copy = staging_path(tmp_path / "B")
    shutil.copytree(tiny_db, staged_copy)
    result = retro_proc("compact", staged_copy, "--out", tmp_path / "B")
    assert result.exit_code == 2 and "where retro stages" in result.stderr and "Traceback" not in result.stderr
    assert open_db(staged_copy).num_docs == open_db(tiny_db).num_docs and not (tmp_path / "B").exists()


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_compact_overwrite_onto_what_is_not_a_db_is_refused_before_any_work(tiny_db, tmp_path, cli, kind):
    # issue 35.13: the whole compaction ran first, then the refusal left a full OUT.partial behind
    out = tmp_path / "notes"
    if kind == "directory":
        out.mkdir()
        (out / "thesis.tex").write_text("keep")
    else:
        out.write_text("keep")
    before = tree_snapshot(tmp_path)
    result = cli("compact", tiny_db, "--out", out, "--overwrite")
    assert result.exit_code == 2 and "is not a retro DB; refusing to overwrite it" in result.error_lines[0]
    assert tree_snapshot(tmp_path) == before  # no staging directory, no lock, nothing touched
    assert not (tmp_path / "notes.partial").exists() and not staging_path(out).exists()
