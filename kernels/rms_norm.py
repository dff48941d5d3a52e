"""RMSNorm, optionally fused with the residual add."""
from __future__ import annotations

from typing import Optional

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = normalize(x + residual) * weight.

    x, residual: [..., dim] in the model dtype; weight: [dim].
    Returns (y, h) where h = x + residual (or x) is the new residual stream, both in x's dtype.
    Numerics follow Meta/HF: the sum is taken in the io dtype, the mean of squares and the
    normalisation in fp32, the result is cast back to the io dtype before the weight multiply.
    """
    h = x if residual is None else x + residual
    h32 = h.float()
    y = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight, h
