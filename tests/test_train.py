"""`retro train`: training data, schedule, checkpoints, exact resume, fine-tuning, sampling options."""

import json

import numpy as np
import pytest
import torch
from helpers import TRAIN_OPTS as OPTS

from retrocli.batch_neighbors import batch_neighbors
from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.model import RetroModel
from retrocli.options import NeighborOptions
from retrocli.train import TrainingData, TrainOptions, lr_at, train


def test_training_data_respects_chunks_heldout_and_neighbors(tiny_db, self_neighbors):
    from retrocli.neighbor_arrays import open_neighbors

    db = open_db(tiny_db)
    nb = open_neighbors(self_neighbors)
    data = TrainingData(db, nb.ids, 128, 2, heldout_docs={0})
    idx, targets, neighbors, _ = data.batch(seed=1, step=5, batch_size=3)
    assert idx.shape == (3, 128) and neighbors.shape == (3, 2, 2, 128)
    assert not np.isin(db.chunk_doc[data.starts], [0]).any()
    again = data.batch(seed=1, step=5, batch_size=3)
    assert all(torch.equal(a, b) for a, b in zip((idx, targets, neighbors), again[:3]))  # pure function of step
    # targets are the next token wherever both are real tokens
    real = targets >= 0
    assert torch.equal(targets[:, :-1][real[:, :-1]], idx[:, 1:][real[:, :-1]])
    # the neighbours of each chunk are the window's filtered candidates, N followed by its continuation F
    first = int(data.window_neighbors(data.batch_rows(1, 5, 3))[0, 0, 0])
    assert (neighbors[0, 0, 0, : db.chunk_length[first]].numpy() == db.chunk_tokens(first)).all()


def test_no_training_batch_holds_a_neighbour_from_its_windows_documents_or_a_heldout_one(tiny_db, self_neighbors):
    from retrocli.neighbor_arrays import open_neighbors

    db = open_db(tiny_db)
    nb = open_neighbors(self_neighbors)
    assert nb.ids.shape[1] == 8 and nb.manifest["settings"]["candidates"] == 8  # 4·k stored for training
    heldout = {1, 4}
    data = TrainingData(db, nb.ids, 4 * db.chunk_size, 2, heldout_docs=heldout)
    docs, seen = db.chunk_doc, 0
    for step in range(40):
        rows = data.batch_rows(0, step, 8)
        ids = data.window_neighbors(rows)
        _, _, neighbors, _ = data.batch(0, step, 8)
        for b in range(len(rows)):
            got = ids[b][ids[b] >= 0]
            assert not set(docs[got]) & (set(docs[rows[b]]) | heldout)
            seen += len(got)
            for u in range(rows.shape[1]):  # the tokens the model gets are those of the filtered ids
                for j, nid in enumerate(ids[b, u]):
                    if nid >= 0:
                        n = db.chunk_length[nid]
                        assert (neighbors[b, u, j, :n].numpy() == db.chunk_tokens(nid)).all()
    assert seen > 0 and data.neighbor_fill() > 0.95
    # without the filter the stored candidates do reach into the window's other documents and held-out ones
    raw = nb.ids[data.batch_rows(0, 0, 64)][..., :2]
    window_docs = docs[data.batch_rows(0, 0, 64)]
    leaked = [(set(docs[raw[b][raw[b] >= 0]]) & (set(window_docs[b]) | heldout)) for b in range(64)]
    assert any(leaked)


