"""Data-parallel training on the CPU with the gloo backend: 2 ranks take the steps of one process."""

import json

import pytest
import torch
from helpers import TRAIN_OPTS
from safetensors.torch import load_file

from retrocli.distributed import Ranks, launch, rank_device, ranks_from_env
from retrocli.errors import RetroError
from retrocli.train import TrainOptions, train

# batch 4 so that each of 2 ranks gets 2 sequences; copy curriculum on so its global draw is exercised
OPTS = dict(TRAIN_OPTS, batch_size=4, precision="fp32", threads=1, copy_curriculum=0.25)


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.fixture(scope="module")
def single(tiny_db, self_neighbors, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "m"
    summary = train(tiny_db, self_neighbors, out, TrainOptions(steps=6, **OPTS), device="cpu")
    return out, summary


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tiny_db, self_neighbors, single, tmp_path):
    out = tmp_path / "m2"
    summary = launch(train, 2, threads=1, db=tiny_db, neighbors_path=self_neighbors, out=out,
                     options=TrainOptions(steps=6, **OPTS), device="cpu")
    assert summary["ranks"] == 2 and summary["steps"] == 6
    # the same target tokens in all, and the same global loss at every step
    assert summary["tokens_seen"] == single[1]["tokens_seen"]
    assert summary["final_loss"] == pytest.approx(single[1]["final_loss"], rel=1e-5)
    assert_same_weights(out, single[0])
    one = [json.loads(line)["loss"] for line in (single[0] / "train_log.jsonl").read_text().splitlines()]
    two = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert two == pytest.approx(one, abs=2e-4)
    assert json.loads((out / "retrocli_model.json").read_text())["ranks"] == 2
    # the weights are not trivially equal: a run with another seed ends elsewhere
    other = tmp_path / "other"
    train(tiny_db, self_neighbors, other, TrainOptions(steps=6, **dict(OPTS, seed=1)), device="cpu")
    with pytest.raises(AssertionError):
        assert_same_weights(other, single[0])


def test_a_two_rank_checkpoint_resumes_in_one_process_to_the_same_weights(tiny_db, self_neighbors, single, tmp_path):
    out = tmp_path / "m"
    launch(train, 2, threads=1, db=tiny_db, neighbors_path=self_neighbors, out=out,
           options=TrainOptions(steps=6, **OPTS), device="cpu", stop_after=3)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    summary = train(tiny_db, self_neighbors, out, TrainOptions(steps=6, **OPTS), resume=True, device="cpu")
    assert summary["steps"] == 6
    assert_same_weights(out, single[0])


def test_retro_train_nproc_runs_ranks_and_reports_once(tiny_db, self_neighbors, retro_proc, tmp_path):
    out = tmp_path / "m"
    args = ["train", tiny_db, "--neighbors", self_neighbors, "--out", out, "--config", "tiny", "--seq-len", "128",
            "--batch-size", "4", "--steps", "2", "--precision", "fp32", "--device", "cpu", "--threads", "1"]
    result = retro_proc(*args, "--nproc", "2", "--json", timeout=300)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ranks"] == 2 and summary["steps"] == 2 and summary["flops_per_token"] > 0
    # a batch that does not split over the ranks is one line from every command path, and nothing is written
    bad = retro_proc(*args[:-2], "--batch-size", "3", "--out", tmp_path / "bad", "--nproc", "2", timeout=300)
    assert bad.exit_code == 2 and bad.error_lines == [
        "error: --batch-size 3: must be a multiple of the 2 ranks"], bad.output
    assert not (tmp_path / "bad").exists()


def test_torchrun_runs_the_cli_as_ranks_and_only_rank_0_reports(tiny_db, self_neighbors, single, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "m"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "retrocli", "train", str(tiny_db),
           "--neighbors", str(self_neighbors), "--out", str(out), "--config", "tiny", "--seq-len", "128",
           "--batch-size", "4", "--steps", "6", "--warmup", "2", "--lr", "3e-3", "--checkpoint-every", "3",
           "--precision", "fp32", "--device", "cpu", "--copy-curriculum", "0.25", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and json.loads(reports[0])["ranks"] == 2
    assert_same_weights(out, single[0])


def test_ranks_come_from_the_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ranks_from_env() == Ranks(2, 4, 0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(RetroError, match="RANK 4 is not within WORLD_SIZE 4"):
        ranks_from_env()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_RANK")
    assert ranks_from_env() == Ranks() and not ranks_from_env().active


def test_several_ranks_refuse_a_pinned_gpu_and_mps():
    with pytest.raises(RetroError, match="cuda:LOCAL_RANK"):
        rank_device(Ranks(0, 2, 0), torch.device("cuda", 1))
    with pytest.raises(RetroError, match="CUDA GPUs or on the CPU"):
        rank_device(Ranks(0, 2, 0), torch.device("mps"))
    assert rank_device(Ranks(1, 2, 1), torch.device("cpu")) == torch.device("cpu")
