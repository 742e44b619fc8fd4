import json

import numpy as np
import pytest
from helpers import tree_snapshot

from retrocli.db import open_db
from retrocli.leakage import leakage_report
from retrocli.leakage_html import render_html
from retrocli.near_duplicates import jaccard, ngram_hashes
from retrocli.options import LeakageOptions


def test_ngram_jaccard_exact():
    a = np.arange(100)
    b = np.concatenate([np.arange(50), 1000 + np.arange(50)])
    ha, hb = ngram_hashes(a, 13), ngram_hashes(b, 13)
    assert len(ha) == 88 and jaccard(ha, ha) == 1.0
    assert jaccard(ha, hb) == pytest.approx(38 / (88 + 88 - 38))
    assert len(ngram_hashes(np.arange(5), 13)) == 0  # shorter than n: no shingle (skipped, never matched)


@pytest.fixture(scope="module")
def report(tiny_db, planted):
    return leakage_report(tiny_db, [planted], options=LeakageOptions(k=10, examples=3))


def test_planted_leaks(report, tiny_db):
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


def test_near_duplicates_agree_with_exact_jaccard(report, tiny_db):
    pairs = report.near_duplicates
    assert [(p["db_doc"], p["test_doc"]) for p in pairs] == [(1, 0)]
    db = open_db(tiny_db)
    from retrocli.near_duplicates import doc_tokens

    exact = jaccard(ngram_hashes(doc_tokens(db, 1), 13), ngram_hashes(db.tokenizer.encode_batch(
        [db.document_text(1)])[0], 13))
    assert pairs[0]["jaccard"] == pytest.approx(exact) and exact >= 0.8
    assert abs(pairs[0]["estimated"] - pairs[0]["jaccard"]) < 0.15


def test_html_escapes_corpus_text(report):
    page = render_html(report.to_json())
    assert "<script" not in page and "<b>bold</b>" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<svg" in page and "<mark>" in page


def test_html_example_with_script_text_is_escaped(tmp_path, tiny_db, cli):
    db = open_db(tiny_db)
    doc = db.document_text(2) + "\n<script>alert('owned')</script><img src=x onerror=alert(1)>\n"
    test = tmp_path / "t.jsonl"
    test.write_text(json.dumps({"text": doc}) + "\n")
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    result = cli("leakage-report", tiny_db, "--test", test, "--html", html, "--json-out", js, "--k", "3",
                 "--examples", "100")
    assert result.exit_code == 0, result.output
    page = html.read_text()
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page
    data = json.loads(js.read_text())
    assert data["num_test_chunks"] == len(db.tokenizer.encode_batch([doc])[0]) // 64 + 1
    assert data["examples"] and data["examples"][0]["r"] == 1.0


def test_fail_above_and_read_only(tmp_path, tiny_db, planted, cli):
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
def test_bad_input(tiny_db, planted, cli, args, message):
    extra = [] if "--test" in args else ["--test", planted]
    result = cli("leakage-report", tiny_db, *extra, *args)
    assert result.exit_code == 2 and result.exception is None and message in result.output


def test_html_bpb_curve_skips_empty_alpha_buckets(report):
    data = report.to_json()
    data["bpb"] = {"curve": [{"alpha": 0.0, "chunks": 0, "bpb": None, "bpb_no_retrieval": None},
                             {"alpha": 0.5, "chunks": 3, "bpb": 1.7, "bpb_no_retrieval": 1.8},
                             {"alpha": 1.0, "chunks": 5, "bpb": 1.6, "bpb_no_retrieval": 1.7}]}
    page = render_html(data)
    assert "bpb(α)" in page and 'aria-label="bpb(alpha)"' in page and "1.700" in page and "1.600" in page
    data["bpb"]["curve"] = data["bpb"]["curve"][:1]
    assert "No chunk in any α bucket" in render_html(data)


