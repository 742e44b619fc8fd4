"""The model directory: load_model's DB checks, resolve_model, training checkpoints."""

import json
import shutil

import pytest
import torch

from retrocli.chunk import chunk_corpus
from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.model import RetroConfig, RetroModel
from retrocli.model.checkpoint import (
    MODEL_META,
    bundled_model_dir,
    load_model,
    load_optimizer,
    resolve_model,
    save_checkpoint,
)
from retrocli.options import ChunkOptions
from retrocli.staging import staging_path
from retrocli.tokenizer import BPE_8K_NAME, train_tokenizer


def test_load_model_refuses_another_tokenizer(trained, tmp_path, small_jsonl):
    train_tokenizer([small_jsonl], 600, tmp_path / "tok.json")
    other = chunk_corpus([small_jsonl], tmp_path / "db", ChunkOptions(tokenizer=str(tmp_path / "tok.json")))
    with pytest.raises(RetroError, match="different tokenizer"):
        load_model(trained[0], other)


def test_load_model_refuses_another_chunk_size(trained, tmp_path, small_jsonl):
    other = chunk_corpus([small_jsonl], tmp_path / "db32", ChunkOptions(chunk_size=32, tokenizer=BPE_8K_NAME))
    with pytest.raises(RetroError, match="chunk size 64 differs"):
        load_model(trained[0], other)


def test_load_model_returns_the_trained_model_in_eval_mode(trained, tiny_db):
    model, meta = load_model(trained[0], open_db(tiny_db))
    assert not model.training and meta["steps"] == 12
    assert meta["chunk_size"] == 64 and meta["tokenizer_sha256"] == open_db(tiny_db).manifest["tokenizer"]["sha256"]


def test_load_model_refuses_a_directory_without_meta(trained, tiny_db, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(trained[0], bare)
    (bare / MODEL_META).unlink()
    with pytest.raises(RetroError, match=f"no {MODEL_META}"):
        load_model(bare, open_db(tiny_db))


def test_resolve_model_finds_the_bundled_models_and_refuses_a_missing_one(tmp_path, tiny_db, subset_db):
    assert resolve_model(None) == resolve_model("bundled") == bundled_model_dir()
    assert (bundled_model_dir() / MODEL_META).is_file() and (bundled_model_dir("retro-6m") / MODEL_META).is_file()
    # no --model: the bundled model that speaks the DB's tokens
    assert resolve_model(None, open_db(tiny_db)) == bundled_model_dir("retro-6m")  # the 8k BPE
    assert resolve_model(None, open_db(subset_db)) == bundled_model_dir()  # smollm2, the default
    assert resolve_model("retro-6m", open_db(subset_db)) == bundled_model_dir("retro-6m")  # a name is a choice
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(RetroError, match="no model there"):
        resolve_model(tmp_path / "missing")


def test_checkpoint_round_trip_keeps_weights_optimizer_and_state(tmp_path):
    torch.manual_seed(0)
    model = RetroModel(RetroConfig.tiny(300))
    optimizer = model.configure_optimizer(0.1, 1e-3)
    idx = torch.randint(0, 300, (2, model.config.seq_len))
    _, loss = model(idx, targets=idx)
    loss.backward()
    optimizer.step()
    (tmp_path / "ckpt.partial").mkdir()  # a user's folder, named like the old staging directory
    (tmp_path / "ckpt.partial" / "keep.txt").write_text("mine")
    save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 1})
    assert (tmp_path / "ckpt.partial" / "keep.txt").read_text() == "mine"
    assert not staging_path(tmp_path / "ckpt").exists() and not (tmp_path / "ckpt" / "keep.txt").exists()
    again = RetroModel.from_pretrained(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    fresh = again.configure_optimizer(0.1, 1e-3)
    load_optimizer(tmp_path / "ckpt", fresh)
    ours, theirs = optimizer.state_dict(), fresh.state_dict()
    assert json.loads(json.dumps(ours["param_groups"])) == json.loads(json.dumps(theirs["param_groups"]))
    for pid, state in ours["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs["state"][pid][key])), (pid, key)
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text()) == {"step": 1}
