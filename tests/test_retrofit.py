"""RETRO-fitting a frozen base (retrocli/model/retrofit.py) on tiny random Llama, GPT-2 and GPT-NeoX models
built in the test: nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

from retrocli.errors import RetroError
from retrocli.model.retrofit import (
    BASE_FILE,
    RetrofitModel,
    build_retrofit,
    paper_cca_layers,
    resolve_base,
)

M = 4  # chunk size of the tiny models


def tiny_base(tmp_path, family: str = "llama", layers: int = 4, seed: int = 0):
    """A random causal LM of `family` saved as safetensors in tmp_path/family: a real HF directory."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, tie_word_embeddings=True))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=layers, n_head=4, n_positions=256))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=layers, num_attention_heads=4,
                                                 max_position_embeddings=256))
    out = tmp_path / f"{family}-{layers}-{seed}"
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_retrofit(path, **layout) -> RetrofitModel:
    layout.setdefault("cca_start", 2)
    layout.setdefault("cca_every", 2)
    return build_retrofit(path, chunk_size=M, seq_len=16, k=2, pad=0, vocab_size=96, **layout).eval()


def random_inputs(B=2, T=16, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 96, (B, T), generator=g)
    nb = torch.randint(1, 96, (B, T // M, k, 2 * M), generator=g)
    return idx, nb


def perturb_new_layers(model: RetrofitModel, seed: int = 3) -> None:
    """Give every new weight a random value (the zero-initialised projections included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.new_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_an_untrained_retrofit_computes_exactly_the_base_logits(tmp_path, family):
    path = tiny_base(tmp_path, family)
    model = make_retrofit(path)
    idx, nb = random_inputs()
    with torch.no_grad():
        ours, _ = model(idx, neighbors=nb)
        theirs = model.base(input_ids=idx).logits
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    perturb_new_layers(model)
    with torch.no_grad():
        changed, _ = model(idx, neighbors=nb)
    assert not torch.allclose(changed[:, M - 1 :], theirs[:, M - 1 :], atol=1e-4)  # the branches do act
    assert torch.allclose(changed[:, : M - 1], theirs[:, : M - 1], atol=1e-6)  # but never before chunk 0 ends


def test_the_paper_places_cca_every_third_layer_from_6_or_9():
    assert paper_cca_layers(12) == (6, 9, 12)
    assert paper_cca_layers(30) == (9, 12, 15, 18, 21, 24, 27, 30)
    assert paper_cca_layers(30, start=21) == (21, 24, 27, 30)
    assert paper_cca_layers(4) == (4,)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_chunks_neighbours_never_change_earlier_positions(tmp_path, family):
    model = make_retrofit(tiny_base(tmp_path, family))
    perturb_new_layers(model)
    idx, nb = random_inputs(B=1)
    with torch.no_grad():
        before, _ = model(idx, neighbors=nb)
        for u in range(nb.shape[1]):
            other = nb.clone()
            other[:, u] = torch.randint(1, 96, other[:, u].shape)
            after, _ = model(idx, neighbors=other)
            last_of_chunk = (u + 1) * M - 1
            assert torch.equal(after[:, :last_of_chunk], before[:, :last_of_chunk])
            if last_of_chunk < idx.shape[1]:
                assert not torch.allclose(after[:, last_of_chunk:], before[:, last_of_chunk:])


def test_only_the_new_layers_learn_and_the_base_stays_bit_identical(tmp_path):
    model = make_retrofit(tiny_base(tmp_path))
    frozen = {name: p.detach().clone() for name, p in model.base.named_parameters()}
    optimizer = model.configure_optimizer(0.1, 1e-2)
    model.train()
    idx, nb = random_inputs()
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1
    first = None
    for _ in range(5):
        _, loss = model(idx, neighbors=nb, targets=targets)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.base.parameters())
        optimizer.step()
        first = first if first is not None else float(loss.detach())
    assert all(torch.equal(p, frozen[name]) for name, p in model.base.named_parameters())
    assert model.trainable_parameters() == sum(p.numel() for p in model.new_parameters())
    assert 0 < model.trainable_parameters() < model.num_parameters()
    assert any(p.abs().sum() > 0 for p in model.branches.parameters() if p.dim() == 2)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_cached_decoding_equals_the_full_forward(tmp_path, family):
    model = make_retrofit(tiny_base(tmp_path, family))
    perturb_new_layers(model)
    idx, nb = random_inputs(B=1, T=16)
    with torch.no_grad():
        full, _ = model(idx, neighbors=nb)
        cache = model.new_cache(1)
        model.encode_neighbors(cache, 0, nb[0, 0])  # chunk 0 completes inside the prompt
        steps = [model.forward_step(idx[:, :5], cache)]  # a prompt, then one token at a time
        for t in range(5, 16):
            if (t + 1) % M == 0:  # position t completes chunk u and already attends to its neighbours
                model.encode_neighbors(cache, (t + 1) // M - 1, nb[0, (t + 1) // M - 1])
            steps.append(model.forward_step(idx[:, t : t + 1], cache))
    stepped = torch.cat(steps, dim=1)
    assert torch.allclose(stepped, full, atol=1e-5)


def test_generation_with_retrieval_matches_the_uncached_path(tmp_path):
    model = make_retrofit(tiny_base(tmp_path))
    perturb_new_layers(model)
    calls = []

    def retrieve(chunk):
        calls.append(chunk)
        g = torch.Generator().manual_seed(sum(chunk))
        return torch.randint(1, 96, (2, 2 * M), generator=g)

    prompt = torch.tensor([5, 6, 7, 8, 9, 10])
    cached = model.generate(prompt, 14, retrieve_fn=retrieve, temperature=0)
    n_calls = len(calls)
    uncached = model.generate(prompt, 14, retrieve_fn=retrieve, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert n_calls == 20 // M  # once per completed chunk


def test_save_and_load_keep_only_new_weights_and_name_the_base(tmp_path):
    path = tiny_base(tmp_path)
    model = make_retrofit(path)
    perturb_new_layers(model)
    out = model.save_pretrained(tmp_path / "model")
    info = json.loads((out / BASE_FILE).read_text())
    assert info["sha256"] == resolve_base(path).sha256 and info["kind"] == "hf"
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert not any(name.startswith("base.") for name in saved)
    assert sum(t.numel() for t in saved.values()) == model.trainable_parameters()
    again = RetrofitModel.from_pretrained(out)
    idx, nb = random_inputs()
    with torch.no_grad():
        assert torch.equal(again(idx, neighbors=nb)[0], model(idx, neighbors=nb)[0])


def test_a_retrofit_refuses_another_base(tmp_path):
    model = make_retrofit(tiny_base(tmp_path, seed=0))
    out = model.save_pretrained(tmp_path / "model")
    other = tiny_base(tmp_path, seed=1)
    with pytest.raises(RetroError, match="another model"):
        RetrofitModel.from_pretrained(out, base=other)


def test_bad_bases_are_one_line(tmp_path):
    with pytest.raises(RetroError, match="hub id cannot be downloaded"):
        resolve_base("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(RetroError, match="no such file"):
        resolve_base(tmp_path / "missing")
    (tmp_path / "notgguf.gguf").write_bytes(b"nope")
    with pytest.raises(RetroError, match="not a GGUF file"):
        resolve_base(tmp_path / "notgguf.gguf")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(RetroError, match="pickle"):
        resolve_base(pickled)


# -- `retro retrofit` end to end on tiny_db, with a tiny random Llama that speaks the DB's tokens --------------

RETROFIT_OPTS = ["--seq-len", "128", "--batch-size", "2", "--warmup", "2", "--checkpoint-every", "3", "--lr", "3e-3",
                 "--cca-start", "2", "--cca-every", "2", "--threads", "1"]


def test_retrofit_trains_only_new_weights_and_resumes_exactly(tiny_db, self_neighbors, db_base, tmp_path, cli):
    straight, out = tmp_path / "straight", tmp_path / "m"
    args = ["retrofit", str(tiny_db), "--neighbors", str(self_neighbors), "--base", str(db_base), *RETROFIT_OPTS]
    result = cli(*args, "--out", str(straight), "--steps", "6", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["base"]["sha256"] == resolve_base(db_base).sha256
    assert 0 < summary["trainable_share"] < 1 and summary["trainable_parameters"] < summary["parameters"]
    files = {p.name for p in straight.iterdir()}
    assert {"config.json", "model.safetensors", "base.json", "retrocli_model.json", "tokenizer.json"} <= files
    # an interrupted run resumed ends on the same weights
    assert cli(*args, "--out", str(out), "--steps", "3").exit_code == 0
    assert cli(*args, "--out", str(out), "--steps", "6", "--resume").exit_code == 0
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and log[-1]["tokens_seen"] > 0


def test_retrofit_refuses_a_base_that_does_not_speak_the_dbs_tokens(tiny_db, self_neighbors, tmp_path, cli):
    base = tiny_base(tmp_path, "llama")  # vocabulary 96, no tokenizer.json
    result = cli("retrofit", str(tiny_db), "--neighbors", str(self_neighbors), "--base", str(base),
                 "--out", str(tmp_path / "m"), *RETROFIT_OPTS, "--steps", "1")
    assert result.exit_code != 0 and "vocabulary" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


def test_eval_generate_and_knn_datastore_take_a_retrofit(tiny_db, self_neighbors, db_base, small_jsonl, tmp_path, cli):
    model = tmp_path / "m"
    assert cli("retrofit", str(tiny_db), "--neighbors", str(self_neighbors), "--base", str(db_base), *RETROFIT_OPTS,
               "--out", str(model), "--steps", "2").exit_code == 0
    result = cli("eval", str(tiny_db), "--test", str(small_jsonl), "--model", str(model), "--json", "--threads", "1")
    assert result.exit_code == 0, result.output
    bpb = json.loads(result.stdout)
    assert bpb["bpb_retrieval"] > 0 and bpb["bpb_no_retrieval"] > 0
    assert bpb["base"]["sha256"] == resolve_base(db_base).sha256  # "without retrieval" is the base alone
    result = cli("generate", "--db", str(tiny_db), "--model", str(model), "--prompt", "The history of", "--json",
                 "--max-new-tokens", "70", "--temperature", "0")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["retrievals"], out  # a chunk completed during generation and was retrieved for
    store = tmp_path / "store"
    result = cli("knn-datastore", str(tiny_db), "--model", str(model), "--out", str(store), "--json")
    assert result.exit_code == 0, result.output
    result = cli("eval", str(tiny_db), "--test", str(small_jsonl), "--model", str(model), "--knn-lm", str(store),
                 "--json", "--no-leakage")
    assert result.exit_code == 0, result.output
    assert "knn_lm" in json.loads(result.stdout)
    result = cli("eval", str(tiny_db), "--test", str(small_jsonl), "--model", str(model), "--knn-lm", str(store),
                 "--no-leakage")
    assert result.exit_code == 0, result.output
    for row in ("a retrofit of", "base alone", "kNN-LM on the base", "retrofit+kNN-LM"):
        assert row in result.output, result.output