def test_window_exclusion_later_keeps_the_windows_future_out_and_lets_later_chunks_read_earlier_documents(
        tiny_db, self_neighbors):
    from retrocli.neighbor_arrays import open_neighbors

    db = open_db(tiny_db)
    nb = open_neighbors(self_neighbors)
    heldout = {1}
    strict = TrainingData(db, nb.ids, 4 * db.chunk_size, 2, heldout_docs=heldout)
    later = TrainingData(db, nb.ids, 4 * db.chunk_size, 2, heldout_docs=heldout, window_exclusion="later")
    docs, earlier_reads = db.chunk_doc, 0
    for step in range(40):
        rows = later.batch_rows(0, step, 8)
        assert np.array_equal(rows, strict.batch_rows(0, step, 8))  # the rule changes neighbours, not windows
        ids, strict_ids = later.window_neighbors(rows), strict.window_neighbors(rows)
        for b in range(len(rows)):
            for u in range(rows.shape[1]):
                got = set(docs[ids[b, u][ids[b, u] >= 0]])
                assert not got & (set(docs[rows[b, u:]]) | heldout)  # its own, later and held-out documents
                earlier_reads += bool(got & (set(docs[rows[b, :u]]) - set(docs[rows[b, u:]])))
                if len(set(docs[rows[b]])) == 1:  # a window of one document: both rules agree
                    assert np.array_equal(ids[b, u], strict_ids[b, u])
    assert earlier_reads > 0  # what "all" forbids and "later" allows does happen
    with pytest.raises(RetroError, match="--window-exclusion"):
        TrainingData(db, nb.ids, 128, 2, set(), window_exclusion="none")


def test_window_exclusion_is_recorded_and_a_checkpoint_resumes_only_under_its_own_rule(tiny_db, self_neighbors,
                                                                                       tmp_path):
    out = tmp_path / "m"
    opts = {**OPTS, "checkpoint_every": 2}
    train(tiny_db, self_neighbors, out, TrainOptions(steps=4, window_exclusion="later", **opts), stop_after=2)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["options"]["window_exclusion"] == "later"
    with pytest.raises(RetroError, match="--window-exclusion later; resume it the same way"):
        train(tiny_db, self_neighbors, out, TrainOptions(steps=4, **opts), resume=True)
    train(tiny_db, self_neighbors, out, TrainOptions(steps=4, window_exclusion="later", **opts), resume=True)
    assert json.loads((out / "retrocli_model.json").read_text())["window_exclusion"] == "later"
    with pytest.raises(RetroError, match="--window-exclusion none: must be one of all, later"):
        TrainOptions(window_exclusion="none").check()


def test_lr_schedule():
    opts = TrainOptions(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, opts) == pytest.approx(0.1) and lr_at(9, opts) == pytest.approx(1.0)
    assert lr_at(99, opts) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, opts) >= lr_at(s + 1, opts) for s in range(10, 99))


def test_train_writes_model_checkpoint_and_log(trained):
    out, summary = trained
    assert summary["steps"] == 12 and summary["tokens_per_second"] > 0
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "retrocli_model.json", "tokenizer.json", "train_log.jsonl",
            "optimizer.safetensors", "state.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"]


