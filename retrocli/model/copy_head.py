"""The copy head: a pointer over the retrieved continuations, mixed with the LM's softmax.

Not part of the RETRO paper (docs/retro-notes.md describes what is): an optional extra enabled by
RetroConfig.copy_head. The decoder calls it with its final states and the encoded neighbours; without it
the model is the paper's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from retrocli.model.layers import RMSNorm, wide

MAX_MATCH_RUN = 64  # copy_match_run's cap: a chunk's length, the longest run one neighbour spot can extend


def real_before(enc_mask: torch.Tensor, key_pos: torch.Tensor, back: int) -> torch.Tensor:
    """[N, S] whether neighbour token j has a real token `back` places before it in its own neighbour
    (not for a neighbour's first tokens, nor across padding); enc_mask [N, S], key_pos [S]."""
    S = key_pos.shape[0]
    same = F.pad(key_pos[back:] == key_pos[:-back] + back, (back, 0), value=False)[:S]  # [:S]: S may be < back
    return same[None] & F.pad(enc_mask[:, :-back], (back, 0), value=False)[:, :S]


def shared_run(recent: torch.Tensor, enc_ids: torch.Tensor, valid: torch.Tensor, key_pos: torch.Tensor
               ) -> torch.Tensor:
    """[N, P, S] how many tokens, up to R, end both at query p and at neighbour token s: recent [N, P, R]
    (recent[..., d] the token d before p, negative before the sequence start) against the tokens before s
    in its own neighbour (enc_ids/valid [N, S], key_pos [S] the index inside its neighbour)."""
    R, S = recent.shape[-1], enc_ids.shape[-1]
    run = torch.zeros(recent.shape[:2] + (S,), dtype=torch.long, device=recent.device)
    alive = torch.ones_like(run, dtype=torch.bool)
    for back in range(min(R, S)):
        ok = valid if back == 0 else real_before(valid, key_pos, back)
        key = torch.where(ok, F.pad(enc_ids, (back, 0))[:, :S], -2)  # -2 never equals a query token
        alive = alive & (recent[..., back, None] == key[:, None, :])
        run += alive
    return run


@dataclass
class CopyWeights:
    """CopyHead's split of the mass: sink [N, P] (the LM's share), copy [N, P, S] (neighbour token j's
    share, given to next_ids[n, j]), any_key [N] (False: nothing to copy, the LM keeps everything)."""

    sink: torch.Tensor
    copy: torch.Tensor
    next_ids: torch.Tensor
    any_key: torch.Tensor


class CopyHead(nn.Module):
    """A pointer over retrieved continuations (pointer-generator style, See et al. 2017), on top of RETRO.

    Why: a small RETRO decoder learns to copy through CCA only after a long plateau (an induction head
    has to form across the encoder); this head gives copying a direct gradient. Position t, attending
    to E_u with the CCA alignment, scores every neighbour token j:
        score_j = q_t . k_j / sqrt(d),  q_t = Wq h_t + Uq e(x_t),  k_j = Wk E_u[j] + Uk e(n_j)
    (h_t the final decoder state, e() the RMS-normalised token embedding, n_j neighbour token j); with
    copy_bigram also + Pq e(x_{t-1}) and + Pk e(n_{j-1}) (0 for a neighbour's first token), with
    copy_trigram + Rq e(x_{t-2}) and + Rk e(n_{j-2}) as well, with copy_match_run + b[run_tj] (run_tj the
    number of tokens ending at t and at j that agree, up to R), plus a "do not copy" sink scored from h_t.
    A softmax over [sink, scores] splits the probability mass:
        p(w) = a_sink * softmax(logits)(w) + sum_j a_j [n_{j+1} = w]
    i.e. "the token after the neighbour token that matches where I am". Uq = Uk (= Pq = Pk = Rq = Rk) = I
    at init, so it starts as an exact-token (-bigram, -trigram) induction copy; the sink's bias starts high
    so the LM keeps nearly all mass until training says otherwise. With no usable neighbour token,
    a_sink = 1: exactly the LM.
    """

    def __init__(self, d: int, norm_eps: float, bigram: bool, trigram: bool = False, sink_margin: float = 2.0,
                 match_run: int = 0):
        super().__init__()
        self.sink_margin = sink_margin  # RetroConfig checks that a trigram comes with a bigram
        self.norm = RMSNorm(d, eps=norm_eps)
        self.q_state = nn.Linear(d, d, bias=False)
        self.q_token = nn.Linear(d, d, bias=False)
        self.k_state = nn.Linear(d, d, bias=False)
        self.k_token = nn.Linear(d, d, bias=False)
        self.sink = nn.Linear(d, 1, bias=True)
        self.q_prev = nn.Linear(d, d, bias=False) if bigram else None
        self.k_prev = nn.Linear(d, d, bias=False) if bigram else None
        # the token two back as well: an added page's own continuation then outscores the many neighbour
        # spots that share only the last two tokens (see docs/benchmarks.md)
        self.q_prev2 = nn.Linear(d, d, bias=False) if trigram else None
        self.k_prev2 = nn.Linear(d, d, bias=False) if trigram else None
        # a learned score per shared run length 0..match_run (copy_match_run): the spot that continues the
        # copy so far beats others sharing only the last two tokens, as an added page's own text does
        self.run_bonus = nn.Parameter(torch.zeros(match_run + 1)) if match_run else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.q_state.weight.shape[0]
        for lin in (self.q_state, self.k_state):
            nn.init.normal_(lin.weight, std=0.02)
        matched = [lin for lin in (self.q_token, self.k_token, self.q_prev, self.k_prev, self.q_prev2, self.k_prev2)
                   if lin is not None]
        for lin in matched:
            nn.init.eye_(lin.weight)
        nn.init.zeros_(self.sink.weight)
        # each exactly matched token scores ~sqrt(d); a sink 2 above a full match leaves the LM ~88 % of
        # the mass (copy_sink_margin, RetroConfig). AdamW moves this bias by at most ~lr per step, so it
        # stays near its init; the sink's weights do the learning
        self.sink.bias.fill_(len(matched) // 2 * math.sqrt(d) + self.sink_margin)
        if self.run_bonus is not None:
            # one logit per shared token beyond the bigram: a run of 4 ties the sink at margin 2
            self.run_bonus.copy_((torch.arange(len(self.run_bonus)) - 2).clamp_min(0).to(self.run_bonus))

    def weights(self, h, tok_emb, enc_e, key_emb, enc_ids, enc_mask, key_pos, prev_emb=None,
                prev2_emb=None, recent=None) -> CopyWeights:
        """h [N, P, d] final states, tok_emb [N, P, d] embeddings of the query tokens (prev_emb, prev2_emb:
        of the tokens one and two before them, for copy_bigram and copy_trigram); enc_e and key_emb
        (embeddings of the neighbour tokens) [N, S, d], enc_ids/enc_mask [N, S], key_pos [S] (index inside
        its own neighbour); recent [N, P, copy_match_run] the query tokens and those before them (see
        shared_run), for copy_match_run."""
        d = h.shape[-1]
        # token j can be copied only if token j+1 of the same neighbour exists
        next_ids = F.pad(enc_ids[:, 1:], (0, 1), value=0)
        same_neighbor = F.pad(key_pos[1:] == key_pos[:-1] + 1, (0, 1), value=False)
        usable = enc_mask & F.pad(enc_mask[:, 1:], (0, 1), value=False) & same_neighbor[None]
        hn = self.norm(h)
        q = self.q_state(hn) + self.q_token(F.rms_norm(tok_emb, (d,)))
        k = self.k_state(enc_e) + self.k_token(F.rms_norm(key_emb, (d,)))
        # the bigram, then the trigram: token j-back of the same neighbour, a zero vector where j has fewer
        # than `back` real tokens before it in its neighbour (a neighbour's first tokens, or after padding)
        S = key_pos.shape[0]
        has_before = torch.ones_like(enc_mask)
        for back, (q_before, k_before, query_before) in enumerate(
                ((self.q_prev, self.k_prev, prev_emb), (self.q_prev2, self.k_prev2, prev2_emb)), start=1):
            if q_before is None:
                break
            has_before = has_before & real_before(enc_mask, key_pos, back)
            key_before = F.pad(key_emb[:, :-back], (0, 0, back, 0))[:, :S] * has_before[..., None].to(key_emb.dtype)
            q = q + q_before(F.rms_norm(query_before, (d,)))
            k = k + k_before(F.rms_norm(key_before, (d,)))
        scores = wide(q @ k.transpose(1, 2)) / math.sqrt(d)
        if self.run_bonus is not None:
            scores = scores + wide(self.run_bonus)[shared_run(recent, enc_ids, enc_mask, key_pos)]
        scores = scores.masked_fill(~usable[:, None, :], float("-inf"))
        a = F.softmax(torch.cat([wide(self.sink(hn)), scores], dim=-1), dim=-1)
        return CopyWeights(a[..., 0], a[..., 1:], next_ids, usable.any(dim=-1))

    @staticmethod
    def mix(logits, w: CopyWeights) -> torch.Tensor:
        """Full next-token log-probabilities [N, P, V] (for eval and generation). Only the <= S tokens a
        row can copy change, so they are updated in place instead of scattering a dense [N, P, V] mass."""
        log_lm = F.log_softmax(wide(logits), dim=-1)
        out = log_lm + torch.log(w.sink)[..., None]
        idx = w.next_ids[:, None, :].expand(-1, out.shape[1], -1)  # [N, P, S]
        # copy mass per candidate token: neighbour tokens j' with the same next token pool their weights
        same = (w.next_ids[:, :, None] == w.next_ids[:, None, :]).to(w.copy.dtype)  # [N, S, S]
        mass = w.copy @ same
        mixed = torch.logaddexp(out.gather(-1, idx), torch.log(mass.clamp_min(1e-30)))
        out = out.scatter(-1, idx, mixed)  # duplicates of a token write the same value
        return torch.where(w.any_key[:, None, None], out, log_lm)  # nothing to copy: exactly the LM

    @staticmethod
    def target_log_prob(log_lm, targets, w: CopyWeights) -> torch.Tensor:
        """log p(target) [N, P] from the LM's log p(target) [N, P], without building the mixed
        distribution: what training needs, at a fraction of `mix`'s cost (nothing of size vocab here)."""
        copy = (w.copy * (w.next_ids[:, None, :] == targets.clamp_min(0)[..., None])).sum(-1)
        mixed = torch.logaddexp(log_lm + torch.log(w.sink), torch.log(copy.clamp_min(1e-30)))
        return torch.where(w.any_key[:, None], mixed, log_lm)
