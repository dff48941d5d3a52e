"""Kernel micro-benchmarks through the backend table (`ops.*`, what the model calls), one per op and
backend: prefill-sized RMSNorm, rotary and attention; decode-sized (batch 1) attention over the KV cache
and the projections, dense and 4-bit. GB/s (bytes the op must move / median) is saved in extra_info."""
from __future__ import annotations

import torch


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(*shape, s, device, scale=1.0):
    return torch.randn(*shape, dtype=s["dtype"], device=device) * scale


def test_rms_norm(timed, ops, shapes, device):
    s = shapes
    x, r = _randn(s["tokens"], s["dim"], s=s, device=device), _randn(s["tokens"], s["dim"], s=s, device=device)
    w = _randn(s["dim"], s=s, device=device)
    timed(lambda: ops.rms_norm(x, w, 1e-5, r), nbytes=4 * _nbytes(x))  # read x, residual; write y, h


def test_rotary(timed, ops, shapes, device):
    from codellama_rt.kernels.rotary import rope_tables

    s = shapes
    T, D = s["tokens"], s["head_dim"]
    q = _randn(1, s["heads"], T, D, s=s, device=device)
    k = _randn(1, s["kv_heads"], T, D, s=s, device=device)
    cos, sin = rope_tables(D, T, 1e6, device=device)
    pos = torch.arange(T, device=device).expand(1, T)
    timed(lambda: ops.rotary(q, k, cos, sin, pos), nbytes=2 * _nbytes(q, k))


def test_attention_prefill(timed, ops, shapes, device):
    s = shapes
    T, D = s["tokens"], s["head_dim"]
    q = _randn(1, s["heads"], T, D, s=s, device=device)
    k, v = (_randn(1, s["kv_heads"], T, D, s=s, device=device) for _ in range(2))
    timed(lambda: ops.attention_prefill(q, k, v, 0))


def test_attention_decode(timed, ops, shapes, device):
    """One decode step's attention: rotate q and k, write k and v into the cache, attend over `cache` tokens."""
    from codellama_rt.kernels.rotary import rope_tables

    s = shapes
    S, D = s["cache"], s["head_dim"]
    q = _randn(1, s["heads"], 1, D, s=s, device=device)
    k, v = (_randn(1, s["kv_heads"], 1, D, s=s, device=device) for _ in range(2))
    k_cache, v_cache = (_randn(1, s["kv_heads"], S, D, s=s, device=device) for _ in range(2))
    cos, sin = rope_tables(D, S, 1e6, device=device)
    positions = torch.full((1, 1), S - 1, device=device)
    slots = torch.full((1,), S - 1, device=device)
    lengths = torch.full((1,), S, device=device)
    timed(lambda: ops.rotary_attention_decode(q, k, v, cos, sin, positions, k_cache, v_cache, slots, lengths),
          nbytes=_nbytes(k_cache, v_cache))


def test_linear_decode(timed, ops, shapes, device):
    """Batch-1 dense projection at wqkv's shape (the GEMV kernel on a GPU)."""
    s = shapes
    x = _randn(1, s["dim"], s=s, device=device)
    w = _randn(3 * s["dim"], s["dim"], s=s, device=device, scale=s["dim"] ** -0.5)
    timed(lambda: ops.linear(x, w), nbytes=_nbytes(w))


def test_linear_swiglu_decode(timed, ops, shapes, device):
    """Batch-1 gate/up projection with the SwiGLU (w13's shape)."""
    s = shapes
    x = _randn(1, s["dim"], s=s, device=device)
    w13 = _randn(2 * s["ffn"], s["dim"], s=s, device=device, scale=s["dim"] ** -0.5)
    timed(lambda: ops.linear_swiglu(x, w13), nbytes=_nbytes(w13))


def _quantized(method: str, shapes, device):
    from codellama_rt.quant.linear import quantize_weight

    s = shapes
    w = _randn(3 * s["dim"], s["dim"], s=s, device=device, scale=s["dim"] ** -0.5)
    qw = quantize_weight(w, method, group_size=128 if s["dim"] % 128 == 0 else 64)
    return qw, sum(_nbytes(t) for t in vars(qw).values() if isinstance(t, torch.Tensor))


def test_int4_linear_decode(timed, ops, shapes, device):
    """Batch-1 int4 projection at wqkv's shape; bytes: packed weights, scales and zeros."""
    qw, nbytes = _quantized("int4", shapes, device)
    x = _randn(1, shapes["dim"], s=shapes, device=device)
    timed(lambda: ops.linear_int4(x, qw), nbytes=nbytes)


def test_nf4_linear_decode(timed, ops, shapes, device):
    """Batch-1 NF4 projection at wqkv's shape; bytes: packed weights and the quantized absmax."""
    qw, nbytes = _quantized("nf4", shapes, device)
    x = _randn(1, shapes["dim"], s=shapes, device=device)
    timed(lambda: ops.linear_nf4(x, qw), nbytes=nbytes)