def test_resume_continues_exactly(tiny_db, self_neighbors, tmp_path):
    # both runs here, one after the other: bit-equality needs the same torch thread settings, which other
    # tests (and the session-wide `trained` fixture's moment of creation) do not promise
    straight, out = tmp_path / "straight", tmp_path / "m"
    train(tiny_db, self_neighbors, straight, TrainOptions(steps=12, **OPTS))
    train(tiny_db, self_neighbors, out, TrainOptions(steps=12, **OPTS), stop_after=6)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 6
    train(tiny_db, self_neighbors, out, TrainOptions(steps=12, **OPTS), resume=True)
    a, b = RetroModel.from_pretrained(out), RetroModel.from_pretrained(straight)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_resuming_a_finished_run_trains_nothing_and_reports_its_last_logged_loss(tiny_db, self_neighbors, tmp_path,
                                                                                 cli):
    out = tmp_path / "m"
    first = train(tiny_db, self_neighbors, out, TrainOptions(steps=4, **{**OPTS, "log_every": 2}))
    weights = RetroModel.from_pretrained(out).state_dict()
    again = train(tiny_db, self_neighbors, out, TrainOptions(steps=4, **{**OPTS, "log_every": 2}), resume=True)
    assert again["steps"] == 4
    # the loaded model compared, not the file: of tied tensors, safetensors may store either name
    resaved = RetroModel.from_pretrained(out).state_dict()
    assert all(torch.equal(resaved[name], weights[name]) for name in weights)
    logged = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])["loss"]
    assert again["final_loss"] == logged == pytest.approx(first["final_loss"], abs=1e-4)
    # through the CLI, --json stays JSON (a NaN would not be)
    result = cli("train", str(tiny_db), "--neighbors", str(self_neighbors), "--out", str(out), "--steps", "4",
                 "--resume", "--json", "--config", "tiny", "--seq-len", "128", "--batch-size", "2", "--warmup", "2",
                 "--checkpoint-every", "3", "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["final_loss"] == logged


def test_init_from_fine_tunes_a_saved_model(tiny_db, self_neighbors, tmp_path, trained, cli):
    from retrocli.model import RetroConfig
    from retrocli.train import load_initial_weights

    source, db = trained[0], open_db(tiny_db)
    base = RetroModel.from_pretrained(source)
    # same config: the copy is the source model exactly
    same = RetroModel(base.config)
    assert load_initial_weights(same, source, db)["fresh_parameters"] == []
    assert all(torch.equal(p, q) for p, q in zip(same.state_dict().values(), base.state_dict().values()))
    # a config that adds smeared CCA keys: everything else copied, the new shares keep their init
    smeared_cfg = RetroConfig.from_dict({**base.config.to_dict(), "smeared_keys": True})
    smeared = RetroModel(smeared_cfg)
    fresh = load_initial_weights(smeared, source, db)["fresh_parameters"]
    assert fresh and all(name.endswith("key_smear") for name in fresh)
    assert torch.equal(smeared.wte.weight, base.wte.weight)
    # through `retro train`: a new run (step 0, its own schedule) that records where it started
    config = tmp_path / "smeared.json"
    config.write_text(json.dumps({k: v for k, v in smeared_cfg.to_dict().items() if k != "meta"}))
    out = tmp_path / "ft"
    opts = TrainOptions(steps=2, **{**OPTS, "config": str(config)})
    summary = train(tiny_db, self_neighbors, out, opts, init_from=source)
    assert summary["steps"] == 2
    meta = json.loads((out / "retrocli_model.json").read_text())
    assert meta["init_from"]["model"] == str(source) and meta["init_from"]["steps"] == 12
    with pytest.raises(RetroError, match="only one"):
        train(tiny_db, self_neighbors, out, opts, resume=True, init_from=source)
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**json.loads(config.read_text()), "d_model": 48, "n_head": 4}))
    result = cli("train", tiny_db, "--neighbors", self_neighbors, "--out", tmp_path / "w", "--config", wider,
                 "--seq-len", "128", "--steps", "1", "--init-from", source)
    assert result.exit_code == 2 and "--init-from" in result.output and "wte.weight" in result.output
    assert not (tmp_path / "w").exists()  # a refused run leaves nothing behind


def test_train_refuses_bad_inputs(tiny_db, tmp_path, cli):
    nb = batch_neighbors(tiny_db, [tiny_db], tmp_path / "nb", NeighborOptions(k=2))  # without --exclude-same-doc
    with pytest.raises(RetroError, match="exclude-same-doc"):
        train(tiny_db, nb, tmp_path / "m", TrainOptions(steps=1, **OPTS))
    result = cli("train", tiny_db, "--neighbors", tmp_path / "nope", "--out", tmp_path / "m2")
    assert result.exit_code == 2 and "not a neighbours directory" in result.output


