"""Rotary position embedding (RoPE) in the Hugging Face rotate-half layout."""
from __future__ import annotations

import torch


def rope_tables(head_dim: int, max_pos: int, theta: float, scale: float = 1.0,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each fp32 [max_pos, head_dim // 2].

    Angle(p, i) = (p / scale) * theta ** (-2i / head_dim); computed in fp64 and rounded once,
    so positions near 100k keep full fp32 accuracy. `scale` is the linear rope_scaling factor.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    pos = torch.arange(max_pos, dtype=torch.float64) / scale
    angles = torch.outer(pos, inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, D] and k [B, Hkv, T, D] by their positions [B, T] (int64).

    Layout: rotate-half (HF): dimension i pairs with i + D/2, not Meta's interleaved (2i, 2i+1);
    Meta checkpoints are permuted at load. cos/sin: fp32 tables [max_pos, D/2] from `rope_tables`.
    Math in fp32, result in the input dtype. Returns new (q, k).
    """
    c = cos[positions].unsqueeze(1)  # [B, 1, T, D/2]
    s = sin[positions].unsqueeze(1)
    return _rotate(q, c, s), _rotate(k, c, s)
