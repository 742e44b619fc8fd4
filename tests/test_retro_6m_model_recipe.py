"""`make retro-6m-model` (scripts/retro_6m_model.sh) end to end, small: every command of the recipe runs, in
order, on a tiny corpus, BERT and config, and writes a loadable model with its card; a rerun resumes."""

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

TINY = dict(n_layer=2, n_head=2, d_model=32, d_ff=64, cca_layers=[2], enc_layers=1, enc_d_model=16, enc_n_head=2,
            enc_d_ff=32)


def run_recipe(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "retro_6m_model.sh")], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=900)


def test_bundled_model_recipe_runs_end_to_end_and_resumes(tmp_path, small_jsonl, tiny_bert):
    heldout = tmp_path / "heldout.jsonl"
    lines = (REPO / "examples" / "subset" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    heldout.write_text("".join(json.dumps({**json.loads(x), "text": json.loads(x)["text"][:1500]}) + "\n"
                               for x in lines), encoding="utf-8")
    base, copy = tmp_path / "base.json", tmp_path / "copy.json"
    base.write_text(json.dumps(TINY))
    copy.write_text(json.dumps({**TINY, "copy_head": True, "copy_bigram": True}))
    work, dest = tmp_path / "work", tmp_path / "model"
    bin_dir = Path(sys.executable).parent
    env = {"WORK": str(work), "DEST": str(dest), "TRAIN": str(small_jsonl), "HELDOUT": str(heldout),
           "EMBEDDER": tiny_bert, "BASE_CONFIG": str(base), "COPY_CONFIG": str(copy), "BASE_STEPS": "3",
           "COPY_STEPS": "2", "COPY_EXCLUSION": "later", "SEQ_LEN": "128", "RETRO": str(bin_dir / "retro"),
           "PYTHON": sys.executable}

    first = run_recipe(env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert [line for line in first.stdout.splitlines() if line.startswith("==> ")][-1].startswith("==> 7/7")
    assert {"model.safetensors", "config.json", "tokenizer.json", "retrocli_model.json", "train_log.jsonl",
            "train_log_base.jsonl", "eval.json", "README.md"} <= {p.name for p in dest.iterdir()}
    model, meta = load_model(dest, open_db(work / "db"))
    assert model.config.copy_head and meta["steps"] == 2 and meta["init_from"]["steps"] == 3
    # the base learns with k = 2, the copy-head fine-tune with k = 4: the shipped default
    assert model.config.num_neighbors == 4
    assert json.loads((work / "base" / "config.json").read_text())["num_neighbors"] == 2
    assert any(name.startswith("copy_head.") for name in meta["init_from"]["fresh_parameters"])
    assert meta["window_exclusion"] == "later"  # COPY_EXCLUSION reaches the fine-tune only
    assert json.loads((work / "base" / "retrocli_model.json").read_text())["window_exclusion"] == "all"
    card = (dest / "README.md").read_text(encoding="utf-8")
    assert "`--window-exclusion later`" in card
    evaluation = json.loads((work / "eval.json").read_text())
    assert f"**{evaluation['bpb_retrieval']:.4f}**" in card
    ceiling = json.loads((work / "ceiling.json").read_text())
    assert [c["k"] for c in ceiling["ceilings"]] == [2, 4, 10]
    other = json.loads((work / "eval-k2.json").read_text())
    assert evaluation["num_neighbors"] == 4 and other["num_neighbors"] == 2
    for k, result in ((2, other), (4, evaluation)):  # each k's gain beside its own copy ceiling, in one row
        max_gain = next(c["max_gain"] for c in ceiling["ceilings"] if c["k"] == k)
        assert f"**{100 * result['retrieval_gain']:+.2f} %** | {100 * max_gain:.2f} % |" in card
    # the demo's prompt picker runs on the recipe's DB and model: one ranked candidate under its header
    pick = subprocess.run([sys.executable, str(REPO / "scripts" / "pick_demo_prompt.py"), "--db", str(work / "db"),
                           "--heldout", str(REPO / "examples" / "subset" / "heldout.jsonl"), "--model", str(dest),
                           "--candidates", "1", "--new-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert pick.returncode == 0, pick.stderr[-2000:]
    header, *ranked = pick.stdout.splitlines()
    assert header.startswith("gain  copied  without") and len(ranked) == 1
    assert "base decoder (run 1)" in card and "| oracle vs none |" in card
    assert f"{open_db(work / 'db').num_docs:,} training documents" in card
    assert "{" not in card.split("## Generations")[0].replace("{\"", "")  # every placeholder filled
    assert (work / "leakage.html").exists()

    # a rerun finds every stage complete: no step trained again, same weights
    weights = load_file(dest / "model.safetensors")
    log = (work / "model" / "train_log.jsonl").read_text()
    second = run_recipe(env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (work / "model" / "train_log.jsonl").read_text() == log
    again = load_file(dest / "model.safetensors")  # same tensors (the file's byte layout may differ)
    assert again.keys() == weights.keys() and all(torch.equal(again[n], weights[n]) for n in weights)