def test_retrieval_focus_draws_windows_whose_neighbours_hold_the_next_chunk(tiny_db, self_neighbors):
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.train import next_chunk_overlap

    db = open_db(tiny_db)
    n = db.num_chunks
    tokens, lengths = db.tokens_block(0, n)
    # neighbours of u = chunk u+1 itself: the next chunk is fully inside them, except at a document's end
    oracle = np.stack([np.minimum(np.arange(n) + 1, n - 1), np.zeros(n, dtype=np.int64)], axis=1)
    score = next_chunk_overlap(db, oracle)
    last_of_doc = np.append(db.chunk_doc[1:] != db.chunk_doc[:-1], True)
    assert np.all(score[~last_of_doc & (lengths[np.minimum(np.arange(n) + 1, n - 1)] > 0)] == 1.0)
    assert np.all(score[last_of_doc] == 0.0)

    nb = open_neighbors(self_neighbors)
    uniform = TrainingData(db, nb.ids, 128, 2, set())
    focused = TrainingData(db, nb.ids, 128, 2, set(), retrieval_focus=0.5)
    assert 0 < len(focused.focus_starts) < len(focused.starts)
    real = next_chunk_overlap(db, nb.ids[:, :2])
    window = lambda s: real[s : s + 2].mean()  # noqa: E731 - 128 tokens = 2 chunks of 64
    assert min(window(s) for s in focused.focus_starts) >= np.quantile([window(s) for s in focused.starts], 0.85)
    idx, _, _, _ = focused.batch(seed=0, step=3, batch_size=4)
    again, _, _, _ = focused.batch(seed=0, step=3, batch_size=4)
    assert torch.equal(idx, again)
    starts = [int(np.nonzero(np.all(focused.tokens[focused.starts] == row[:64].numpy(), axis=1))[0][0]) for row in idx]
    assert all(focused.starts[i] in set(focused.focus_starts) for i in starts[:2])
    with pytest.raises(RetroError, match="retrieval-focus"):
        TrainingData(db, nb.ids, 128, 2, set(), retrieval_focus=1.5)
    assert uniform.focus_starts is uniform.starts


def test_copy_curriculum_swaps_first_neighbour_for_a_damaged_copy_of_the_continuation(tiny_db, self_neighbors):
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.overlap import longest_shared_run

    db = open_db(tiny_db)
    nb = open_neighbors(self_neighbors)
    plain = TrainingData(db, nb.ids, 128, 2, set())
    always = TrainingData(db, nb.ids, 128, 2, set(), copy_curriculum=1.0)
    half = TrainingData(db, nb.ids, 128, 2, set(), copy_curriculum=0.5)
    rows = plain.batch_rows(seed=0, step=7, batch_size=8)
    assert np.array_equal(rows, always.batch_rows(seed=0, step=7, batch_size=8))  # same windows drawn
    idx, _, real_nb, _ = plain.batch(seed=0, step=7, batch_size=8)
    idx2, _, copied, _ = always.batch(seed=0, step=7, batch_size=8)
    assert torch.equal(idx, idx2)
    assert torch.equal(copied[:, :, 1], real_nb[:, :, 1])  # the other neighbours stay the retrieved ones
    doc = db.chunk_doc
    runs = []
    for b in range(8):
        u = 0  # the first chunk's continuation (chunk 1) is inside the window, so it can be checked
        if doc[rows[b, 0]] != doc[rows[b, 1]] or db.chunk_length[rows[b, 1]] < 64:
            continue
        nxt = idx[b, 64:128].numpy()
        own = longest_shared_run(nxt, [copied[b, u, 0].numpy()])
        runs.append(own)
        assert own > longest_shared_run(nxt, [real_nb[b, u, 0].numpy()])
        # damaged: shifted and noisy, never the exact continuation in place
        assert not np.array_equal(copied[b, u, 0, 64:].numpy(), nxt)
    assert runs and np.mean(runs) >= 8
    _, _, mixed, _ = half.batch(seed=0, step=7, batch_size=8)
    swapped = (mixed[:, :, 0] != real_nb[:, :, 0]).any(dim=-1)
    assert 0 < swapped.float().mean() < 1
    assert torch.equal(mixed, half.batch(seed=0, step=7, batch_size=8)[2])  # still a pure function of step
    with pytest.raises(RetroError, match="copy-curriculum"):
        TrainingData(db, nb.ids, 128, 2, set(), copy_curriculum=-0.1)


