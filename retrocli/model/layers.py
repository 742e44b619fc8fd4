"""Numerics shared by the decoder (retro.py) and the copy head (copy_head.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in the wider of the input's and the weight's dtypes: under bf16 autocast the
    fp32 gain would otherwise meet a bf16 input and miss the fused kernel (and lose precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        return F.rms_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.eps).to(x.dtype)


def wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 for softmax arithmetic (bf16 under autocast), but keep float64 (the tests)."""
    return t if t.dtype == torch.float64 else t.float()
