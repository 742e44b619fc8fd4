"""The bundled model (retrocli/assets/model): SmolLM2-135M-Instruct RETRO-fitted. Its directory holds only
the new weights and names its base; it speaks the default tokenizer, so a DB built with no flags is read
with no flags; it generates deterministically, retrieving as it goes, and its retrieval is causal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tree_snapshot
from safetensors import safe_open

from retrocli.db import open_db
from retrocli.model.checkpoint import MODEL_META, bundled_model_dir, load_model, resolve_model
from retrocli.model.retrofit import BASE_FILE, RetrofitModel, resolve_base, weight_files
from retrocli.sequences import neighbor_rows, pad_id
from retrocli.tokenizer import load_tokenizer

MODEL = bundled_model_dir()


def test_the_bundled_model_is_an_adapter_on_the_packaged_smollm2():
    files = {p.name for p in MODEL.iterdir()}
    assert {"config.json", BASE_FILE, "tokenizer.json", MODEL_META, "README.md"} <= files
    shards = weight_files(MODEL)  # shards: one file would pass git's 50 MB warning
    assert all(shard.stat().st_size < 50e6 for shard in shards)
    base = json.loads((MODEL / BASE_FILE).read_text())
    assert base["name"] == "smollm2" and base["sha256"] == resolve_base("smollm2").sha256
    names, stored = [], 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as weights:
            names += list(weights.keys())
            stored += sum(int(np.prod(weights.get_slice(name).get_shape())) for name in weights.keys())
    assert names and not any(name.startswith("base.") for name in names)  # the base is not shipped
    meta = json.loads((MODEL / MODEL_META).read_text())
    assert stored == meta["trainable_parameters"] and meta["trainable_share"] < 0.10  # the paper: under 10 %
    assert meta["tokenizer_sha256"] == load_tokenizer().sha256  # the default tokenizer of a new DB
    assert f"{meta['trainable_parameters']:,}" in (MODEL / "README.md").read_text()


@pytest.fixture(scope="module")
def smollm2_db(tmp_path_factory, tiny_bert, small_jsonl):
    """`retro build-db` with no --tokenizer: the bundled model's tokens."""
    from conftest import run_retro

    path = tmp_path_factory.mktemp("smollm2") / "db"
    result = run_retro("build-db", small_jsonl, "--out", path, "--embedder", tiny_bert)
    assert result.exit_code == 0, result.output
    return path


def test_a_db_built_with_no_flags_generates_with_no_flags(smollm2_db, cli):
    db = open_db(smollm2_db)
    assert db.manifest["tokenizer"]["name"] == "smollm2"
    assert resolve_model(None, db) == MODEL
    prompt = db.document_text(2)[:600]
    before = tree_snapshot(smollm2_db)
    args = ("generate", "--db", str(smollm2_db), "--prompt", prompt, "--max-new-tokens", "40", "--temperature", "0",
            "--json")
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0, first.output
    out = json.loads(first.stdout)
    assert out["text"].strip() and out["text"] == json.loads(second.stdout)["text"]
    assert out["retrievals"] and out["retrievals"][0]["neighbors"]  # a chunk completed and was retrieved for
    assert tree_snapshot(smollm2_db) == before


def test_the_bundled_model_reads_its_neighbours_causally(smollm2_db):
    """Other neighbours change the predictions after the first chunk, never before (CCA alignment); with no
    neighbours at all the retrofit is its base."""
    db = open_db(smollm2_db)
    model, _ = load_model(None, db)
    assert isinstance(model, RetrofitModel)
    m, k = model.config.chunk_size, model.config.num_neighbors
    start = int(db.doc_chunks(3).start)
    idx = torch.from_numpy(np.concatenate([db.chunk_tokens(start + i) for i in range(2)])[: 2 * m].astype(np.int64))
    pad = pad_id(db)
    a = neighbor_rows(db, np.array([[10 + j for j in range(k)], [20 + j for j in range(k)]]), pad)
    b = neighbor_rows(db, np.array([[40 + j for j in range(k)], [50 + j for j in range(k)]]), pad)
    with torch.no_grad():
        logits_a, _ = model(idx[None], neighbors=torch.from_numpy(a)[None])
        logits_b, _ = model(idx[None], neighbors=torch.from_numpy(b)[None])
        plain, _ = model(idx[None])
        base = model.base(idx[None]).logits
    assert torch.equal(logits_a[0, : m - 1], logits_b[0, : m - 1])
    assert not torch.allclose(logits_a[0, m - 1 :], logits_b[0, m - 1 :])
    assert torch.equal(plain, base)