def test_rank_slices_of_a_batch_put_together_are_the_whole_batch(tiny_db, self_neighbors):
    from retrocli.neighbor_arrays import open_neighbors

    data = TrainingData(open_db(tiny_db), open_neighbors(self_neighbors).ids, 128, 2, set(), copy_curriculum=0.5)
    whole = data.batch(seed=3, step=4, batch_size=6)
    parts = [data.batch(seed=3, step=4, batch_size=6, part=(rank, 3)) for rank in range(3)]
    for i, tensor in enumerate(whole):
        assert torch.equal(torch.cat([part[i] for part in parts]), tensor)


def test_flop_count_includes_attention_on_the_cpu(tiny_db):
    from retrocli.train import build_config, count_flops_per_token

    db = open_db(tiny_db)

    def per_token(seq_len):
        torch.manual_seed(0)
        model = RetroModel(build_config("tiny", db.tokenizer.vocab_size, db.chunk_size, seq_len, 2, 0))
        idx = torch.randint(0, 100, (1, seq_len))
        neighbors = torch.randint(0, 100, (1, seq_len // db.chunk_size, 2, 2 * db.chunk_size))
        real = torch.ones_like(idx, dtype=torch.bool)
        autocast = torch.autocast("cpu", enabled=False)
        return count_flops_per_token(model, autocast, idx, neighbors, idx, real, seq_len)

    # matmul FLOPs per token do not depend on the sequence length; causal self-attention's grow with it
    short, long = per_token(128), per_token(512)
    assert long > short * 1.05


def test_compile_trains_to_the_eager_weights(tiny_db, self_neighbors, tmp_path):
    opts = dict(OPTS, steps=2, precision="fp32", threads=2)
    eager = train(tiny_db, self_neighbors, tmp_path / "eager", TrainOptions(**opts), device="cpu")
    compiled = train(tiny_db, self_neighbors, tmp_path / "compiled", TrainOptions(**opts, compile=True),
                     device="cpu")
    assert compiled["compiled"] and not eager["compiled"] and compiled["mfu"] is None  # no peak known for a CPU
    a, b = (RetroModel.from_pretrained(tmp_path / name).state_dict() for name in ("eager", "compiled"))
    assert a.keys() == b.keys()  # saved from the module itself, not torch.compile's wrapper
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)


def test_stale_retrieval_trains_chunk_u_on_the_neighbours_of_chunk_u_minus_1(tiny_db, self_neighbors, tmp_path):
    from retrocli.neighbor_arrays import open_neighbors

    db, nb = open_db(tiny_db), open_neighbors(self_neighbors)
    fresh = TrainingData(db, nb.ids, 128, 2, set())
    stale = TrainingData(db, nb.ids, 128, 2, set(), stale_retrieval=True)
    rows = fresh.batch_rows(0, 0, 4)
    assert np.array_equal(stale.batch_rows(0, 0, 4), rows)  # the same windows, other neighbours
    doc = db.chunk_doc
    for window in rows:
        got = stale.window_neighbors(window[None, :])[0]
        for u, chunk in enumerate(window):
            if chunk == 0 or doc[chunk - 1] != doc[chunk]:
                assert (got[u] == -1).all()  # first chunk of its document: nothing retrieved yet
            else:  # the previous chunk's candidates, minus this window's documents, nearest first
                want = [int(c) for c in nb.ids[chunk - 1] if c >= 0 and doc[c] not in set(doc[window])][:2]
                assert got[u][: len(want)].tolist() == want and (got[u][len(want):] == -1).all()
    out = tmp_path / "m"
    train(tiny_db, self_neighbors, out, TrainOptions(steps=4, stale_retrieval=True,
                                                                 **{**OPTS, "checkpoint_every": 2}), stop_after=2)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["options"]["stale_retrieval"] is True
    with pytest.raises(RetroError, match="resume it the same way"):
        train(tiny_db, self_neighbors, out, TrainOptions(steps=4, **OPTS), resume=True)
    train(tiny_db, self_neighbors, out, TrainOptions(steps=4, stale_retrieval=True, **OPTS), resume=True)
    assert json.loads((out / "retrocli_model.json").read_text())["stale_retrieval"] is True
