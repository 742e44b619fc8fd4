"""`retro compact`: a DB without its removed documents, equal to building the documents it keeps."""

import json
import shutil

import numpy as np
import pytest

from retrocli.add import add_documents
from retrocli.build_db import build_db
from retrocli.compact import compact_db
from retrocli.db import open_db
from retrocli.embed import load_embeddings
from retrocli.remove import remove_documents
from retrocli.verify import verify_db


def test_compact_after_add_and_remove_equals_a_build_of_what_is_left(tmp_path, small_jsonl, tiny_bert, cli):
    lines = small_jsonl.read_text().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[:8]) + "\n")
    b.write_text("\n".join(lines[8:]) + "\n")
    build_db([a], tmp_path / "db", embedder=tiny_bert, block_size=16)
    add_documents(tmp_path / "db", [b])
    remove_documents(tmp_path / "db", docs=[1, 9])  # one of the base, one added
    before = (tmp_path / "db" / "manifest.json").read_bytes()
    result = cli("compact", tmp_path / "db", "--out", tmp_path / "compact", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["derived_from"]["removed_documents"] == [1, 9]
    assert (tmp_path / "db" / "manifest.json").read_bytes() == before  # the input is only read

    kept = [line for i, line in enumerate(lines) if i not in (1, 9)]
    (tmp_path / "kept.jsonl").write_text("\n".join(kept) + "\n")
    fresh = build_db([tmp_path / "kept.jsonl"], tmp_path / "fresh", embedder=tiny_bert, block_size=16)
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
