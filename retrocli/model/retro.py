"""RETRO: a decoder-only transformer that reads retrieved text through chunked cross-attention.

One file, in the spirit of nanoGPT's model.py. References: Borgeaud et al. 2021, "Improving language
models by retrieving from trillions of tokens" (§2.4-2.5, Appendix B) and docs/retro-notes.md. The
optional copy head, which is not the paper's, lives in copy_head.py.

Shapes and names used throughout
    B  batch size                    T  tokens in the decoder input (T <= n = seq_len)
    m  chunk size (chunk_size)       L  number of chunks
    k  neighbours per chunk          r  tokens per neighbour ([N, F]: the neighbour chunk and its
    d  decoder width (d_model)          continuation, up to neighbor_len = 2m)

The model in four lines (the paper's Algorithm 1, with `p` running over decoder layers):
    H = ATTN(H)                                      # causal self-attention, every layer
    if p == first CCA layer: E = ENCODER(RET(C), H)  # neighbours, conditioned on the chunk they were
                                                     # retrieved for; runs once per forward
    if p in cca_layers: H = H + CCA(H, E)            # chunked cross-attention, paper alignment
    H = FFW(H)

Chunk alignment (the part that is easy to get wrong). The decoder input is cut into chunks
C_0, C_1, ... of m tokens (0-based here, C_u = positions [u*m, (u+1)*m)). The neighbours retrieved with
C_u are encoded into E_u. The *attending chunk* of u is the last token of C_u followed by the first m-1
tokens of C_{u+1}, i.e. positions [(u+1)*m - 1, (u+2)*m - 1). Those positions, and only those,
cross-attend to E_u. Hence position t attends to E_u with u = (t+1)//m - 1 (none when negative: the
first m-1 positions of a sequence get no cross-attention), and C_u's neighbours are invisible to every
position before the last token of C_u, which is exactly when C_u becomes known. That is what makes
training with the neighbours of every chunk causal (RET(C_1) = empty set for the paper's first chunk).

Which chunks' neighbours a forward pass uses: chunk u is used iff it is complete, (u+1)*m <= T, so
`neighbors` must hold at least T//m chunks (floor); extra chunks (e.g. the neighbours of a partial last
chunk, if the caller computed ceil(T/m)) are ignored.

Neighbour tokens: `neighbors` is a LongTensor [B, L, k, r] of token ids. `pad_token_id` (and any
negative id, e.g. -1 from a neighbours file) is padding and is masked everywhere: in the encoder's
self-attention and as a CCA key. A neighbour that is entirely padding is therefore *missing*, not
attended as zeros; a chunk whose neighbours are all missing contributes exactly 0 through CCA (the
softmax is never asked to normalise over nothing, so no NaNs). `neighbors=None` skips the encoder and
every CCA sublayer: the model is then exactly the plain decoder made of the same weights.

Positions: rotary embeddings (RoPE) everywhere. Why: they are relative (the paper uses relative
positions in the encoder and in CCA), they cost no parameters, and they make the KV cache trivial
(a token's key never changes once computed). In CCA the query at absolute position t attending to E_u
gets rotary position t - u*m (its offset from the start of C_u, in [m-1, 2m-2]) and neighbour token j
gets position j, so the relative offset says "token j of [N, F] lines up with offset j of C_u, and the
continuation F lines up with C_{u+1}": the text the attending chunk is about to predict.

Norms: pre-norm RMSNorm (cheaper than LayerNorm, no biases; nothing here needs mean-centering).
No biases in linear layers, as in nanoGPT with bias=False. Weights are saved as safetensors, the
config as JSON: there is no pickle anywhere (no torch.save / torch.load).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import psutil
import torch
import torch.nn as nn
from torch.nn import functional as F

from retrocli.errors import RetroError
from retrocli.model.copy_head import MAX_MATCH_RUN, CopyHead, CopyWeights
from retrocli.model.layers import RMSNorm, wide

CONFIG_NAME = "config.json"
MAX_PARAMETERS = 20_000_000_000  # a config.json asking for more is refused before anything is allocated
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclass
class RetroConfig:
    vocab_size: int = 8192
    chunk_size: int = 64  # m: tokens per chunk (the paper's m = 64)
    seq_len: int = 512  # n: training sequence length, a multiple of m (the paper: 2048)
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    d_ff: int = 1024  # decoder MLP hidden width
    dropout: float = 0.0
    # 1-BASED decoder layer numbers that get a CCA sublayer, in the paper's own language ("every 3rd
    # layer from layer 6": 6, 9, 12 of 12). For 6 layers the same spacing gives (3, 6).
    cca_layers: tuple[int, ...] = (3, 6)
    enc_layers: int = 2  # retrieval encoder depth (paper: 2)
    enc_d_model: int = 192  # encoder width d' (paper: 896 next to much wider decoders)
    enc_n_head: int = 3
    enc_d_ff: int = 768
    # CCA keys mix in the previous neighbour token's key (a learned share per head): a key then says
    # "the token after X", so one CCA head can copy a neighbour's continuation by matching the current
    # token, instead of first learning a previous-token head in the encoder. Small models learn to copy
    # from retrieved text far sooner with it (see docs/benchmarks.md). False: the paper's plain keys.
    smeared_keys: bool = False
    # A pointer over the retrieved continuations (see CopyHead): the next-token distribution becomes a
    # learned mix of the LM's softmax and "the token after a matching neighbour token". Off = the paper.
    copy_head: bool = False
    # The copy head also matches the token before: "the token after the neighbour's X Y, where I just read
    # X Y". One-token matches jump between the many occurrences of common tokens mid-copy.
    copy_bigram: bool = False
    # ... and the token before that: "after the neighbour's W X Y, where I just read W X Y". Needs copy_bigram.
    copy_trigram: bool = False
    # Where the copy head's "do not copy" sink starts: this many logits above a full match (2: a full match
    # takes ~12 % of the mass at init; 1: ~27 %). The sink's bias barely moves in training; its weights
    # make up most of the difference (docs/benchmarks.md).
    copy_sink_margin: float = 2.0
    # The copy head also scores how long a run (up to this many tokens, exact ids) each neighbour spot
    # shares with the text just read: of the spots sharing the last two tokens, the one continuing the
    # copy so far wins, and a long shared run outweighs the sink. 0 = off; needs copy_bigram.
    copy_match_run: int = 0
    num_neighbors: int = 2  # k in training; any k works at inference (the paper evaluates 1-10)
    neighbor_len: int = 128  # r: [N, F] = 2m tokens
    # retrocli-bpe-8k's "<|pad|>"; train and retrofit set it from the DB's tokenizer (sequences.tokenizer_pad_id)
    pad_token_id: int = 1
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # Free-form JSON metadata saved with the config (tokenizer name/sha256, DB it was trained on, ...).
    # The model ignores it; the CLI uses it to refuse a DB with another tokenizer or chunk size.
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        sizes = ("vocab_size", "chunk_size", "seq_len", "n_layer", "n_head", "d_model", "d_ff", "enc_layers",
                 "enc_d_model", "enc_n_head", "enc_d_ff", "num_neighbors", "neighbor_len")
        for name in sizes:  # before any arithmetic on them: n_head 0 must not become a ZeroDivisionError
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"invalid RetroConfig: {name} must be a positive integer, not {value!r}")
        if not isinstance(self.cca_layers, (list, tuple)) or not all(isinstance(i, int) for i in self.cca_layers):
            raise ValueError(f"invalid RetroConfig: cca_layers must be layer numbers, not {self.cca_layers!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"invalid RetroConfig: dropout must be in [0, 1), not {self.dropout!r}")
        self.cca_layers = tuple(int(i) for i in self.cca_layers)
        if self.estimated_parameters() > MAX_PARAMETERS:
            raise ValueError(f"invalid RetroConfig: about {self.estimated_parameters() / 1e9:.1f}B parameters, "
                             f"over the {MAX_PARAMETERS / 1e9:.0f}B this tool allocates")
        problems = []
        if self.seq_len % self.chunk_size:
            problems.append(f"seq_len {self.seq_len} is not a multiple of chunk_size {self.chunk_size}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            problems.append(f"d_model {self.d_model} / n_head {self.n_head} must be an even head size")
        if self.enc_d_model % self.enc_n_head or (self.enc_d_model // self.enc_n_head) % 2:
            problems.append(
                f"enc_d_model {self.enc_d_model} / enc_n_head {self.enc_n_head} must be an even head size"
            )
        if list(self.cca_layers) != sorted(set(self.cca_layers)) or any(
            not 1 <= i <= self.n_layer for i in self.cca_layers
        ):
            problems.append(
                f"cca_layers {self.cca_layers} must be increasing 1-based layer numbers in 1..{self.n_layer}"
            )
        if not (isinstance(self.copy_sink_margin, (int, float)) and not isinstance(self.copy_sink_margin, bool)
                and math.isfinite(self.copy_sink_margin)):
            problems.append(f"copy_sink_margin must be a finite number, not {self.copy_sink_margin!r}")
        if self.copy_trigram and not self.copy_bigram:
            problems.append("copy_trigram needs copy_bigram")
        if isinstance(self.copy_match_run, bool) or not isinstance(self.copy_match_run, int) or not (
                self.copy_match_run == 0 or 3 <= self.copy_match_run <= MAX_MATCH_RUN):
            problems.append(f"copy_match_run must be 0 (off) or a whole number from 3 to {MAX_MATCH_RUN}, "
                            f"not {self.copy_match_run!r}")
        elif self.copy_match_run and not self.copy_bigram:
            problems.append("copy_match_run needs copy_bigram")
        if not 0 <= self.pad_token_id < self.vocab_size:
            problems.append(f"pad_token_id {self.pad_token_id} is outside the vocabulary")
        if problems:
            raise ValueError("invalid RetroConfig: " + "; ".join(problems))

    def estimated_parameters(self) -> int:
        """An upper estimate of the parameter count, from the sizes alone (nothing is allocated)."""
        d, e = self.d_model, self.enc_d_model
        decoder = self.n_layer * (4 * d * d + 3 * d * self.d_ff) + len(self.cca_layers) * 4 * d * d
        encoder = self.enc_layers * (8 * e * e + 3 * e * self.enc_d_ff) + 2 * d * e
        return decoder + encoder + 2 * self.vocab_size * d

    @classmethod
    def small(cls, vocab_size: int, **overrides) -> RetroConfig:
        """The default CPU-trainable config: 6 x 384, CCA at layers 3 and 6; 14.1M params at 8k vocab."""
        return cls(vocab_size=vocab_size, **overrides)

    @classmethod
    def tiny(cls, vocab_size: int, **overrides) -> RetroConfig:
        """For tests: m=4, n=16, 4 layers of width 32, CCA at layers 2 and 4, a 24-wide encoder."""
        base = dict(
            chunk_size=4, seq_len=16, n_layer=4, n_head=4, d_model=32, d_ff=64, cca_layers=(2, 4),
            enc_layers=2, enc_d_model=24, enc_n_head=2, enc_d_ff=48, num_neighbors=2, neighbor_len=8,
        )  # fmt: skip
        base.update(overrides)
        return cls(vocab_size=vocab_size, **base)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["cca_layers"] = list(self.cca_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RetroConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RetroConfig field(s): {', '.join(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------


def apply_rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate x [..., P, hd] by rotary angles of positions pos [P] (GPT-NeoX half-split layout).

    Computed in float32 (float64 for a float64 model, so tests can compare exactly) and cast back:
    bf16 angles would be off by whole radians at position 500.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    angles = pos.to(dtype)[:, None] * inv_freq[None, :]  # [P, hd/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype).split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[N, P, d] -> [N, heads, P, d/heads]"""
    N, P, d = x.shape
    return x.view(N, P, n_head, d // n_head).transpose(1, 2)


def _merge(y: torch.Tensor) -> torch.Tensor:
    """[N, heads, P, hd] -> [N, P, heads*hd]"""
    N, H, P, hd = y.shape
    return y.transpose(1, 2).reshape(N, P, H * hd)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions: causal (decoder) or masked-bidirectional (encoder)."""

    def __init__(self, d: int, n_head: int, dropout: float, rope_base: float):
        super().__init__()
        self.n_head, self.d, self.dropout, self.rope_base = n_head, d, dropout, rope_base
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def _qkv(self, x, pos):
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        q, k, v = (_heads(t, self.n_head) for t in (q, k, v))
        return apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base), v

    def forward(self, x, pos, key_mask=None, causal_key_mask=None):
        """x [N, P, d], pos [P]. key_mask None: causal. key_mask [N, P] bool (True = attend): bidirectional
        over the unmasked keys; every row must have at least one True (the caller guarantees it).
        causal_key_mask [N, P] (decoder with padding inside the sequence): causal, and padding is never a
        key (each position still sees itself, so a padding query's row is never empty)."""
        q, k, v = self._qkv(x, pos)
        p = self.dropout if self.training else 0.0
        if causal_key_mask is not None:
            P = x.shape[1]
            causal = torch.ones(P, P, dtype=torch.bool, device=x.device).tril()
            own = torch.eye(P, dtype=torch.bool, device=x.device)
            mask = causal & (causal_key_mask[:, None, None, :] | own)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif key_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=p)
        return self.resid_drop(self.c_proj(_merge(y)))

    def forward_cached(self, x, pos, cache_k, cache_v, start):
        """Causal attention for new tokens x [B, t, d] at positions start..start+t-1, appending their keys
        and values to the preallocated cache_k/cache_v [B, heads, max_len, hd] and attending to all of it."""
        q, k, v = self._qkv(x, pos)
        end = start + x.shape[1]
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        keys, values = cache_k[:, :, :end], cache_v[:, :, :end]
        # One new token sees the whole cache. Several: row i sees keys 0..start+i (is_causal would align
        # the triangle to the top-left of the [t, end] matrix, which is wrong here).
        mask = None
        if x.shape[1] > 1:
            mask = torch.arange(end, device=x.device)[None, :] <= pos[:, None]
        q = q.to(keys.dtype)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.c_proj(_merge(y).to(x.dtype))


class CrossAttention(nn.Module):
    """Queries from x [N, P, d_q] attend to ctx [N, S, d_kv]; rotary positions on both sides.

    key_mask [N, S] (True = attend) may mask every key of a row: that row's output is then exactly 0
    (we let it attend to everything to keep the softmax finite, then zero it after the projection).
    """

    def __init__(self, d_q: int, d_kv: int, n_head: int, dropout: float, rope_base: float,
                 smeared_keys: bool = False):
        super().__init__()
        self.n_head, self.d, self.dropout, self.rope_base = n_head, d_q, dropout, rope_base
        self.q_proj = nn.Linear(d_q, d_q, bias=False)
        self.kv_proj = nn.Linear(d_kv, 2 * d_q, bias=False)
        self.c_proj = nn.Linear(d_q, d_q, bias=False)
        self.resid_drop = nn.Dropout(dropout)
        # logit of each head's share of the previous key; 0 = an even mix
        self.key_smear = nn.Parameter(torch.zeros(n_head)) if smeared_keys else None

    def _smear(self, k: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """k [N, heads, S, hd]: mix each key with the previous one of the same neighbour (k_pos restarts
        at 0 for each neighbour, whose first key has no previous one)."""
        prev = F.pad(k[:, :, :-1], (0, 0, 1, 0))
        prev = prev * (k_pos > 0).to(k.dtype)[:, None]
        share = torch.sigmoid(self.key_smear).to(k.dtype)[None, :, None, None]
        return k + share * (prev - k)

    def forward(self, x, ctx, q_pos, k_pos, key_mask=None):
        q = apply_rope(_heads(self.q_proj(x), self.n_head), q_pos, self.rope_base)
        k, v = self.kv_proj(ctx).split(self.d, dim=2)
        k = _heads(k, self.n_head)
        if self.key_smear is not None:
            k = self._smear(k, k_pos)
        k, v = apply_rope(k, k_pos, self.rope_base), _heads(v, self.n_head)
        mask, has_key = None, None
        if key_mask is not None:
            has_key = key_mask.any(dim=-1)  # [N]
            mask = (key_mask | ~has_key[:, None])[:, None, None, :]
        p = self.dropout if self.training else 0.0
        y = self.c_proj(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)))
        if has_key is not None:
            y = y * has_key[:, None, None].to(y.dtype)  # finite * 0 == 0 exactly
        return self.resid_drop(y)


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(d, d_ff, bias=False)
        self.c_proj = nn.Linear(d_ff, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


@dataclass
class Encoded:
    """Encoded neighbours of L chunks, projected to the decoder width, ready to be CCA keys/values.

    e [B, L, k*r, d]; mask [B, L, k*r] (True = a real token); pos [k*r] rotary position of each key
    (its index inside its own neighbour: 0..r-1, repeated for each of the k neighbours).
    """

    e: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    ids: torch.Tensor | None = None  # [B, L, k*r] neighbour token ids (pad where masked), for CopyHead


def attending_runs(pos: torch.Tensor, m: int) -> Iterator[tuple[int, int, int]]:
    """Contiguous positions pos split into runs [i, j) that attend to the same chunk u >= 0 (position t
    attends to E_u with u = (t+1)//m - 1); positions before the first chunk completes are skipped."""
    us = ((pos + 1) // m - 1).tolist()
    i = 0
    while i < len(us):
        j = i
        while j < len(us) and us[j] == us[i]:
            j += 1
        if us[i] >= 0:
            yield i, j, us[i]
        i = j


class ChunkedCrossAttention(nn.Module):
    """CCA: attending chunk u (the last token of C_u and the first m-1 tokens of C_{u+1}) attends to E_u."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.m = cfg.chunk_size
        self.attn = CrossAttention(cfg.d_model, cfg.d_model, cfg.n_head, cfg.dropout, cfg.rope_base,
                                   cfg.smeared_keys)

    def forward(self, x: torch.Tensor, enc: Encoded) -> torch.Tensor:
        """x [B, T, d] (normalised decoder states), enc with L = T//m chunks -> CCA output [B, T, d]."""
        B, T, d = x.shape
        m, L = self.m, enc.e.shape[1]
        # The shift. Dropping the first m-1 positions (they attend to nothing) moves position
        # (u+1)*m - 1, the first of attending chunk u, to index u*m: attending chunk u is now simply the
        # u-th block of m. The last attending chunk runs past the end of the sequence (it would hold
        # tokens of C_L); we pad it to a full block with zeros and drop those rows afterwards.
        # T - (m-1) <= L*m because L = T//m, so the pad is never negative.
        h = x[:, m - 1 :]
        h = F.pad(h, (0, 0, 0, L * m - h.shape[1]))
        q_pos = torch.arange(m - 1, 2 * m - 1, device=x.device)  # offset from the start of C_u
        y = self.attn(
            h.reshape(B * L, m, d),
            enc.e.reshape(B * L, -1, d),
            q_pos,
            enc.pos,
            enc.mask.reshape(B * L, -1),
        )
        # Shift back: un-pad, then put the m-1 zero rows of the first positions in front again.
        y = y.reshape(B, L * m, d)[:, : T - (m - 1)]
        return F.pad(y, (0, 0, m - 1, 0))

    def forward_positions(self, x: torch.Tensor, pos: torch.Tensor, encoded: dict[int, Encoded]):
        """Incremental version: x [B, t, d] at absolute positions pos (contiguous). Each position t attends
        to E_u with u = (t+1)//m - 1, if chunk u's neighbours were encoded; otherwise its output is 0."""
        out = torch.zeros_like(x)
        for i, j, u in attending_runs(pos, self.m):
            if u in encoded:
                enc = encoded[u]  # L = 1
                q_pos = pos[i:j] - u * self.m  # offset from the start of C_u, as in forward()
                out[:, i:j] = self.attn(x[:, i:j], enc.e[:, 0], q_pos, enc.pos, enc.mask[:, 0])
        return out


class EncoderLayer(nn.Module):
    """Self-attention over one neighbour's tokens, cross-attention to the decoder states of the chunk it
    was retrieved for (H_u), MLP. Pre-norm, like the decoder."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        e = cfg.enc_d_model
        self.ln_1 = RMSNorm(e, eps=cfg.norm_eps)
        self.attn = SelfAttention(e, cfg.enc_n_head, cfg.dropout, cfg.rope_base)
        self.ln_2 = RMSNorm(e, eps=cfg.norm_eps)
        self.cross = CrossAttention(e, cfg.d_model, cfg.enc_n_head, cfg.dropout, cfg.rope_base)
        self.ln_3 = RMSNorm(e, eps=cfg.norm_eps)
        self.mlp = MLP(e, cfg.enc_d_ff, cfg.dropout)

    def forward(self, x, key_mask, h, k, h_mask=None):
        """x [N*k, r, e] (one row per neighbour), key_mask [N*k, r], h [N, m, d] (one row per chunk),
        h_mask [N, m] (False at padding of the chunk: never a key)."""
        Nk, r, e = x.shape
        pos = torch.arange(r, device=x.device)
        x = x + self.attn(self.ln_1(x), pos, key_mask=key_mask)
        # Cross-attention treats queries independently, so the k neighbours of a chunk can share one
        # query sequence of k*r tokens against that chunk's m states: no copy of H per neighbour.
        q = self.ln_2(x).reshape(Nk // k, k * r, e)
        y = self.cross(q, h, pos.repeat(k), torch.arange(h.shape[1], device=x.device), key_mask=h_mask)
        x = x + y.reshape(Nk, r, e)
        return x + self.mlp(self.ln_3(x))


class RetroEncoder(nn.Module):
    """The retrieval encoder: bidirectional over each neighbour, conditioned on H_u, run once per forward.

    Token embeddings come from the decoder's table (passed in, width d) and are projected to the
    encoder width; the output is projected back to d once and shared by every CCA layer.
    """

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        d, e = cfg.d_model, cfg.enc_d_model
        self.proj_in = nn.Linear(d, e, bias=False) if e != d else nn.Identity()
        self.ln_h = RMSNorm(d, eps=cfg.norm_eps)  # H_u is a raw residual stream: normalise it
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.ln_f = RMSNorm(e, eps=cfg.norm_eps)
        self.proj_out = nn.Linear(e, d, bias=False)

    def forward(self, tok_emb: torch.Tensor, token_mask: torch.Tensor, h: torch.Tensor,
                h_mask: torch.Tensor | None = None) -> Encoded:
        """tok_emb [B, L, k, r, d], token_mask [B, L, k, r], h [B, L, m, d], h_mask [B, L, m] (False at
        padding of the retrieving chunk) -> Encoded (e [B, L, k*r, d])."""
        B, L, k, r, d = tok_emb.shape
        x = self.proj_in(tok_emb.reshape(B * L * k, r, d))
        mask = token_mask.reshape(B * L * k, r)
        # A missing neighbour (all padding) would give an all-masked softmax row; let it attend to its
        # pad tokens instead. Its output is garbage but finite and masked out of CCA, so unused.
        attn_mask = mask | ~mask.any(dim=-1, keepdim=True)
        hn = self.ln_h(h.reshape(B * L, -1, d))
        flat_h_mask = None if h_mask is None else h_mask.reshape(B * L, -1)
        for layer in self.layers:
            x = layer(x, attn_mask, hn, k, flat_h_mask)
        e = self.proj_out(self.ln_f(x)).reshape(B, L, k * r, d)
        pos = torch.arange(r, device=e.device).repeat(k)
        return Encoded(e, token_mask.reshape(B, L, k * r), pos)


class Block(nn.Module):
    """Pre-norm decoder block: self-attention, then (RETRO blocks only) CCA, then MLP (Appendix B order)."""

    def __init__(self, cfg: RetroConfig, has_cca: bool):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.dropout, cfg.rope_base)
        if has_cca:
            self.ln_cca = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.cca = ChunkedCrossAttention(cfg)
        else:
            self.cca = None
        self.ln_2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.dropout)


# ---------------------------------------------------------------------------------------------------
# Incremental decoding state
# ---------------------------------------------------------------------------------------------------


@dataclass
class RetroCache:
    """Everything `forward_step` needs to extend a sequence by a few tokens without recomputing it.

    k, v: per decoder layer, preallocated [B, heads, max_len, hd] self-attention keys/values.
    h: [B, max_len, d] decoder states at the first CCA layer (the encoder's H_u), kept per position.
    neighbors: chunk index -> neighbour tokens [B, k, r] supplied with `encode_neighbors`.
    encoded: chunk index -> Encoded (L = 1), filled as soon as both neighbours and H_u are known.
    pos: number of tokens processed so far (chunk indices and positions count from the cache start).
    history: the last tokens fed, oldest first (-1 where none yet): what the copy head matches before the next.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    h: torch.Tensor
    max_len: int
    pos: int = 0
    neighbors: dict[int, torch.Tensor] = field(default_factory=dict)
    encoded: dict[int, Encoded] = field(default_factory=dict)
    history: torch.Tensor | None = None  # [B, max(2, copy_match_run - 1)]: bigram, trigram and match run


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


class GenerationMixin:
    """Sampling with retrieval during generation, shared by RetroModel and the retrofit (model/retrofit.py):
    it needs only forward, new_cache, encode_neighbors, forward_step, config, wte and encoder."""

    # -- generation -----------------------------------------------------------------------------------

    @staticmethod
    def _sample(logits, temperature, top_k, top_p, generator):
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = F.softmax(sorted_logits, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
            drop = probs.cumsum(dim=-1) - probs >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def generate_iter(
        self,
        prompt_ids,
        max_new_tokens: int,
        retrieve_fn: Callable[[list[int]], torch.Tensor | None] | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        mix_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield each new token as a LongTensor [B] as soon as it is sampled (for streaming).

        prompt_ids: [T] or [B, T] ids (T >= 1). retrieve_fn(chunk_token_ids) -> [k, r] neighbour ids (pad
        or -1 for missing; None = no neighbours) is called exactly once for every chunk of m tokens that
        completes, in the prompt or in the generated text (per batch row), including a chunk completed by
        the last token. retrieve_fn=None disables retrieval. temperature 0 is greedy.

        Context: at most seq_len tokens. When the context is full it slides forward by half a window
        (a multiple of m, so chunks stay aligned with their neighbours) and the cache is rebuilt from
        the kept tokens; use_cache=False recomputes the full forward on the same window every token
        (slow; for checking and benchmarking the cache).

        mix_fn(logits [B, vocab]) -> logits: replaces the next-token logits (or log-probabilities) before
        sampling, right after the forward pass that made them (kNN-LM mixes its distribution in there).
        """
        cfg = self.config
        idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.wte.weight.device)
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        B, T0 = idx.shape
        if T0 == 0:
            raise ValueError("generate needs a prompt of at least one token")
        m, window = cfg.chunk_size, cfg.seq_len
        slide = max(m, (window // 2) // m * m)
        tokens = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=idx.device)
        tokens[:, :T0] = idx
        n = T0
        retrieval = retrieve_fn is not None and self.encoder is not None
        retrieved: dict[int, torch.Tensor] = {}  # absolute chunk index -> [B, k, r]

        def retrieve(c: int) -> None:
            rows = []
            for b in range(B):
                out = retrieve_fn(tokens[b, c * m : (c + 1) * m].tolist())
                rows.append(torch.full((1, 1), -1) if out is None else torch.as_tensor(out, dtype=torch.long))
            retrieved[c] = _pad_stack(rows).to(idx.device)

        def window_start(start: int) -> int:
            while n - start > window:
                start += slide
            return start

        def full_logits(start: int) -> torch.Tensor:
            L = (n - start) // m
            nb = None
            if retrieval and L > 0:
                nb = _pad_stack([retrieved[start // m + j] for j in range(L)], dim_offset=1)
            return self(tokens[:, start:n], nb)[0][:, -1]

        def prefill(start: int):
            cache = self.new_cache(B)
            if retrieval:
                for j in range((n - start) // m):
                    self.encode_neighbors(cache, j, retrieved[start // m + j])
            return cache, self.forward_step(tokens[:, start:n], cache)[:, -1]

        was_training = self.training
        self.eval()
        try:
            if retrieval:
                for c in range(T0 // m):
                    retrieve(c)
            start = window_start(0)
            cache = None
            if use_cache:
                cache, logits = prefill(start)
            else:
                logits = full_logits(start)
            for i in range(max_new_tokens):
                if mix_fn is not None:
                    logits = mix_fn(logits)
                nxt = self._sample(logits, temperature, top_k, top_p, generator)
                tokens[:, n] = nxt
                n += 1
                yield nxt
                completed = n % m == 0
                if completed and retrieval:
                    retrieve(n // m - 1)
                if i == max_new_tokens - 1:
                    break
                new_start = window_start(start)
                if not use_cache:
                    start = new_start
                    logits = full_logits(start)
                elif new_start != start:
                    start = new_start
                    cache, logits = prefill(start)
                else:
                    if completed and retrieval:
                        self.encode_neighbors(cache, n // m - 1 - start // m, retrieved[n // m - 1])
                    logits = self.forward_step(nxt[:, None], cache)[:, -1]
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, retrieve_fn=None, **sampling) -> torch.Tensor:
        """Prompt followed by max_new_tokens sampled tokens: [T + new] for a 1-D prompt, else [B, T + new].
        `sampling` takes generate_iter's other keyword arguments (temperature, top_k, top_p, ...)."""
        idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.wte.weight.device)
        one_d = idx.dim() == 1
        idx2 = idx.unsqueeze(0) if one_d else idx
        new = list(self.generate_iter(idx2, max_new_tokens, retrieve_fn, **sampling))
        out = torch.cat([idx2, torch.stack(new, dim=1)], dim=1) if new else idx2
        return out[0] if one_d else out


class RetroModel(GenerationMixin, nn.Module):
    def __init__(self, config: RetroConfig):
        super().__init__()
        self.config = cfg = config
        needed, memory = 4 * cfg.estimated_parameters(), psutil.virtual_memory().total
        if needed > memory:  # refuse before allocating: a typo in config.json must not take the machine down
            raise ValueError(f"invalid RetroConfig: its ~{cfg.estimated_parameters() / 1e6:,.0f}M fp32 parameters need "
                             f"{needed / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB")
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, has_cca=(i + 1) in cfg.cca_layers) for i in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one tensor; safetensors' save_model/load_model dedupe it
        # A model with no CCA layer is a plain decoder and has no encoder at all.
        self.encoder = RetroEncoder(cfg) if cfg.cca_layers else None
        self.first_cca = cfg.cca_layers[0] - 1 if cfg.cca_layers else None  # 0-based block index
        use_copy = cfg.copy_head and cfg.cca_layers
        self.copy_head = CopyHead(cfg.d_model, cfg.norm_eps, cfg.copy_bigram, cfg.copy_trigram,
                                  cfg.copy_sink_margin, cfg.copy_match_run) if use_copy else None

        # nanoGPT init: N(0, 0.02), and the projections that write into a residual stream scaled down
        # by sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if self.copy_head is not None:
            self.copy_head.reset_parameters()

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied embedding counts once); non_embedding drops the token table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    # -- neighbours -----------------------------------------------------------------------------------

    def _encode(self, neighbors: torch.Tensor, h_chunks: torch.Tensor, h_mask: torch.Tensor | None = None
                ) -> Encoded:
        """neighbors [B, L, k, r] token ids (pad / negative = padding), h_chunks [B, L, m, d] -> Encoded."""
        pad = self.config.pad_token_id
        valid = (neighbors != pad) & (neighbors >= 0)
        ids = torch.where(valid, neighbors, torch.full_like(neighbors, pad))
        enc = self.encoder(self.wte(ids), valid, h_chunks, h_mask)
        enc.ids = ids.reshape(enc.mask.shape)
        return enc

    def _copy_weights(self, x, idx, prev_idx, prev2_idx, enc: Encoded, recent=None) -> CopyWeights:
        """CopyHead: row n of x/idx/prev_idx/prev2_idx [N, P, ..] attends to chunk n of enc flattened to
        [N = B*L, S]. prev_idx, prev2_idx: the tokens one and two before each of idx (token 0 before the start of
        the sequence); recent [N, P, copy_match_run]: each query token and those before it (-1 before the start)."""
        d = x.shape[-1]
        e, ids, mask = (t.reshape(-1, *t.shape[2:]) for t in (enc.e, enc.ids, enc.mask))
        return self.copy_head.weights(x, self.wte(idx), e, self.wte(ids).reshape(e.shape[0], -1, d),
                                      ids, mask, enc.pos, self.wte(prev_idx), self.wte(prev2_idx), recent)

    def _recent_tokens(self, idx: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor | None:
        """[B, T, copy_match_run]: token t of idx and the ones before it, newest first; `before` [B, R-1]
        holds the tokens fed ahead of idx (-1 where none), as RetroCache keeps them."""
        R = self.config.copy_match_run
        if not R:
            return None
        if before is None:
            before = torch.full((idx.shape[0], R - 1), -1, dtype=idx.dtype, device=idx.device)
        return torch.cat([before, idx], dim=1).unfold(1, R, 1).flip(-1)

    def _check_neighbors(self, neighbors: torch.Tensor, B: int, T: int) -> torch.Tensor:
        L = T // self.config.chunk_size
        if neighbors.dim() != 4 or neighbors.shape[0] != B or neighbors.shape[1] < L:
            raise ValueError(
                f"neighbors must be [B={B}, L>={L}, k, r] for {T} tokens (chunk {self.config.chunk_size}), "
                f"got {list(neighbors.shape)}"
            )
        return neighbors[:, :L].to(device=self.wte.weight.device, dtype=torch.long)

    # -- full forward ---------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, neighbors: torch.Tensor | None = None, targets=None,
                need_logits: bool = True, token_mask: torch.Tensor | None = None):
        """idx [B, T] (T <= seq_len), neighbors [B, L >= T//m, k, r] or None, targets [B, T] (-1 = ignore).

        Returns (logits [B, T, vocab], loss or None). Chunk u's neighbours are used by positions
        (u+1)*m - 1 onwards only; neighbors=None runs the plain decoder. With a CopyHead the "logits"
        are log-probabilities, and need_logits=False skips them (None) when only the loss is wanted.

        token_mask [B, T] (True = a real token) marks padding inside the sequence, such as the short last
        chunk of a document padded to m in a training window: padding is never a key, neither in the
        decoder's self-attention nor for the encoder's view of the retrieving chunk, and its ids are
        replaced by pad_token_id, so no output at a real position depends on what the padding holds.
        """
        B, T = idx.shape
        cfg = self.config
        if T > cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than seq_len {cfg.seq_len}")
        if token_mask is not None:
            token_mask = token_mask.to(device=idx.device, dtype=torch.bool)
            if token_mask.all():
                token_mask = None  # the plain causal path (fused kernel)
            else:
                idx = torch.where(token_mask, idx, torch.full_like(idx, cfg.pad_token_id))
        retrieval = neighbors is not None and self.encoder is not None
        if retrieval:
            neighbors = self._check_neighbors(neighbors, B, T)
            retrieval = neighbors.shape[1] > 0  # T < m: no complete chunk, nobody attends to anything
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx))
        m, enc = cfg.chunk_size, None
        for block in self.blocks:
            x = x + block.attn(block.ln_1(x), pos, causal_key_mask=token_mask)
            if block.cca is not None and retrieval:
                if enc is None:  # first CCA layer: H is x right here, after its self-attention
                    L = neighbors.shape[1]
                    h_mask = None if token_mask is None else token_mask[:, : L * m].reshape(B, L, m)
                    enc = self._encode(neighbors, x[:, : L * m].reshape(B, L, m, -1), h_mask)
                x = x + block.cca(block.ln_cca(x), enc)
            x = x + block.mlp(block.ln_2(x))
        logits = self.lm_head(self.ln_f(x))
        if self.copy_head is not None:
            return self._copy_outputs(logits, x, idx, enc if retrieval else None, targets, need_logits)
        loss = None
        if targets is not None:
            flat = wide(logits).view(-1, logits.size(-1))
            loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _copy_outputs(self, logits, x, idx, enc: Encoded | None, targets, need_logits: bool):
        """forward()'s outputs with the CopyHead: log-probabilities (with or without retrieval), and the
        loss from log p(target) directly (training never builds the mixed distribution)."""
        B, T, _ = logits.shape
        m = self.config.chunk_size
        log_probs = F.log_softmax(wide(logits), dim=-1) if need_logits else None
        loss = None
        if enc is None:
            if targets is not None:
                loss = F.cross_entropy(wide(logits).flatten(0, 1), targets.reshape(-1), ignore_index=-1)
            return log_probs, loss
        # the CCA alignment (see ChunkedCrossAttention.forward): drop the first m-1 positions, pad to
        # L blocks of m, one block per chunk u
        L = enc.e.shape[1]

        def blocks(t, value=0):
            t = t[:, m - 1 :]
            pad = [0, 0] * (t.dim() - 2) + [0, L * m - t.shape[1]]
            return F.pad(t, pad, value=value).reshape(B * L, m, *t.shape[2:])

        def unblock(t):
            return t.reshape(B, L * m, *t.shape[2:])[:, : T - (m - 1)]

        prev = F.pad(idx[:, :-1], (1, 0))  # positions 0 and 1 never copy (t >= m-1)
        prev2 = F.pad(idx[:, :-2], (2, 0))
        recent = self._recent_tokens(idx)
        w = self._copy_weights(blocks(x), blocks(idx), blocks(prev), blocks(prev2), enc,
                               None if recent is None else blocks(recent, value=-1))
        if need_logits:
            mixed = unblock(CopyHead.mix(blocks(logits), w))
            log_probs = torch.cat([log_probs[:, : m - 1], mixed], dim=1)
        if targets is not None:
            # the LM's log p(target) from the fused cross-entropy kernel (ignored targets give 0, masked below)
            log_lm = -F.cross_entropy(wide(logits).flatten(0, 1), targets.reshape(-1), ignore_index=-1,
                                      reduction="none").view(B, T)
            tail_lp = unblock(CopyHead.target_log_prob(blocks(log_lm), blocks(targets, value=-1), w))
            target_lp = torch.cat([log_lm[:, : m - 1], tail_lp], dim=1)
            valid = targets >= 0
            loss = -(target_lp * valid).sum() / valid.sum().clamp_min(1)
        return log_probs, loss

    # -- incremental decoding -------------------------------------------------------------------------

    def new_cache(
        self, batch_size: int = 1, max_len: int | None = None, device=None, dtype=None
    ) -> RetroCache:
        """An empty KV cache for up to max_len (default seq_len) tokens."""
        cfg = self.config
        max_len = max_len or cfg.seq_len
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        hd = cfg.d_model // cfg.n_head
        shape = (batch_size, cfg.n_head, max_len, hd)
        return RetroCache(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
            h=torch.zeros(batch_size, max_len, cfg.d_model, device=device, dtype=dtype),
            max_len=max_len,
        )

    @torch.no_grad()
    def encode_neighbors(self, cache: RetroCache, chunk_index: int, neighbor_tokens) -> None:
        """Supply RET(C_u) for chunk u (0-based, counted from the cache start): [k, r] or [B, k, r] ids.

        Call it as soon as chunk u's m tokens are known, i.e. before the step that feeds its last token,
        since that token already attends to E_u. If H_u is already cached the neighbours are encoded now,
        otherwise during the `forward_step` that completes chunk u. Positions processed before this
        call never see them. A chunk given no neighbours behaves as one whose neighbours are all missing.
        """
        if self.encoder is None:
            return
        nb = torch.as_tensor(neighbor_tokens, dtype=torch.long, device=cache.h.device)
        B = cache.h.shape[0]
        if nb.dim() == 2:
            nb = nb.unsqueeze(0).expand(B, -1, -1)
        if nb.dim() != 3 or nb.shape[0] != B:
            raise ValueError(f"neighbor_tokens must be [k, r] or [{B}, k, r], got {list(nb.shape)}")
        cache.neighbors[chunk_index] = nb
        cache.encoded.pop(chunk_index, None)
        if (chunk_index + 1) * self.config.chunk_size <= cache.pos:
            self._encode_cached(cache, chunk_index)

    def _encode_cached(self, cache: RetroCache, u: int) -> None:
        m = self.config.chunk_size
        h = cache.h[:, u * m : (u + 1) * m].unsqueeze(1)  # [B, 1, m, d]
        cache.encoded[u] = self._encode(cache.neighbors[u].unsqueeze(1), h)

    @torch.no_grad()
    def forward_step(self, idx: torch.Tensor, cache: RetroCache) -> torch.Tensor:
        """Run new tokens idx [B, t] (t >= 1: one token, or a whole prompt) through the model, extending
        `cache`. Returns their logits [B, t, vocab], equal to the full forward's at those positions when
        the same neighbours were supplied in time (see `encode_neighbors`)."""
        B, t = idx.shape
        start, m = cache.pos, self.config.chunk_size
        if start + t > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; cannot add {t} after {start}")
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = x + block.attn.forward_cached(block.ln_1(x), pos, cache.k[i], cache.v[i], start)
            if block.cca is not None:
                if i == self.first_cca:
                    cache.h[:, start : start + t] = x
                    # Chunks completed by these tokens can now be encoded (H_u is whole); their
                    # last tokens, a few rows below, are the first to attend to them.
                    for u in range(start // m, (start + t) // m):
                        if u in cache.neighbors and u not in cache.encoded:
                            self._encode_cached(cache, u)
                x = x + block.cca.forward_positions(block.ln_cca(x), pos, cache.encoded)
            x = x + block.mlp(block.ln_2(x))
        cache.pos += t
        logits = self.lm_head(self.ln_f(x))
        if self.copy_head is None:
            return logits
        out = F.log_softmax(wide(logits), dim=-1)
        R = self.config.copy_match_run
        H = max(2, R - 1)
        past = cache.history if cache.history is not None else torch.full((B, H), -1, dtype=idx.dtype,
                                                                               device=idx.device)
        stream = torch.cat([past, idx], dim=1)
        cache.history = stream[:, -H:]
        prev, prev2 = stream[:, H - 1 : -1].clamp_min(0), stream[:, H - 2 : -2].clamp_min(0)  # token 0: none
        recent = self._recent_tokens(idx, past[:, H - (R - 1) :]) if R else None
        for i, j, u in attending_runs(pos, m):
            if u in cache.encoded:
                w = self._copy_weights(x[:, i:j], idx[:, i:j], prev[:, i:j], prev2[:, i:j], cache.encoded[u],
                                       None if recent is None else recent[:, i:j])
                out[:, i:j] = CopyHead.mix(logits[:, i:j], w)
        return out

    # -- training helpers -----------------------------------------------------------------------------

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95)):
        """AdamW with weight decay on matrices (linear weights, embeddings) and none on norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    # -- persistence (JSON + safetensors, no pickle) ----------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors into directory (created if needed; other files kept)."""
        from safetensors.torch import save_model

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
        # save_model stores a tied lm_head/wte tensor once and load_model restores the tie.
        save_model(self, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> RetroModel:
        from safetensors.torch import load_model

        path = Path(directory)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise RetroError(f"{path}: not a saved RETRO model (missing {f.name})")
        try:
            config = RetroConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
            model = cls(config)
        except (ValueError, TypeError) as err:
            raise RetroError(f"{config_file}: bad model config ({err})") from None
        try:
            load_model(model, str(weights_file), strict=True, device=str(device))
        except Exception as err:  # safetensors raises RuntimeError / SafetensorError
            raise RetroError(
                f"{weights_file}: weights do not match config.json ({str(err).splitlines()[0]})"
            ) from None
        return model.to(device)


def _pad_stack(tensors: Sequence[torch.Tensor], dim_offset: int = 0) -> torch.Tensor:
    """Stack neighbour tensors [.., k, r] along a new dim (index dim_offset), padding k and r with -1
    (missing) to the largest: retrieve_fn may return fewer neighbours or shorter ones for some chunks."""
    k = max(t.shape[-2] for t in tensors)
    r = max(t.shape[-1] for t in tensors)
    padded = [F.pad(t, (0, r - t.shape[-1], 0, k - t.shape[-2]), value=-1) for t in tensors]
    return torch.stack(padded, dim=dim_offset)
