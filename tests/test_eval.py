"""`retro eval`: bits per byte with and without retrieval, and bpb(alpha)."""

import json
import math

import numpy as np
import pytest
import torch

from retrocli.db import open_db
from retrocli.options import LeakageOptions


def test_eval_bpb_is_consistent_with_model_loss(trained, tiny_db, small_jsonl, tmp_path):
    from retrocli.eval import chunk_losses, evaluate
    from retrocli.model.checkpoint import load_model
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.sequences import chunk_rows, pad_id

    out, _ = trained
    result = evaluate(tiny_db, [small_jsonl], out, work_dir=tmp_path / "w")
    assert result["bpb_retrieval"] > 0 and result["bpb_no_retrieval"] > 0
    assert result["curve"][-1]["bpb"] == pytest.approx(result["bpb_retrieval"])
    db = open_db(tiny_db)
    test = open_db(tmp_path / "w" / "queries")
    model, _ = load_model(out, db)
    losses = chunk_losses(model, db, test, open_neighbors(tmp_path / "w").ids)
    # one window by hand: the model's own mean cross-entropy over the same targets
    L = model.config.seq_len // db.chunk_size
    chunks = test.doc_chunks(0)
    stop = min(chunks.start + L, chunks.stop)
    tokens, real = chunk_rows(test, chunks.start, stop, pad_id(db))
    idx = torch.from_numpy(tokens.reshape(1, -1))
    targets = np.full(idx.shape, -1)
    flat_real = real.reshape(1, -1)
    targets[:, :-1] = np.where(flat_real[:, :-1] & flat_real[:, 1:], idx[:, 1:].numpy(), -1)
    with torch.no_grad():
        _, loss = model(idx, neighbors=None, targets=torch.from_numpy(targets))
    window_bits = losses.bits_none[chunks.start:stop].sum()
    if stop < chunks.stop:  # the next window's first token is unscored, so nothing spills over
        assert window_bits == pytest.approx(float(loss) * (targets >= 0).sum() / math.log(2), rel=1e-4)
    # bytes: every document's UTF-8 bytes minus its unscored first token of each window
    assert losses.bytes.sum() <= sum(len(test.document_text(d).encode()) for d in range(test.num_docs))


def test_eval_k_feeds_more_neighbours_than_trained_with(trained, tiny_db, small_jsonl, tmp_path, cli):
    from retrocli.eval import evaluate

    out, _ = trained
    work = tmp_path / "w"
    default = evaluate(tiny_db, [small_jsonl], out, work_dir=work)
    same = evaluate(tiny_db, [small_jsonl], out, work_dir=work, k=2)  # the model's own k, spelled out
    one = evaluate(tiny_db, [small_jsonl], out, work_dir=work, k=1)
    four = evaluate(tiny_db, [small_jsonl], out, work_dir=work, k=4)  # reuses the k=10 leakage neighbours
    assert default["num_neighbors"] == 2 and four["num_neighbors"] == 4
    assert same["bpb_retrieval"] == default["bpb_retrieval"]
    assert len({default["bpb_retrieval"], one["bpb_retrieval"], four["bpb_retrieval"]}) == 3
    assert one["bpb_no_retrieval"] == four["bpb_no_retrieval"] == default["bpb_no_retrieval"]
    result = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--k", "4", "--work-dir", work)
    assert result.exit_code == 0 and "bpb with retrieval (k=4): " + f"{four['bpb_retrieval']:.4f}" in result.output
    result = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--k", "0", "--work-dir", work)
    assert result.exit_code == 2 and "--k" in result.output and "Traceback" not in result.output


