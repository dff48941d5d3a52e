"""Grouped-query attention of one query token per sequence against its KV cache (decode)."""
from __future__ import annotations

import math

import torch


def _expand_kv(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, H, S, D]; query head h reads kv head h // (H // Hkv)."""
    return kv.repeat_interleave(n_heads // kv.shape[1], dim=1)


def attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         lengths: torch.Tensor) -> torch.Tensor:
    """One query per sequence against its cached keys.

    q: [B, H, D]; k_cache, v_cache: [B, Hkv, S, D]; lengths: int64 [B], 1 <= lengths[b] <= S,
    sequence b attends to cache positions 0 .. lengths[b] - 1. fp32 math; returns [B, H, D].
    """
    B, H, D = q.shape
    S = k_cache.shape[2]
    k = _expand_kv(k_cache, H).float()
    v = _expand_kv(v_cache, H).float()
    scores = torch.matmul(k, q.float().unsqueeze(-1)).squeeze(-1) * (1.0 / math.sqrt(D))  # [B, H, S]
    valid = torch.arange(S, device=q.device)[None, :] < lengths[:, None]  # [B, S]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).unsqueeze(-2), v).squeeze(-2).to(q.dtype)
