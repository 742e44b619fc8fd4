"""`--device`: auto picks what is there, a device that is not there is one line, and CPU results are the
same whichever way the CPU was chosen."""

import numpy as np
import pytest
import torch

from retrocli.db import open_db
from retrocli.device import peak_flops, resolve_device, resolve_devices
from retrocli.errors import RetroError
from retrocli.options import EmbedOptions


def test_auto_is_the_best_device_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type in (expected, "mps")
    assert resolve_device(None) == resolve_device("auto") and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
@pytest.mark.parametrize("name, message", [("cuda", "no CUDA GPU"), ("cuda:3", "no CUDA GPU"),
                                           ("tpu", "not a device"), ("gpu!", "not a device")])
def test_a_device_that_is_not_here_is_one_line(name, message):
    with pytest.raises(RetroError, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_every_heavy_command_refuses_a_missing_device_before_any_work(tiny_db_copy, small_jsonl, tmp_path, cli):
    from helpers import tree_snapshot

    before = tree_snapshot(tiny_db_copy)
    for args in (["embed", tiny_db_copy], ["build-db", small_jsonl, "--out", tmp_path / "new"],
                 ["neighbors", tiny_db_copy, "--query", "x"],
                 ["leakage-report", tiny_db_copy, "--test", small_jsonl],
                 ["eval", tiny_db_copy, "--test", small_jsonl],
                 ["generate", "--db", tiny_db_copy, "--prompt", "x", "--max-new-tokens", "2"],
                 ["train", tiny_db_copy, "--neighbors", tmp_path / "nb", "--out", tmp_path / "model"]):
        result = cli(*args, "--device", "cuda")
        assert result.exit_code == 2 and "no CUDA GPU" in result.output and "Traceback" not in result.output, args
    assert tree_snapshot(tiny_db_copy) == before and not (tmp_path / "new").exists()
    assert not (tmp_path / "model").exists()


def test_embedding_on_an_explicit_cpu_equals_the_default(tiny_db, tiny_bert, small_jsonl, tmp_path):
    from retrocli.build_db import build_db
    from retrocli.options import ChunkOptions
    from retrocli.tokenizer import BPE_8K_NAME

    if resolve_device("auto").type != "cpu":
        pytest.skip("auto is an accelerator here")
    db = build_db(
        [small_jsonl], tmp_path / "cpu", chunk_options=ChunkOptions(tokenizer=BPE_8K_NAME), device="cpu",
        embed_options=EmbedOptions(embedder=tiny_bert, block_size=32),
    )
    a, b = open_db(db.path).root["embeddings"][:], open_db(tiny_db).root["embeddings"][:]
    assert np.array_equal(a, b)


def test_training_on_an_explicit_cpu_equals_the_default(tiny_db, self_neighbors, tmp_path):
    from helpers import TRAIN_OPTS

    from retrocli.model import RetroModel
    from retrocli.train import train

    if resolve_device("auto").type != "cpu":
        pytest.skip("auto is an accelerator here")
    from retrocli.options import TrainOptions

    options = TrainOptions(**{**TRAIN_OPTS, "steps": 3, "threads": 1})
    a = train(tiny_db, self_neighbors, tmp_path / "a", options=options)
    b = train(tiny_db, self_neighbors, tmp_path / "b", options=options, device="cpu")
    assert a["final_loss"] == b["final_loss"]
    wa = RetroModel.from_pretrained(tmp_path / "a").state_dict()
    wb = RetroModel.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_devices_lists_processes_of_one_type():
    assert resolve_devices("cpu, cpu") == [torch.device("cpu")] * 2
    with pytest.raises(RetroError, match="expected 'all' or a list"):
        resolve_devices(" , ")
    if not torch.cuda.is_available():
        with pytest.raises(RetroError, match="--devices all: no CUDA GPU"):
            resolve_devices("all")
    else:
        assert resolve_devices("all") == [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        with pytest.raises(RetroError, match="a GPU is listed twice"):
            resolve_devices("cuda,cuda:0")
        with pytest.raises(RetroError, match="all devices must be of one type"):
            resolve_devices("cuda:0,cpu")


def test_mfu_has_a_peak_for_known_gpus_only():
    assert peak_flops("cpu", "bf16") is None and peak_flops("cpu", "fp32") is None