def test_eval_says_when_the_test_text_is_in_the_db_and_can_exclude_its_duplicates(trained, tiny_db, small_jsonl,
                                                                                  tmp_path, cli):
    """small_jsonl is tiny_db's own corpus: every test chunk retrieves itself at distance 0."""
    out, _ = trained
    result = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--work-dir", tmp_path / "a", "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and data["exact_match_fraction"] > 0.9
    assert "retrieve themselves (distance 0)" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert data["copy_head"] is False and data["excluded_near_duplicates"] is None
    excluded = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--work-dir", tmp_path / "b", "--json",
                   "--exclude-near-duplicates")
    data_ex = json.loads(excluded.stdout)
    assert excluded.exit_code == 0 and "retrieve themselves" not in excluded.stderr
    assert data_ex["exact_match_fraction"] == 0.0 and data_ex["excluded_near_duplicates"]["pairs"] >= 12
    assert data_ex["bpb_no_retrieval"] == data["bpb_no_retrieval"]
    human = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--work-dir", tmp_path / "a")
    assert "the paper's architecture (no copy head)" in human.stdout


def test_leakage_report_can_exclude_near_duplicate_documents_from_retrieval(tiny_db, planted):
    from retrocli.leakage import leakage_report

    plain = leakage_report(tiny_db, [planted], options=LeakageOptions(k=10, examples=0))
    excluded = leakage_report(
        tiny_db, [planted], exclude_near_duplicates=True, options=LeakageOptions(k=10, examples=0),
    )
    assert [(p["db_doc"], p["test_doc"]) for p in plain.near_duplicates] == [(1, 0)]
    db = open_db(tiny_db)
    ov = excluded.overlap
    verbatim = ov.test_doc == 0
    assert not np.isin(db.chunk_doc[ov.neighbor[verbatim & (ov.neighbor >= 0)]], [1]).any()
    assert plain.overlap.r[verbatim].mean() == 1.0 and ov.r[verbatim].mean() < 0.5
    assert excluded.exclude_near_duplicates and excluded.near_duplicate_stats["neighbours_replaced"] > 0


def test_eval_stale_retrieval_scores_the_neighbours_of_the_previous_chunk(trained, tiny_db, small_jsonl, tmp_path,
                                                                          cli):
    from retrocli.eval import chunk_losses, evaluate
    from retrocli.model.checkpoint import load_model
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.sequences import stale_neighbor_ids

    out, _ = trained
    work = tmp_path / "w"
    result = evaluate(tiny_db, [small_jsonl], out, work_dir=work, stale_retrieval=True)
    fresh = evaluate(tiny_db, [small_jsonl], out, work_dir=work)
    assert result["bpb_retrieval"] == fresh["bpb_retrieval"]  # the fresh figures do not change
    db, test = open_db(tiny_db), open_db(work / "queries")
    model, _ = load_model(out, db)
    ids = open_neighbors(work).ids[:, :2]
    by_hand = chunk_losses(model, db, test, stale_neighbor_ids(ids, test.chunk_doc), without_retrieval=False)
    assert result["bpb_stale_retrieval"] == pytest.approx(by_hand.bits_retrieval.sum() / by_hand.bytes.sum())
    assert result["bpb_stale_retrieval"] != result["bpb_retrieval"]
    assert result["stale_retrieval_cost"] == pytest.approx(result["bpb_stale_retrieval"] / result["bpb_retrieval"] - 1)
    shown = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--work-dir", work, "--stale-retrieval")
    assert shown.exit_code == 0 and "bpb with stale retrieval" in shown.output


def test_eval_losses_out_holds_the_bits_behind_the_bpb(trained, tiny_db, small_jsonl, tmp_path, cli):
    out, _ = trained
    losses = tmp_path / "losses.npz"
    result = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--losses-out", losses, "--json",
                 "--work-dir", tmp_path / "w")
    assert result.exit_code == 0, result.output
    bpb = json.loads(result.stdout)
    with np.load(losses, allow_pickle=False) as saved:
        assert saved["token_bits_retrieval"].sum() / saved["bytes"].sum() == pytest.approx(bpb["bpb_retrieval"])
        assert saved["token_bits_none"].sum() / saved["bytes"].sum() == pytest.approx(bpb["bpb_no_retrieval"])
        assert saved["neighbor_ids"].shape[0] == saved["token_bits_none"].shape[0]
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    refused = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--losses-out", tmp_path / "l.pkl")
    assert refused.exit_code != 0 and "--losses-out" in refused.output and "Traceback" not in refused.output
