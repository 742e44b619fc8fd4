"""The RETRO model: CCA alignment and causality (docs/retro-notes.md), retrieval off == plain decoder, missing
neighbours masked, KV-cache decoding == full forward, safetensors round trip, and a tiny overfit.

Tiny random models (vocab 97, m=4, n=16, 4 layers of width 32, CCA at layers 2 and 4), in float64 where
outputs are compared, so "unchanged" can be checked to 1e-12 and any leak (which is O(1e-3) or more)
shows.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from retrocli.model import RetroConfig, RetroModel

V = 97
PAD = 1
SAME = 1e-12  # float64: identical computations give (near-)identical numbers
DIFF = 1e-6  # a real dependence moves outputs by far more than this


def tiny_config(**overrides) -> RetroConfig:
    return RetroConfig.tiny(V, pad_token_id=PAD, **overrides)


def make_model(seed: int = 0, **overrides) -> RetroModel:
    torch.manual_seed(seed)
    return RetroModel(tiny_config(**overrides)).double().eval()


def rand_tokens(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, shape, generator=g)  # never the pad id


def logits(model, idx, neighbors=None) -> torch.Tensor:
    with torch.no_grad():
        return model(idx, neighbors)[0]


def max_diff(a, b) -> torch.Tensor:
    """Largest absolute difference per position: [T]."""
    return (a - b).abs().amax(dim=(0, 2))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: one thread. With 2 threads on a busy 2-core machine OpenMP spin-waits make each step
    ~80x slower (measured: 0.03 s vs 2.5 s per tiny training step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["plain", "smeared", "copy", "copy-trigram", "copy-run"],
                ids=["plain-keys", "smeared-keys", "copy-head", "copy-head-trigram", "copy-head-match-run"])
def model(request) -> RetroModel:
    # every property below must hold with smeared CCA keys and with the copy head (bigram, trigram, run) too
    copy = request.param.startswith("copy")
    model = make_model(smeared_keys=request.param == "smeared", copy_head=copy, copy_bigram=copy,
                       copy_trigram=request.param == "copy-trigram",
                       copy_match_run=6 if request.param == "copy-run" else 0)
    with torch.no_grad():
        if request.param == "smeared":  # away from the 0.5 init, one share per head, so a wrong mix would show
            for block in model.blocks:
                if block.cca is not None:
                    block.cca.attn.key_smear.copy_(torch.linspace(-2.0, 2.0, model.config.n_head))
        if copy:  # the sink no longer dominates: copying moves outputs a lot
            model.copy_head.sink.bias.fill_(0.0)
    return model


@pytest.fixture(scope="module")
def batch():
    cfg = tiny_config()
    L = cfg.seq_len // cfg.chunk_size
    idx = rand_tokens(2, cfg.seq_len, seed=1)
    nb = rand_tokens(2, L, cfg.num_neighbors, cfg.neighbor_len, seed=2)
    return idx, nb


# -- config -------------------------------------------------------------------------------------------


def test_config_round_trip_and_validation():
    cfg = RetroConfig.small(8192, meta={"tokenizer": "x"})
    assert cfg.cca_layers == (3, 6) and cfg.d_model == 384 and cfg.n_layer == 6
    again = RetroConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.cca_layers, tuple)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        RetroConfig.tiny(V, seq_len=18)
    with pytest.raises(ValueError, match="cca_layers"):
        RetroConfig.tiny(V, cca_layers=(0, 2))  # 1-based: 0 is not a layer
    with pytest.raises(ValueError, match="unknown"):
        RetroConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


def test_small_config_size():
    n = RetroModel(RetroConfig.small(8192)).num_parameters()
    assert 10e6 <= n <= 15e6, n


# -- causality ----------------------------------------------------------------------------------------


def test_neighbours_of_chunk_u_are_invisible_before_its_last_token(model, batch):
    idx, nb = batch
    m = model.config.chunk_size
    base = logits(model, idx, nb)
    for u in range(nb.shape[1]):
        other = nb.clone()
        other[:, u] = rand_tokens(*other[:, u].shape, seed=100 + u)
        d = max_diff(base, logits(model, idx, other))
        last = (u + 1) * m - 1  # the last token of C_u: the first to attend to E_u
        assert d[:last].max() <= SAME, (u, d)
        assert d[last] > DIFF, (u, d)  # the last token of C_u already sees them
        assert d[last:].max() > DIFF


def test_partial_last_chunk_neighbours_unused(model, batch):
    """T = 14, m = 4: chunks 0..2 are complete; neighbours given for a 4th (partial) chunk are ignored."""
    idx, nb = batch
    base = logits(model, idx[:, :14], nb)
    other = nb.clone()
    other[:, 3] = rand_tokens(*other[:, 3].shape, seed=7)
    assert max_diff(base, logits(model, idx[:, :14], other)).max() <= SAME
    other[:, 2] = rand_tokens(*other[:, 2].shape, seed=8)  # chunk 2 ends at position 11
    d = max_diff(base, logits(model, idx[:, :14], other))
    assert d[:11].max() <= SAME and d[11] > DIFF
    with pytest.raises(ValueError, match="neighbors"):
        model(idx[:, :14], nb[:, :2])  # 3 complete chunks need 3 chunks of neighbours


def test_changing_a_token_never_changes_earlier_outputs(model, batch):
    idx, nb = batch
    base = logits(model, idx, nb)
    for p in range(idx.shape[1]):
        other = idx.clone()
        other[:, p] = (other[:, p] + 1 - 2) % (V - 2) + 2  # a different non-pad token
        d = max_diff(base, logits(model, other, nb))
        assert p == 0 or d[:p].max() <= SAME, (p, d)
        assert d[p] > DIFF, (p, d)


def test_first_m_minus_1_positions_see_no_neighbours(model, batch):
    idx, nb = batch
    m = model.config.chunk_size
    plain = logits(model, idx, None)
    for seed in (3, 4):
        with_nb = logits(model, idx, rand_tokens(*nb.shape, seed=seed))
        d = max_diff(plain, with_nb)
        assert d[: m - 1].max() <= SAME
        assert d[m - 1] > DIFF


def test_causality_holds_in_training_mode_with_gradients():
    """The loss gradient w.r.t. the embeddings of position p comes only from predictions at >= p."""
    model = make_model()
    cfg = model.config
    idx = rand_tokens(1, cfg.seq_len, seed=5)
    nb = rand_tokens(1, 4, 2, cfg.neighbor_len, seed=6)
    emb = model.wte(idx).detach().requires_grad_(True)
    orig = model.wte.forward
    model.wte.forward = lambda ids: emb if ids.shape == idx.shape else orig(ids)
    try:
        logits_all = model(idx, nb)[0]
    finally:
        model.wte.forward = orig
    t = 6
    logits_all[0, t].sum().backward()
    g = emb.grad[0].abs().sum(-1)
    assert g[t + 1 :].max() == 0 and g[: t + 1].min() > 0


# -- retrieval off, missing neighbours --------------------------------------------------------------------


def test_no_retrieval_equals_plain_decoder(model, batch):
    idx, nb = batch
    plain = RetroModel(dataclasses.replace(model.config, cca_layers=())).double().eval()
    assert plain.encoder is None and all(b.cca is None for b in plain.blocks)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert missing == []
    assert unexpected and all(k.startswith(("encoder.", "copy_head.")) or "cca" in k for k in unexpected)
    assert plain.num_parameters() < model.num_parameters()
    expected = logits(plain, idx)
    if model.copy_head is not None:  # it returns log-probabilities
        expected = torch.log_softmax(expected, dim=-1)
    assert torch.equal(logits(model, idx, None), expected)
    assert max_diff(logits(model, idx, nb), expected).max() > DIFF  # so the comparison means something
    _, loss_plain = plain(idx[:, :-1], None, idx[:, 1:])
    _, loss_none = model(idx[:, :-1], None, idx[:, 1:])
    assert torch.equal(loss_plain, loss_none)


@pytest.mark.parametrize("missing_id", [PAD, -1])
def test_all_neighbours_missing_equals_no_retrieval(model, batch, missing_id):
    """Every neighbour missing (pad ids, or -1 straight from a neighbours file): same as neighbors=None."""
    idx, nb = batch
    out = logits(model, idx, torch.full_like(nb, missing_id))
    assert not out.isnan().any()
    assert max_diff(out, logits(model, idx, None)).max() <= SAME


def test_missing_chunk_gets_exactly_zero_cca(batch):
    """Chunk u with all neighbours missing: the CCA sublayers add exactly 0 on its attending chunk, the
    output is finite, and gradients too (no all-masked softmax anywhere)."""
    idx, nb = batch
    model = make_model().train()  # dropout is 0: train mode only exercises the training paths
    m, u = model.config.chunk_size, 1
    nb = nb.clone()
    nb[:, u] = -1
    captured = []
    hooks = [b.cca.register_forward_hook(lambda mod, i, o: captured.append(o)) for b in model.blocks if b.cca]
    try:
        out, loss = model(idx[:, :-1], nb, idx[:, 1:])
    finally:
        for h in hooks:
            h.remove()
    assert len(captured) == 2
    for cca_out in captured:
        assert torch.equal(cca_out[:, (u + 1) * m - 1 : (u + 2) * m - 1], torch.zeros_like(cca_out[:, :m]))
        assert cca_out[:, : m - 1].abs().max() == 0  # no attending chunk there
        assert cca_out[:, m - 1 : 2 * m - 1].abs().max() > DIFF  # chunk 0 has neighbours
    loss.backward()
    assert math.isfinite(loss.item()) and not out.isnan().any()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_neighbour_is_masked_not_zero_filled(model, batch):
    """k=2 with the second neighbour missing == k=1 with only the first; a neighbour padded from 4 to 8
    tokens == the same 4 tokens unpadded. Zero-filling or attending pad embeddings would break both."""
    idx, nb = batch
    one = nb[:, :, :1]
    two = torch.cat([one, torch.full_like(one, PAD)], dim=2)
    assert max_diff(logits(model, idx, two), logits(model, idx, one)).max() <= SAME
    short = nb[:, :, :, :4]
    padded = torch.cat([short, torch.full_like(short, -1)], dim=3)
    assert max_diff(logits(model, idx, padded), logits(model, idx, short)).max() <= SAME
    # and the padding really is what was ignored: changing the kept tokens does change the output
    assert max_diff(logits(model, idx, nb), logits(model, idx, two)).max() > DIFF


# -- incremental decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [[1] * 16, [6, 1, 3, 1, 5], [16], [3, 4, 4, 2]])
def test_kv_cache_matches_full_forward(model, batch, steps):
    """Feed the sequence in pieces, supplying chunk u's neighbours just before the piece that holds its
    last token (as generation does); logits must equal the full forward's."""
    idx, nb = batch
    m = model.config.chunk_size
    T = sum(steps)
    full = logits(model, idx[:, :T], nb)
    cache = model.new_cache(batch_size=2)
    outs, start = [], 0
    for t in steps:
        for u in range(start // m, (start + t) // m):  # chunks completing in this piece
            model.encode_neighbors(cache, u, nb[:, u])
        outs.append(model.forward_step(idx[:, start : start + t], cache))
        start += t
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-4
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-10  # float64: really the same computation


def test_kv_cache_float32_and_late_neighbours(batch):
    idx, nb = batch
    torch.manual_seed(0)
    model = RetroModel(tiny_config()).eval()  # float32 this time
    full = logits(model, idx[:, :13], nb)
    cache = model.new_cache(batch_size=2)
    for u in range(3):
        model.encode_neighbors(cache, u, nb[:, u])  # all pending: encoded as their chunks complete
    on_time = model.forward_step(idx[:, :13], cache)
    assert (on_time - full).abs().max() < 1e-4

    # Neighbours supplied late: positions fed before never see them, later ones do (from cached H_u).
    plain = logits(model, idx[:, :13])
    cache = model.new_cache(batch_size=2)
    early = model.forward_step(idx[:, :8], cache)  # chunks 0 and 1 complete, no neighbours yet
    assert (early - plain[:, :8]).abs().max() < 1e-5
    model.encode_neighbors(cache, 1, nb[:, 1])  # encoded at once
    late = model.forward_step(idx[:, 8:11], cache)  # positions 8..10 attend to E_1
    assert max_diff(late, plain[:, 8:11]).min() > 1e-4
    assert model.forward_step(idx[:, 11:12], cache).shape == (2, 1, V)


def test_generate_cache_equals_recompute_and_retrieves_each_chunk_once():
    # Untied: a random tied model mostly predicts the token it just read (wte . wte is largest).
    model = make_model(tie_embeddings=False)
    m, n = model.config.chunk_size, model.config.seq_len
    calls: list[list[int]] = []

    def retrieve(chunk: list[int]) -> torch.Tensor:
        calls.append(chunk)
        g = torch.Generator().manual_seed(sum(chunk))
        return torch.randint(2, V, (2, 8), generator=g)

    step_logits: list[torch.Tensor] = []  # next-token logits behind every sampled token

    def record(fn, pick):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            step_logits.append(pick(out)[:, -1].clone())
            return out

        return wrapped

    def run(use_cache, retrieve_fn=retrieve, **sampling):
        calls.clear()
        step_logits.clear()
        gen = torch.Generator().manual_seed(1)
        if use_cache:
            model.forward_step = record(RetroModel.forward_step.__get__(model), lambda out: out)
        else:
            model.forward = record(RetroModel.forward.__get__(model), lambda out: out[0])
        try:
            out = model.generate(prompt, new, retrieve_fn, generator=gen, use_cache=use_cache, **sampling)
        finally:
            model.__dict__.pop("forward_step", None)
            model.__dict__.pop("forward", None)
        return out, list(calls), torch.cat(step_logits)

    prompt = rand_tokens(6, seed=9).tolist()
    new = 2 * n + 3  # slides the 16-token window several times
    # A random model's logits are nearly flat (std ~0.1; neighbours move them by ~0.01) and greedy
    # decoding repeats one token, so sample at a low temperature: the draw then depends on the logits'
    # details, and equal sequences mean equal logits at every step.
    sharp = {"temperature": 0.03}
    for sampling in (sharp, {"temperature": 0.0}, {"temperature": 0.05, "top_k": 20, "top_p": 0.9}):
        cached, cached_calls, cached_logits = run(True, **sampling)
        recomputed, recomputed_calls, recomputed_logits = run(False, **sampling)
        assert torch.equal(cached, recomputed), sampling
        assert cached_logits.shape == (new, V)  # one model call per sampled token
        assert (cached_logits - recomputed_logits).abs().max() < 1e-10
        assert cached.shape == (6 + new,) and cached[:6].tolist() == prompt
        expected = [cached[c * m : (c + 1) * m].tolist() for c in range(len(cached) // m)]
        assert cached_calls == expected and recomputed_calls == expected  # once per chunk, in order
    cached, _, _ = run(True, **sharp)
    assert len(set(cached.tolist())) > 10
    no_retrieval, no_calls, no_logits = run(True, None, **sharp)
    assert no_calls == [] and not torch.equal(no_retrieval, cached)  # retrieval changes the text
    _, _, plain_logits = run(False, None, **sharp)
    assert (no_logits - plain_logits).abs().max() < 1e-10


def test_generate_batch_and_short_prompt(model):
    prompts = rand_tokens(3, 2, seed=11)  # shorter than a chunk
    out = model.generate(prompts, 9, lambda chunk: None if chunk[0] % 2 else [[5, 6, 7]], temperature=0)
    assert out.shape == (3, 11) and torch.equal(out[:, :2], prompts)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([], 3)


# -- persistence --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie,smeared,copy", [(True, False, False), (False, False, False), (True, True, False),
                                               (True, False, True)])
def test_save_and_load_round_trip_without_pickle(tmp_path, batch, tie, smeared, copy):
    idx, nb = batch
    torch.manual_seed(0)
    model = RetroModel(tiny_config(tie_embeddings=tie, smeared_keys=smeared, copy_head=copy,
                                   meta={"tokenizer_sha256": "abc"})).eval()
    if smeared:
        with torch.no_grad():
            model.blocks[1].cca.attn.key_smear.fill_(1.5)
    model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]
    for f in files:
        assert not (tmp_path / "m" / f).read_bytes().startswith(b"\x80")  # pickle protocol marker
    loaded = RetroModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config and loaded.config.meta == {"tokenizer_sha256": "abc"}
    assert (loaded.lm_head.weight is loaded.wte.weight) == tie
    assert torch.equal(logits(loaded, idx, nb), logits(model, idx, nb))


