"""`make bundled-model` (scripts/bundled_model.sh) end to end, small: every command of the recipe runs, in
order, on a tiny corpus, BERT and random Llama base, and writes a loadable retrofit with its card; a rerun
resumes without training again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import REPO
from safetensors.torch import load_file

from retrocli.db import open_db
from retrocli.model.checkpoint import load_model
from retrocli.model.retrofit import RetrofitModel


def run_recipe(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "bundled_model.sh")], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=900)


def test_bundled_model_recipe_runs_end_to_end_and_resumes(tmp_path, small_jsonl, tiny_bert, db_base):
    heldout = tmp_path / "heldout.jsonl"
    lines = (REPO / "examples" / "subset" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    heldout.write_text("".join(json.dumps({**json.loads(x), "text": json.loads(x)["text"][:1500]}) + "\n"
                               for x in lines), encoding="utf-8")
    work, dest = tmp_path / "work", tmp_path / "model"
    bin_dir = Path(sys.executable).parent
    env = {"WORK": str(work), "DEST": str(dest), "TRAIN": str(small_jsonl), "HELDOUT": str(heldout),
           "EMBEDDER": tiny_bert, "BASE": str(db_base), "TOKENIZER": "retrocli-bpe-8k", "STEPS": "3",
           "SEQ_LEN": "128", "BATCH": "2", "CHECKPOINT_EVERY": "2", "LAYOUT": "--cca-start 2 --cca-every 2",
           "RETRO": str(bin_dir / "retro"), "PYTHON": sys.executable}

    first = run_recipe(env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert [line for line in first.stdout.splitlines() if line.startswith("==> ")][-1].startswith("==> 6/6")
    files = {p.name for p in dest.iterdir()}
    assert {"model.safetensors", "config.json", "base.json", "tokenizer.json", "retrocli_model.json",
            "train_log.jsonl", "eval.json", "ceiling.json", "README.md"} <= files
    assert not (tmp_path / "model.partial").exists()
    model, meta = load_model(dest, open_db(work / "db"))
    assert isinstance(model, RetrofitModel) and meta["steps"] == 3
    assert not any(name.startswith("base.") for name in load_file(dest / "model.safetensors"))  # new weights only
    card = (dest / "README.md").read_text(encoding="utf-8")
    evaluation = json.loads((work / "eval.json").read_text())
    assert evaluation["excluded_near_duplicates"] is not None
    assert f"**{evaluation['bpb_retrieval']:.4f}**" in card and f"{evaluation['bpb_no_retrieval']:.4f}" in card
    assert f"{meta['trainable_parameters']:,} new parameters" in card
    ceiling = json.loads((work / "ceiling.json").read_text())
    assert ceiling["excluded_near_duplicates"] and [c["k"] for c in ceiling["ceilings"]] == [2]
    assert "## Generations" in card and "{" not in card.split("## Generations")[0].replace("{\"", "")

    # a rerun finds every stage complete: no step trained again, the same weights
    weights = load_file(dest / "model.safetensors")
    log = (work / "model" / "train_log.jsonl").read_text()
    second = run_recipe(env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (work / "model" / "train_log.jsonl").read_text() == log
    again = load_file(dest / "model.safetensors")
    assert again.keys() == weights.keys() and all(torch.equal(again[n], weights[n]) for n in weights)
