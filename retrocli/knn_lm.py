"""kNN-LM (Khandelwal et al. 2019): the interpolation. With a datastore of (hidden state, next token) pairs
(retrocli.datastore), the next-token distribution becomes p = λ·p_kNN + (1−λ)·p_LM, where p_kNN is the
softmax of −distance / T over the K nearest keys, spread onto their tokens. Here: that maths, and the
tuning of λ (one, or one per bucket of nearest-key distance) and T on held-out tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

from retrocli.options import (
    DEFAULT_LAMBDA_BUCKETS,
)

# --lambda auto: λ on this grid, T = scale × the median nearest-key distance on the dev documents
LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # 0 … 0.95
TEMPERATURE_SCALES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


# -- which DB tokens get a key ----------------------------------------------------------------------------


# -- hidden states --------------------------------------------------------------------------------------


# -- building -------------------------------------------------------------------------------------------


# -- searching ------------------------------------------------------------------------------------------


# -- the interpolation ----------------------------------------------------------------------------------

def knn_target_probs(dists: np.ndarray, values: np.ndarray, targets: np.ndarray, temperature: float) -> np.ndarray:
    """p_kNN(target) per query: softmax(−d / T) over its neighbours (inf = none), summed over those whose
    value is the target; 0 where a query has no neighbour."""
    logits = np.where(np.isfinite(dists), -dists / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(top), top, 0))
    total = weights.sum(axis=1)
    hit = (weights * (values == targets[:, None])).sum(axis=1)
    return np.where(total > 0, hit / np.maximum(total, 1e-300), 0.0)


def mixed_bits(bits_lm: np.ndarray, p_knn: np.ndarray, lam) -> np.ndarray:
    """−log₂(λ·p_kNN + (1−λ)·p_LM), with p_LM = 2^−bits_lm."""
    return -np.log2(lam * p_knn + (1 - lam) * np.exp2(-bits_lm))


def knn_distribution(dists: np.ndarray, values: np.ndarray, temperature: float, vocab_size: int) -> torch.Tensor:
    """p_kNN over the vocabulary for one query (for sampling): the neighbours' softmax weights added onto
    their tokens."""
    p = torch.zeros(vocab_size, dtype=torch.float64)
    finite = np.isfinite(dists)
    if not finite.any():
        return p
    logits = -dists[finite].astype(np.float64) / temperature
    weights = np.exp(logits - logits.max())
    p.index_add_(0, torch.from_numpy(values[finite].astype(np.int64)), torch.from_numpy(weights / weights.sum()))
    return p


@dataclass
class Interpolation:
    """How p_kNN and p_LM are mixed: λ (or one λ per bucket of nearest-key distance) and T."""

    temperature: float
    lam: float
    bucket_edges: list[float] | None = None  # upper edges of the distance buckets but the last
    bucket_lambdas: list[float] | None = None

    def lambdas(self, nearest: np.ndarray) -> np.ndarray:
        """λ per query from its nearest-key distance (inf = no neighbour: λ = 0)."""
        if self.bucket_edges is None:
            lam = np.full(len(nearest), self.lam)
        else:
            lam = np.asarray(self.bucket_lambdas)[np.searchsorted(self.bucket_edges, nearest, side="left")]
        return np.where(np.isfinite(nearest), lam, 0.0)

    def bits(self, bits_lm: np.ndarray, dists: np.ndarray, values: np.ndarray, targets: np.ndarray) -> np.ndarray:
        p = knn_target_probs(dists, values, targets, self.temperature)
        return mixed_bits(bits_lm, p, self.lambdas(dists[:, 0] if dists.shape[1] else np.full(len(p), np.inf)))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def tune_interpolation(
    bits_lm: np.ndarray, dists: np.ndarray, values: np.ndarray, targets: np.ndarray,
    buckets: int = DEFAULT_LAMBDA_BUCKETS, temperature: float | None = None,
) -> tuple[Interpolation, Interpolation]:
    """On dev tokens: T (unless given) and λ minimising the total bits, then one λ per bucket of
    nearest-key distance (quantiles of the dev tokens', `buckets` of them) at that T. Returns (global,
    bucketed)."""
    nearest = dists[:, 0]
    found = np.isfinite(nearest)
    if not found.any():
        return Interpolation(temperature or 1.0, 0.0), Interpolation(temperature or 1.0, 0.0, [], [0.0])
    scale = float(np.median(nearest[found])) or 1.0
    temperatures = [temperature] if temperature else [s * scale for s in TEMPERATURE_SCALES]
    best = None
    for t in temperatures:
        p = knn_target_probs(dists, values, targets, t)
        for lam in LAMBDA_GRID:
            total = float(mixed_bits(bits_lm[found], p[found], lam).sum())
            if best is None or total < best[0]:
                best = (total, t, lam, p)
    _, t, lam, p = best
    edges = np.unique(np.quantile(nearest[found], [i / buckets for i in range(1, buckets)])).tolist()
    which = np.searchsorted(edges, nearest, side="left")
    per_bucket = []
    for b in range(len(edges) + 1):
        mask = found & (which == b)
        totals = [float(mixed_bits(bits_lm[mask], p[mask], g).sum()) for g in LAMBDA_GRID]
        per_bucket.append(LAMBDA_GRID[int(np.argmin(totals))] if mask.any() else lam)
    return Interpolation(t, lam), Interpolation(t, lam, [float(e) for e in edges], per_bucket)


def is_dev_document(text: str) -> bool:
    """--lambda auto tunes on the held-out documents this says yes to (about half, by a hash of the text,
    so the split never depends on order) and reports on the others."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 2 == 0