def test_no_pickle_in_model_source():
    import inspect

    import retrocli.model.retro as retro

    src = inspect.getsource(retro)
    code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith("#"))
    assert "import pickle" not in code and "torch.save(" not in code and "torch.load(" not in code


def test_from_pretrained_errors(tmp_path):
    from retrocli.errors import RetroError

    with pytest.raises(RetroError, match="missing config.json"):
        RetroModel.from_pretrained(tmp_path)
    make_model().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "d_model": 64, "d_ff": 128}))
    with pytest.raises(RetroError, match="do not match"):
        RetroModel.from_pretrained(tmp_path / "m")


# -- learning -----------------------------------------------------------------------------------------


def test_loss_decreases_on_a_tiny_batch(batch):
    idx, nb = batch
    torch.manual_seed(0)
    model = RetroModel(tiny_config()).train()
    opt = model.configure_optimizer(weight_decay=0.0, learning_rate=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], nb, idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(V)) < 0.5  # starts near uniform
    assert losses[-1] < 0.5 * losses[0], losses  # and really fits the batch
    enc_grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in enc_grads)  # the encoder learns too


def test_smeared_keys_mix_only_within_each_neighbour():
    from retrocli.model.retro import CrossAttention

    attn = CrossAttention(8, 8, 2, 0.0, 10000.0, smeared_keys=True).double()
    with torch.no_grad():
        attn.key_smear.copy_(torch.tensor([0.0, 100.0]))  # head 0: even mix; head 1: all previous key
    k = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    k_pos = torch.tensor([0, 1, 2, 0, 1, 2])  # two neighbours of r = 3
    out = attn._smear(k, k_pos)
    assert torch.allclose(out[:, 0, 1], (k[:, 0, 1] + k[:, 0, 0]) / 2)
    assert torch.allclose(out[:, 1, 2], k[:, 1, 1])
    # a neighbour's first key takes nothing from the previous neighbour's last key
    assert torch.allclose(out[:, 0, 3], k[:, 0, 3] / 2)
    assert torch.allclose(out[:, 1, 3], torch.zeros(4, dtype=torch.float64))
    plain = make_model()
    smeared = make_model(smeared_keys=True)
    extra = smeared.num_parameters() - plain.num_parameters()
    assert extra == len(plain.config.cca_layers) * plain.config.n_head  # one share per head per CCA layer