def rewrap(text: str) -> str:
    """The same words with other line breaks and spacing, and NFKC-equivalent characters: what a copy
    pasted through an editor or a PDF looks like."""
    import textwrap

    words = text.replace("fi", "\ufb01").split()  # the "ﬁ" ligature: NFKC turns it back into "fi"
    paragraphs = (" ".join(words[i:i + 40]) for i in range(0, len(words), 40))
    return "\n\n".join(textwrap.fill(p, width=37, break_on_hyphens=False, break_long_words=False) for p in paragraphs)


@pytest.fixture(scope="module")
def minilm_db(small_jsonl, tmp_path_factory):
    """The small corpus embedded with the real MiniLM (~100 chunks): retrieval good enough that a copy's
    chunk finds the DB chunk it starts in, which the tiny random BERT does not promise."""
    from retrocli.build_db import build_db

    path = tmp_path_factory.mktemp("minilm") / "db"
    build_db([small_jsonl], path)
    return path


@pytest.fixture(scope="module")
def rewrapped(minilm_db, tmp_path_factory):
    db = open_db(minilm_db)
    path = tmp_path_factory.mktemp("rewrapped") / "test.jsonl"
    unrelated = "Quantum chromodynamics describes quarks and gluons; the strong force confines colour charge. " * 3
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (rewrap(db.document_text(2)), unrelated)))
    return path


def test_a_rewrapped_copy_is_found_at_r_1_with_normalisation_and_not_without(minilm_db, rewrapped):
    normalized = leakage_report(minilm_db, [rewrapped], options=LeakageOptions(k=10, examples=3))
    raw = leakage_report(minilm_db, [rewrapped], options=LeakageOptions(k=10, examples=3, normalize="none"))
    m = open_db(minilm_db).chunk_size
    for report in (normalized, raw):
        ov = report.overlap
        assert np.all(ov.r[ov.test_doc == 1] <= 0.125)  # unrelated text stays under alpha
    ov = normalized.overlap
    full = (ov.test_doc == 0) & (ov.length == m)
    assert full.sum() >= 3 and np.all(ov.r[full] == 1.0), ov.r[ov.test_doc == 0]
    assert raw.overlap.r[full].mean() < 0.8  # the paper's raw tokens miss most of it
    assert normalized.normalize == "text" and raw.normalize == "none"
    data = normalized.to_json()
    assert data["normalize"] == "text" and "NFKC" in data["normalization"]["overlap"]
    assert [(p["db_doc"], p["test_doc"]) for p in normalized.near_duplicates] == [(2, 0)]
    assert raw.near_duplicates == []  # re-wrapping and the ligature change the raw 13-grams


def test_normalised_r_is_never_below_the_raw_one(report, tiny_db, planted):
    raw = leakage_report(tiny_db, [planted], options=LeakageOptions(k=10, examples=0, normalize="none"))
    assert report.normalize == "text"
    assert np.all(report.overlap.r >= raw.overlap.r)


def test_documents_shorter_than_the_ngram_are_skipped_not_matched(tiny_db, tmp_path):
    from retrocli.near_duplicates import near_duplicates

    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Index", "Index", "See also")))
    chunked = tmp_path / "short-db"
    from retrocli.chunk import ChunkOptions, chunk_corpus

    test = chunk_corpus([short], chunked, ChunkOptions(tokenizer=str(tiny_db / "tokenizer.json")))
    for normalize in ("text", "none"):
        pairs, stats = near_duplicates(test, test, normalize=normalize)
        assert pairs == [] and stats["short_documents_skipped"] == {"db": 3, "test": 3}


def test_examples_and_documents_show_the_longest_copies_first(report):
    shared = [ex["shared_tokens"] for ex in report.examples]
    assert shared == sorted(shared, reverse=True) and shared[0] == 64
    assert all("longest_run_tokens" in d for d in report.documents)
    assert report.documents[0]["longest_run_tokens"] == 64
