"""Causal grouped-query attention over a chunk of queries placed after cached tokens (prefill)."""
from __future__ import annotations

import math

import torch


def _expand_kv(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, H, S, D]; query head h reads kv head h // (H // Hkv)."""
    return kv.repeat_interleave(n_heads // kv.shape[1], dim=1)


def attention_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of a query chunk placed after `start` cached tokens.

    q: [B, H, T, D]; k, v: [B, Hkv, S, D] with S >= start + T (keys beyond start + T are ignored).
    Query i (absolute position start + i) sees keys 0 .. start + i.
    Scores, softmax and the weighted sum in fp32; returns [B, H, T, D] in q's dtype.
    """
    B, H, T, D = q.shape
    S = start + T
    k = _expand_kv(k[:, :, :S], H).float()
    v = _expand_kv(v[:, :, :S], H).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * (1.0 / math.sqrt(D))
    q_pos = torch.arange(start, S, device=q.device)[:, None]
    k_pos = torch.arange(S, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)