# -- copy head ------------------------------------------------------------------------------------------


def copy_model(bigram: bool = False, trigram: bool = False, match_run: int = 0) -> RetroModel:
    """Copy head with its sink switched off and no learned state terms: a pure exact-token copy."""
    model = make_model(copy_head=True, copy_bigram=bigram or trigram or bool(match_run), copy_trigram=trigram,
                       copy_match_run=match_run)
    with torch.no_grad():
        model.copy_head.sink.bias.fill_(-1e4)
        model.copy_head.q_state.weight.zero_()
        model.copy_head.k_state.weight.zero_()
    return model


def test_copy_head_copies_the_token_after_a_match():
    """Position t reads E_u (u = (t+1)//m - 1) and copies the token after the neighbour token equal to
    its own: the init is an induction copy. Tokens are all distinct, so the match is unique."""
    model, m = copy_model(), 4
    idx = torch.arange(10, 26)[None]  # 16 distinct tokens
    nb = torch.arange(30, 30 + 4 * 2 * 8).view(1, 4, 2, 8)  # 4 chunks x k=2 x r=8, distinct from idx
    nb[0, 0, 1, 3], nb[0, 0, 1, 4] = 15, 77  # chunk 0's second neighbour says "15 is followed by 77"
    t = 5  # token 15; (5+1)//4 - 1 = 0: attends to chunk 0's neighbours
    lp = logits(model, idx, nb)
    assert lp[0, t].exp().sum().item() == pytest.approx(1.0)
    assert lp[0, t].argmax().item() == 77 and lp[0, t, 77].exp() > 0.5
    # the same token at a position attending to chunk 1 (whose neighbours lack it) copies nothing of 77
    idx2 = idx.clone()
    idx2[0, 9] = 15
    assert logits(model, idx2, nb)[0, 9, 77].exp() < 0.1
    # and without retrieval the head is off
    assert logits(model, idx, None)[0, t, 77].exp() < 0.1
    assert m == model.config.chunk_size


