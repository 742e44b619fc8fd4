import json
import shutil

import numpy as np
import pytest
from helpers import tree_snapshot

from retrocli.db import open_db
from retrocli.dedupe import dedupe, write_filtered_db
from retrocli.errors import RetroError
from retrocli.leakage import leakage_report
from retrocli.options import LeakageOptions
from retrocli.staging import staging_path


def test_dedupe_removes_duplicates_and_keeps_the_rest(tmp_path, tiny_db, planted, cli):
    before = tree_snapshot(tiny_db)
    out = tmp_path / "clean"
    result = cli("dedupe", tiny_db, "--test", planted, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["removed_documents"] == [1]
    old, new = open_db(tiny_db), open_db(out)
    assert tree_snapshot(tiny_db) == before
    assert new.num_docs == old.num_docs - 1
    assert new.num_chunks == old.num_chunks - len(old.doc_chunks(1))
    # everything else identical: text, sources, embeddings (copied, not recomputed)
    kept = [d for d in range(old.num_docs) if d != 1]
    for new_doc, old_doc in enumerate(kept):
        assert new.document_text(new_doc) == old.document_text(old_doc)
        assert new.source(new_doc) == old.source(old_doc)
    keep_chunks = np.concatenate([np.arange(old.doc_chunks(d).start, old.doc_chunks(d).stop) for d in kept])
    assert (new.root["embeddings"][:] == old.root["embeddings"][:][keep_chunks]).all()
    assert new.stage("index") == "complete" and new.manifest["derived_from"]["db_id"] == old.manifest["db_id"]
    again = leakage_report(out, [planted], options=LeakageOptions(k=2))
    assert again.near_duplicates == []
    result = cli("dedupe", tiny_db, "--test", planted, "--out", out)
    assert result.exit_code == 2 and "already exists" in result.output


def test_dedupe_drop_leaking_chunks_removes_more(tmp_path, tiny_db, planted):
    new_db, report, dropped = dedupe(
        tiny_db, [planted], tmp_path / "clean2", drop_leaking_chunks=True, options=LeakageOptions(k=2),
    )
    assert {1, 3} <= dropped
    with pytest.raises(RetroError, match="is the input DB"):
        dedupe(tiny_db, [planted], tiny_db, overwrite=True)


def test_write_filtered_db_keeps_order_and_refuses_an_empty_result(tmp_path, tiny_db):
    db = open_db(tiny_db)
    out = write_filtered_db(db, tmp_path / "odd", {d for d in range(db.num_docs) if d % 2 == 0})
    assert [out.source(i) for i in range(out.num_docs)] == [db.source(d) for d in range(1, db.num_docs, 2)]
    assert out.manifest["counts"]["chunks"] == out.num_chunks == sum(len(db.doc_chunks(d))
                                                                      for d in range(1, db.num_docs, 2))
    with pytest.raises(RetroError, match="every DB document"):
        write_filtered_db(db, tmp_path / "none", set(range(db.num_docs)))
    assert not (tmp_path / "none").exists() and not staging_path(tmp_path / "none").exists()


def test_dedupe_never_deletes_an_input_named_like_a_staging_directory(tmp_path, tiny_db, planted, cli):
    # issue 35.1: `cp -r DB A.partial; retro dedupe A.partial ... --out A` deleted the input
    source = tmp_path / "A.partial"
    shutil.copytree(tiny_db, source)
    before = tree_snapshot(source)
    result = cli("dedupe", source, "--test", planted, "--out", tmp_path / "A")
    assert result.exit_code == 0, result.output
    assert tree_snapshot(source) == before and open_db(tmp_path / "A").num_docs == open_db(source).num_docs - 1
    assert not staging_path(tmp_path / "A").exists()


def test_dedupe_overwrite_onto_what_is_not_a_db_is_refused_before_any_work(tmp_path, tiny_db, planted, cli):
    # issue 35.13: the leakage report and the copy ran first, then the refusal left a full OUT.partial
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("keep")
    before = tree_snapshot(tmp_path)
    result = cli("dedupe", tiny_db, "--test", planted, "--out", out, "--overwrite")
    assert result.exit_code == 2 and "is not a retro DB; refusing to overwrite it" in result.error_lines[0]
    assert tree_snapshot(tmp_path) == before
    assert not (tmp_path / "notes.partial").exists() and not staging_path(out).exists()
