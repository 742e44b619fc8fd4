import json

import numpy as np
import pytest
from retrieval_fixtures import small_jsonl, tiny_bert, tiny_db, tree_snapshot  # noqa: F401

from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.leakage import jaccard, leakage_report, ngram_hashes
from retrocli.leakage_html import render_html


def test_ngram_jaccard_exact():
    a = np.arange(100)
    b = np.concatenate([np.arange(50), 1000 + np.arange(50)])
    ha, hb = ngram_hashes(a, 13), ngram_hashes(b, 13)
    assert len(ha) == 88 and jaccard(ha, ha) == 1.0
    assert jaccard(ha, hb) == pytest.approx(38 / (88 + 88 - 38))
    assert len(ngram_hashes(np.arange(5), 13)) == 1  # short docs: one shingle of the whole text


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_db):  # noqa: F811
    """Verbatim DB text, the same with every 4th word replaced, and unrelated text."""
    db = open_db(tiny_db)
    verbatim = db.document_text(1)
    words = db.document_text(3).split(" ")
    edited = " ".join("zebra" if i % 4 == 0 else w for i, w in enumerate(words))
    unrelated = ("Quantum chromodynamics describes quarks and gluons; the strong force confines colour charge. "
                 "<script>alert('x')</script> & <b>bold</b> 🙂") * 2
    path = tmp_path_factory.mktemp("planted") / "test.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (verbatim, edited, unrelated)))
    return path


@pytest.fixture(scope="module")
def report(tiny_db, planted):  # noqa: F811
    return leakage_report(tiny_db, [planted], k=10, examples=3)


def test_planted_leaks(report, tiny_db):  # noqa: F811
    ov = report.overlap
    verbatim = ov.test_doc == 0
    full = verbatim & (ov.length == open_db(tiny_db).chunk_size)
    assert full.any() and np.all(ov.r[full] == 1.0)
    edited = ov.r[ov.test_doc == 1]
    assert 0.125 < edited.max() < 1.0 and edited.mean() < 0.9
    assert np.all(ov.r[ov.test_doc == 2] <= 0.125)
    docs = {d["doc"]: d for d in report.documents}
    assert docs[0]["max_r"] == 1.0 and docs[2]["leaking_chunks"] == 0
    assert report.leaking_chunks == int((ov.r > 0.125).sum())
    assert sum(report.histogram["counts"]) == report.num_test_chunks


def test_near_duplicates_agree_with_exact_jaccard(report, tiny_db):  # noqa: F811
    pairs = report.near_duplicates
    assert [(p["db_doc"], p["test_doc"]) for p in pairs] == [(1, 0)]
    db = open_db(tiny_db)
    from retrocli.leakage import doc_tokens

    exact = jaccard(ngram_hashes(doc_tokens(db, 1), 13), ngram_hashes(db.tokenizer.encode_batch(
        [db.document_text(1)])[0], 13))
    assert pairs[0]["jaccard"] == pytest.approx(exact) and exact >= 0.8
    assert abs(pairs[0]["estimated"] - pairs[0]["jaccard"]) < 0.15


def test_html_escapes_corpus_text(report):
    page = render_html(report.to_json())
    assert "<script" not in page and "<b>bold</b>" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<svg" in page and "<mark>" in page


def test_html_example_with_script_text_is_escaped(tmp_path, tiny_db, cli):  # noqa: F811
    db = open_db(tiny_db)
    doc = db.document_text(2) + "\n<script>alert('owned')</script><img src=x onerror=alert(1)>\n"
    test = tmp_path / "t.jsonl"
    test.write_text(json.dumps({"text": doc}) + "\n")
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    result = cli("leakage-report", tiny_db, "--test", test, "--html", html, "--json", js, "--k", "3",
                 "--examples", "100")
    assert result.exit_code == 0, result.output
    page = html.read_text()
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page
    data = json.loads(js.read_text())
    assert data["num_test_chunks"] == len(db.tokenizer.encode_batch([doc])[0]) // 64 + 1
    assert data["examples"] and data["examples"][0]["r"] == 1.0


def test_fail_above_and_read_only(tmp_path, tiny_db, planted, cli):  # noqa: F811
    before = tree_snapshot(tiny_db)
    result = cli("leakage-report", tiny_db, "--test", planted, "--fail-above", "0.1", "--k", "2")
    assert result.exit_code == 1
    result = cli("leakage-report", tiny_db, "--test", planted, "--fail-above", "0.99", "--k", "2")
    assert result.exit_code == 0
    assert tree_snapshot(tiny_db) == before


@pytest.mark.parametrize("args, message", [
    (["--test", "missing.jsonl"], "no such file"),
    (["--k", "0"], "--k"),
    (["--alpha", "2"], "--alpha"),
    (["--jaccard-threshold", "0"], "--jaccard-threshold"),
])
def test_bad_input(tiny_db, planted, cli, args, message):  # noqa: F811
    extra = [] if "--test" in args else ["--test", planted]
    result = cli("leakage-report", tiny_db, *extra, *args)
    assert result.exit_code == 2 and result.exception is None and message in result.output


def test_dedupe_removes_duplicates_and_keeps_the_rest(tmp_path, tiny_db, planted, cli):  # noqa: F811
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
    again = leakage_report(out, [planted], k=2)
    assert again.near_duplicates == []
    result = cli("dedupe", tiny_db, "--test", planted, "--out", out)
    assert result.exit_code == 2 and "already exists" in result.output


def test_dedupe_drop_leaking_chunks_removes_more(tmp_path, tiny_db, planted):  # noqa: F811
    from retrocli.leakage import dedupe

    new_db, report, dropped = dedupe(tiny_db, [planted], tmp_path / "clean2", drop_leaking_chunks=True, k=2)
    assert {1, 3} <= dropped
    with pytest.raises(RetroError, match="must differ"):
        dedupe(tiny_db, [planted], tiny_db, overwrite=True)


def test_html_bpb_curve_skips_empty_alpha_buckets(report):
    data = report.to_json()
    data["bpb"] = {"curve": [{"alpha": 0.0, "chunks": 0, "bpb": None, "bpb_no_retrieval": None},
                             {"alpha": 0.5, "chunks": 3, "bpb": 1.7, "bpb_no_retrieval": 1.8},
                             {"alpha": 1.0, "chunks": 5, "bpb": 1.6, "bpb_no_retrieval": 1.7}]}
    page = render_html(data)
    assert "bpb(α)" in page and 'aria-label="bpb(alpha)"' in page and "1.700" in page and "1.600" in page
    data["bpb"]["curve"] = data["bpb"]["curve"][:1]
    assert "No chunk in any α bucket" in render_html(data)