def test_copy_head_never_copies_across_neighbours_or_from_padding(batch):
    """The last token of a neighbour has no next token: it must not copy the next neighbour's first."""
    model = copy_model()
    head = model.copy_head
    S, r = 16, 8
    ids = torch.arange(20, 20 + S)[None]
    mask = torch.ones(1, S, dtype=torch.bool)
    mask[0, 12:] = False  # the second neighbour is padded after 4 tokens
    pos = torch.arange(r).repeat(2)
    emb = model.wte(ids)
    h = torch.randn(1, 3, 32, dtype=torch.float64)
    w = head.weights(h, model.wte(ids[:, [7, 11, 3]]), emb, emb, ids, mask, pos)
    assert w.copy[0, 0, 7] == 0  # token 7 is neighbour 0's last: nothing after it in that neighbour
    assert w.copy[0, 1, 11] == 0  # token 11's next (12) is padding
    assert w.copy[0, 2, 3] > 0.5 and w.next_ids[0, 3] == ids[0, 4]  # an ordinary match copies its next
    assert torch.allclose(w.sink + w.copy.sum(-1), torch.ones(1, 3, dtype=torch.float64))


def test_copy_head_training_loss_equals_the_full_mixture(batch):
    """Training takes log p(target) without building the mixed distribution; it must be the same loss."""
    idx, nb = batch
    model = make_model(copy_head=True)
    with torch.no_grad():
        model.copy_head.sink.bias.fill_(0.0)
    targets = idx[:, 1:].clone()
    targets[0, 3] = targets[1, 9] = -1
    log_probs, loss = model(idx[:, :-1], nb, targets)
    _, cheap = model(idx[:, :-1], nb, targets, need_logits=False)
    expected = torch.nn.functional.cross_entropy(log_probs.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
    assert (loss - expected).abs() < 1e-12 and (cheap - expected).abs() < 1e-12
    assert (log_probs.exp().sum(-1) - 1).abs().max() < 1e-12
    cheap.backward()
    assert model.copy_head.k_token.weight.grad.abs().sum() > 0


def test_copy_head_bigram_picks_the_occurrence_after_the_same_previous_token():
    """Token 50 occurs twice in the neighbour, after 7 (then 60) and after 8 (then 70). Having read 8, 50
    the bigram head copies 70; the one-token head splits its mass between 60 and 70."""
    idx = torch.arange(10, 26)[None]
    idx[0, 4], idx[0, 5] = 8, 50  # position 5 attends to chunk 0's neighbours
    nb = torch.arange(30, 30 + 4 * 2 * 8).view(1, 4, 2, 8) % 90 + 2
    nb[0, 0, 0, 1:4] = torch.tensor([7, 50, 60])
    nb[0, 0, 1, 4:7] = torch.tensor([8, 50, 70])
    bigram = logits(copy_model(bigram=True), idx, nb)[0, 5].exp()
    unigram = logits(copy_model(), idx, nb)[0, 5].exp()
    assert bigram[70] > 0.8 and bigram[60] < 0.1
    assert abs(unigram[70] - unigram[60]) < 0.2 and unigram[60] + unigram[70] > 0.8


def test_copy_head_trigram_picks_the_occurrence_after_the_same_two_tokens():
    """"8 50" occurs twice in the neighbours, after 6 (then 60) and after 9 (then 70). Having read 9, 8, 50
    the trigram head copies 70; the bigram head splits its mass between 60 and 70."""
    idx = torch.arange(10, 26)[None]
    idx[0, 3], idx[0, 4], idx[0, 5] = 9, 8, 50  # position 5 attends to chunk 0's neighbours
    nb = torch.arange(30, 30 + 4 * 2 * 8).view(1, 4, 2, 8) % 90 + 2
    nb[0, 0, 0, 0:4] = torch.tensor([6, 8, 50, 60])
    nb[0, 0, 1, 3:7] = torch.tensor([9, 8, 50, 70])
    trigram = logits(copy_model(trigram=True), idx, nb)[0, 5].exp()
    bigram = logits(copy_model(bigram=True), idx, nb)[0, 5].exp()
    # the 32-d random embeddings of 6 and 9 overlap a little, so the margin is finite
    assert trigram[70] > 0.6 and trigram[70] > 4 * trigram[60]
    assert abs(bigram[70] - bigram[60]) < 0.2 and bigram[60] + bigram[70] > 0.8


def test_copy_head_trigram_never_matches_across_neighbours():
    """A neighbour's first two tokens have no token two back in it: the previous neighbour's tail must not
    serve as one. Here neighbour 1 starts "8 50 70" right after neighbour 0 ended with 9: reading 9 8 50,
    the trigram head must not rank it above neighbour 0's genuine "9 8 50 60"."""
    idx = torch.arange(10, 26)[None]
    idx[0, 3], idx[0, 4], idx[0, 5] = 9, 8, 50
    nb = torch.arange(30, 30 + 4 * 2 * 8).view(1, 4, 2, 8) % 90 + 2
    nb[0, 0, 0, 2:6] = torch.tensor([9, 8, 50, 60])
    nb[0, 0, 0, 7] = 9
    nb[0, 0, 1, 0:3] = torch.tensor([8, 50, 70])
    p = logits(copy_model(trigram=True), idx, nb)[0, 5].exp()
    assert p[60] > 0.8 and p[70] < 0.1


def test_copy_sink_margin_sets_the_share_a_full_match_takes_at_init():
    """Each unit of margin divides a match's weight against the sink by e, and the trained config's margin
    is what a fresh head starts from."""
    ids = torch.arange(20, 36)[None]
    mask = torch.ones(1, 16, dtype=torch.bool)
    pos = torch.arange(8).repeat(2)
    odds = {}
    for margin in (2.0, 1.0, 0.0):
        model = make_model(copy_head=True, copy_bigram=True, copy_sink_margin=margin)
        head, emb = model.copy_head, model.wte(ids)
        h = torch.randn(1, 1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        w = head.weights(h, model.wte(ids[:, [5]]), emb, emb, ids, mask, pos, model.wte(ids[:, [4]]))
        odds[margin] = (w.copy[0, 0, 5] / w.sink[0, 0]).item()  # the exact match "20+4, 20+5"
    assert odds[1.0] / odds[2.0] == pytest.approx(math.e, rel=1e-6)
    assert odds[0.0] / odds[1.0] == pytest.approx(math.e, rel=1e-6)
    with pytest.raises(ValueError, match="copy_sink_margin must be a finite number"):
        tiny_config(copy_head=True, copy_sink_margin=float("nan"))


def test_copy_match_run_prefers_the_spot_that_continues_the_copy():
    """"8 50" occurs in both neighbours; neighbour 1 has the two tokens before it that were just read as well
    (13 9 8 50). The bigram head splits its mass; with copy_match_run the longer shared run wins."""
    idx = torch.arange(10, 26)[None]
    idx[0, 1:6] = torch.tensor([12, 13, 9, 8, 50])  # position 5 attends to chunk 0's neighbours
    nb = torch.arange(30, 30 + 4 * 2 * 8).view(1, 4, 2, 8) % 90 + 2
    nb[0, 0, 0, 0:4] = torch.tensor([6, 8, 50, 60])
    nb[0, 0, 1, 1:7] = torch.tensor([13, 9, 8, 50, 70, 71])
    run = logits(copy_model(match_run=6), idx, nb)[0, 5].exp()
    bigram = logits(copy_model(bigram=True), idx, nb)[0, 5].exp()
    assert abs(bigram[70] - bigram[60]) < 0.2 and bigram[60] + bigram[70] > 0.8
    # a run of 4 against one of 2: two more logits at init, e^2 ~ 7.4 times the weight
    assert run[70] > 0.8 and run[70] > 6 * run[60]


def test_copy_match_run_counts_only_tokens_of_the_same_neighbour():
    """Neighbour 1 starts "8 50 70" right after neighbour 0 ended with 13 9. Read across the boundary that
    would be a run of 4 (13 9 8 50); it is a run of 2, so neighbour 0's genuine run of 3 (9 8 50 60) wins."""
    idx = torch.arange(10, 26)[None]
    idx[0, 2:6] = torch.tensor([13, 9, 8, 50])
    nb = torch.arange(30, 30 + 4 * 2 * 8).view(1, 4, 2, 8) % 90 + 2
    nb[0, 0, 0, 1:5] = torch.tensor([9, 8, 50, 60])
    nb[0, 0, 0, 6:8] = torch.tensor([13, 9])
    nb[0, 0, 1, 0:3] = torch.tensor([8, 50, 70])
    p = logits(copy_model(match_run=6), idx, nb)[0, 5].exp()
    assert p[60] > 0.6 and p[70] < 0.4  # e : 1 at init; read across neighbours it would be 1 : e


def test_copy_match_run_shared_run_lengths():
    """shared_run against a hand count: runs stop at a mismatch, at a neighbour's start, at padding and
    at the cap, and the query's start of sequence (-1) matches nothing."""
    from retrocli.model.copy_head import shared_run
    ids = torch.tensor([[5, 6, 7, 8, 6, 7, 8, 9]])  # two neighbours of 4 tokens: [5 6 7 8], [6 7 8 9]
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, 7] = False  # the second neighbour's last token is padding
    pos = torch.arange(4).repeat(2)
    recent = torch.tensor([[[8, 7, 6, 5], [8, 7, 6, -1], [9, 8, 7, 6]]])  # newest first
    run = shared_run(recent, ids, valid, pos)
    assert run[0, 0].tolist() == [0, 0, 0, 4, 0, 0, 3, 0]  # cap 4 in neighbour 0; 3 in neighbour 1
    assert run[0, 1].tolist() == [0, 0, 0, 3, 0, 0, 3, 0]  # the -1 stops both
    assert run[0, 2].tolist() == [0, 0, 0, 0, 0, 0, 0, 0]  # 9 is padding in neighbour 1


def test_copy_match_run_config_checks():
    with pytest.raises(ValueError, match="copy_match_run needs copy_bigram"):
        tiny_config(copy_head=True, copy_match_run=4)
    for bad in (2, -1, 65, 4.0, True):
        with pytest.raises(ValueError, match="copy_match_run must be 0"):
            tiny_config(copy_head=True, copy_bigram=True, copy_match_run=bad)


def test_copy_trigram_needs_the_bigram():
    with pytest.raises(ValueError, match="copy_trigram needs copy_bigram"):
        tiny_config(copy_head=True, copy_trigram=True)


def _padded_window(batch):
    """The fixture's window with chunk 1 cut short (2 real tokens, then padding), as a training window
    holding the end of one document and the start of the next is."""
    idx, nb = batch
    m = tiny_config().chunk_size
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[:, m + 2 : 2 * m] = False
    targets = torch.full_like(idx, -1)
    ok = mask[:, :-1] & mask[:, 1:]
    targets[:, :-1] = torch.where(ok, idx[:, 1:], torch.full_like(idx[:, 1:], -1))
    return idx.clone(), nb, mask, targets


def test_padding_is_neither_predicted_nor_attended_to(model, batch):
    idx, nb, mask, targets = _padded_window(batch)
    with torch.no_grad():
        base, base_loss = model(idx, nb, targets, token_mask=mask)
        other = idx.clone()
        other[~mask] = rand_tokens(int((~mask).sum()), seed=9)  # other ids in the padding
        changed, changed_loss = model(other, nb, targets, token_mask=mask)
        # and other activations there: noise on the padding's embeddings must not reach a real position
        hook = model.wte.register_forward_hook(
            lambda mod, inp, out: out + 5.0 * torch.randn_like(out) * (~mask)[..., None] if out.shape[:2] == mask.shape
            else out)
        try:
            noisy, noisy_loss = model(idx, nb, targets, token_mask=mask)
        finally:
            hook.remove()
        unmasked, _ = model(other, nb, targets)  # without the mask the padding does leak into later tokens
    real = mask[0]
    assert max_diff(base, changed)[real].max() < SAME and abs(float(base_loss - changed_loss)) < SAME
    assert max_diff(base, noisy)[real].max() < SAME and abs(float(base_loss - noisy_loss)) < SAME
    assert max_diff(base, unmasked)[real][-4:].max() > DIFF


def test_a_mask_of_only_real_tokens_changes_nothing(model, batch):
    idx, nb = batch
    with torch.no_grad():
        all_real = torch.ones_like(idx, dtype=torch.bool)
        assert max_diff(model(idx, nb)[0], model(idx, nb, token_mask=all_real)[0]).max() == 0
