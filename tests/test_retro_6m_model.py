"""The 6M RETRO decoder shipped as `retro-6m` (retrocli/assets/retro-6m): present, small, speaking the 8k BPE,
chosen by default for a DB cut with it, and generating deterministically with retrieval from a small DB."""

from __future__ import annotations

import json

import numpy as np
import torch
from helpers import tree_snapshot
from safetensors import safe_open

from retrocli.db import open_db
from retrocli.generate import generate
from retrocli.model import RetroConfig, RetroModel
from retrocli.model.checkpoint import RETRO_6M, bundled_model_dir, resolve_model
from retrocli.options import SamplingOptions
from retrocli.sequences import neighbor_rows, pad_id
from retrocli.tokenizer import BPE_8K_NAME, load_tokenizer

MODEL = bundled_model_dir(RETRO_6M)
FILES = ("model.safetensors", "config.json", "tokenizer.json", "retrocli_model.json", "README.md")


def test_bundled_model_is_complete_and_small():
    present = {p.name for p in MODEL.iterdir()}
    assert set(FILES) <= present
    total = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert total <= 40 * 1024 * 1024
    model = RetroModel.from_pretrained(MODEL)
    with safe_open(str(MODEL / "model.safetensors"), framework="pt") as weights:
        stored = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
    state = model.state_dict()
    assert all(torch.equal(stored[name], state[name]) for name in stored)
    meta = json.loads((MODEL / "retrocli_model.json").read_text())
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert f"{meta['parameters']:,}" in (MODEL / "README.md").read_text()  # the card states the real count


def test_config_and_tokenizer_match_the_8k_bpe():
    default = load_tokenizer(BPE_8K_NAME)
    config = RetroConfig.from_dict(json.loads((MODEL / "config.json").read_text()))
    meta = json.loads((MODEL / "retrocli_model.json").read_text())
    assert config.vocab_size == default.vocab_size
    assert config.pad_token_id == default.tokenizer.token_to_id("<|pad|>")
    assert config.chunk_size == meta["chunk_size"] == 64
    assert meta["tokenizer_sha256"] == default.sha256
    assert load_tokenizer(MODEL / "tokenizer.json").sha256 == default.sha256


def test_bundled_model_generates_greedily_with_retrieval(tiny_db, cli):
    db = open_db(tiny_db)
    assert resolve_model(None, db) == MODEL == resolve_model("retro-6m")  # tiny_db speaks the 8k BPE
    prompt = db.document_text(2)[:400]
    before = tree_snapshot(tiny_db)
    # no model_dir: the bundled model for its DB
    first = generate(tiny_db, prompt, sampling=SamplingOptions(max_new_tokens=12, temperature=0))
    second = generate(tiny_db, prompt, sampling=SamplingOptions(max_new_tokens=12, temperature=0))
    assert first.text == second.text and first.text.strip()
    assert len(first.retrievals) >= 1 and first.retrievals[0].neighbors
    result = cli("generate", "--db", tiny_db, "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0",
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == first.text
    assert tree_snapshot(tiny_db) == before


def test_bundled_model_reads_its_neighbours(tiny_db):
    """Retrieved chunks change the predictions after the first chunk, and only there (CCA alignment)."""
    db = open_db(tiny_db)
    model = RetroModel.from_pretrained(MODEL).eval()
    m = model.config.chunk_size
    start = int(db.doc_chunks(3).start)
    idx = torch.from_numpy(np.concatenate([db.chunk_tokens(start + i) for i in range(2)])[: 2 * m].astype(np.int64))
    k = model.config.num_neighbors
    a = neighbor_rows(db, np.array([[10 + j for j in range(k)], [20 + j for j in range(k)]]), pad_id(db))
    b = neighbor_rows(db, np.array([[40 + j for j in range(k)], [50 + j for j in range(k)]]), pad_id(db))
    with torch.no_grad():
        logits_a, _ = model(idx[None], neighbors=torch.from_numpy(a)[None])
        logits_b, _ = model(idx[None], neighbors=torch.from_numpy(b)[None])
    assert torch.equal(logits_a[0, : m - 1], logits_b[0, : m - 1])
    assert not torch.allclose(logits_a[0, m - 1 :], logits_b[0, m - 1 :])


def test_bundled_model_copies_a_continuation_its_neighbour_holds(tiny_db):
    """The shipped model uses retrieved text: when chunk u's neighbour is [C_u, C_{u+1}] (the DB holds this
    very passage), the tokens of C_{u+1} cost far fewer nats than with no neighbours; an unrelated
    neighbour does not help. Tokens before the first chunk completes cannot see neighbours at all."""
    db = open_db(tiny_db)
    model = RetroModel.from_pretrained(MODEL).eval()
    m, k = model.config.chunk_size, model.config.num_neighbors
    doc = db.doc_chunks(3)
    chunks = [db.chunk_tokens(i) for i in range(int(doc.start), int(doc.stop))][:4]
    assert len(chunks) == 4 and all(len(c) == m for c in chunks)
    idx = torch.from_numpy(np.concatenate(chunks).astype(np.int64))[None]
    pad = pad_id(db)
    own = np.full((1, 4, k, 2 * m), pad, dtype=np.int64)
    for u in range(3):
        own[0, u, 0] = np.concatenate([chunks[u], chunks[u + 1]])
    other_doc = db.doc_chunks(5)
    unrelated = neighbor_rows(db, np.arange(int(other_doc.start), int(other_doc.start) + 4)[None, :, None], pad)

    def nats(neighbors) -> float:
        with torch.no_grad():
            logits, _ = model(idx, neighbors=None if neighbors is None else torch.from_numpy(neighbors))
        losses = torch.nn.functional.cross_entropy(logits[0, :-1], idx[0, 1:], reduction="none")
        return float(losses[m - 1 :].mean())  # the tokens of C_1..C_3: they read E_0..E_2

    none, copied, wrong = nats(None), nats(own), nats(unrelated)
    assert copied < 0.65 * none, (copied, none)  # the base decoder alone: 3.708 vs 3.709
    assert wrong > 0.8 * none, (wrong, none)
