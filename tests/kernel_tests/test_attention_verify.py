"""Verify attention (speculative decoding: T queries per row at a per-row start read on the device): the
Triton kernel (`_attention_prefill_kernel` with PER_ROW_START) against `attention_verify_ref` in Triton's
interpreter with the GPU's tile sizes, the reference against `attention_prefill_ref` (known answers), and the
"cpu" backend's SDPA path against the reference. Its CUDA launches are compiled in test_attention_prefill.py
(`aot_configs` holds both)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codellama_rt.kernels import attention_prefill as mod
from codellama_rt.kernels.attention_prefill import (attention_prefill_ref, attention_verify, attention_verify_ref,
                                                    attention_verify_sdpa)
from tolerances import assert_close, assert_error_within_torch

from .test_attention_prefill import DTYPES

# (H, Hkv, T, S, starts, D): one batch, a row per start. Rows start at 0, mid-cache and near S; "idle" rows have
# starts + T > S (their queries past S - 1 see keys 0 .. S - 1), one starts past S. T in {1, 2, 5, 9, 17}
# (17: two 16-query tiles), GQA 1/4/8, D 64/128; S rarely a multiple of the 64-key blocks. Heads are few:
# the interpreter pays per program.
CASES = [
    (2, 2, 1, 40, (0, 21, 39), 128),
    (4, 1, 2, 70, (0, 33, 67), 64),
    (4, 1, 5, 64, (0, 30, 61), 128),      # row 2 idle: 61 + 5 > 64
    (8, 1, 5, 130, (70, 125), 64),
    (4, 1, 9, 100, (3, 64, 91), 128),     # 91 + 9 = 100 = S: the last row ends exactly at the cache's end
    (2, 2, 9, 77, (0, 75, 90), 64),       # idle rows: 75 + 9 > 77, and 90 > S
    (8, 2, 17, 90, (0, 47, 80), 64),      # two query tiles; row 2 idle
    (4, 4, 17, 150, (0, 131), 128),       # 131 + 17 = 148: both full and diagonal key blocks
]


def _case_id(c):
    H, Hkv, T, S, starts, D = c
    return f"H{H}/{Hkv}-T{T}-S{S}-starts{'_'.join(map(str, starts))}-D{D}"


def _inputs(H, Hkv, T, S, starts, D, dtype, seed):
    """q [B, H, T, D], k/v caches [B, Hkv, S, D] with huge keys and NaN values at and past each row's
    min(start + T, S) (read, they would show), starts int64 [B]."""
    g = torch.Generator().manual_seed(seed)
    B = len(starts)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    for b, start in enumerate(starts):
        k[b, :, start + T:] = 1e4
        v[b, :, start + T:] = float("nan")
    return q, k, v, torch.tensor(starts, dtype=torch.int64)


def _sdpa(q, k, v, starts):
    """PyTorch's own attention in the inputs' dtype (the "torch in the same dtype" of the error rule), with the
    masks built here, row by row."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    mask = torch.zeros(B, 1, T, S, dtype=torch.bool)
    k, v = k.clone(), v.clone()
    for b, start in enumerate(starts.tolist()):
        for i in range(T):
            mask[b, 0, i, :min(start + i, S - 1) + 1] = True
        k[b, :, min(start + T, S):] = 0
        v[b, :, min(start + T, S):] = 0
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _check(out, q, k, v, starts):
    dtype = q.dtype
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert not out.isnan().any(), "unwritten output elements (NaN poison survived) or garbage keys read"
    ref = attention_verify_ref(q, k, v, starts)
    assert not ref.isnan().any()
    assert_close(out, ref)
    if dtype != torch.float32:
        ref32 = attention_verify_ref(q.float(), k.float(), v.float(), starts)
        assert_error_within_torch(out, _sdpa(q, k, v, starts), ref32, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(nan_empty, case, dtype):
    q, k, v, starts = _inputs(*case, dtype, seed=case[2] * 100 + case[3])
    _check(attention_verify(q, k, v, starts), q, k, v, starts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_layout_views_read_in_place(nan_empty, dtype):
    """q as the model makes it (a view of the fused qkv projection, transposed), k/v the [:B, :, :S] slices of
    caches with more rows and positions, NaN wherever a row must not read; starts a strided view (positions'
    first column). Inputs are left as they were."""
    B, H, Hkv, D, T, S, max_batch, max_seq = 3, 4, 1, 64, 5, 72, 4, 96
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    q = qkv[..., :H * D].view(B, T, H, D).transpose(1, 2)
    positions = torch.tensor([[0], [40], [69]]) + torch.arange(T)  # [B, T]; row 2 idle (69 + 5 > 72)
    starts = positions[:, 0]
    k_cache = torch.full((max_batch, Hkv, max_seq, D), float("nan"), dtype=dtype)
    v_cache = torch.full((max_batch, Hkv, max_seq, D), float("nan"), dtype=dtype)
    for b, start in enumerate(starts.tolist()):
        k_cache[b, :, :start + T] = torch.randn(Hkv, min(start + T, max_seq), D, generator=g).to(dtype)
        v_cache[b, :, :start + T] = torch.randn(Hkv, min(start + T, max_seq), D, generator=g).to(dtype)
    k, v = k_cache[:B, :, :S], v_cache[:B, :, :S]
    assert not q.is_contiguous() and not k.is_contiguous() and starts.stride() != (1,)
    before = [t.clone() for t in (qkv, k_cache, v_cache, positions)]
    out = attention_verify(q, k, v, starts)
    for t, b in zip((qkv, k_cache, v_cache, positions), before):
        assert torch.equal(t.view(torch.uint8), b.view(torch.uint8)), "inputs modified"
    _check(out, q.contiguous(), k.contiguous(), v.contiguous(), starts.contiguous())


def test_idle_rows_see_the_whole_cache_and_stay_in_bounds(nan_empty):
    """Rows with starts + T > S, two of them starting past S: every query past S - 1 attends to keys
    0 .. S - 1 (the answer of one query at position S - 1), and nothing beyond the slice is read (the
    cache's positions past S are NaN). The second query tile of rows 0 and 2 begins past S, beyond the next
    64-key block boundary: its key loop must stop at S too."""
    g = torch.Generator().manual_seed(9)
    H, Hkv, T, S, D = 4, 2, 17, 60, 64
    starts = torch.tensor([50, 59, 61, 130])
    B = len(starts)
    q = torch.randn(B, H, T, D, generator=g)
    cache = [torch.full((B, Hkv, 160, D), float("nan")) for _ in range(2)]
    for c in cache:
        c[:, :, :S] = torch.randn(B, Hkv, S, D, generator=g)
    k, v = (c[:, :, :S] for c in cache)
    out = attention_verify(q, k, v, starts)
    assert out.isfinite().all()
    _check(out, q, k, v, starts)
    ref = attention_verify_ref(q, k, v, starts)
    for b, start in enumerate(starts.tolist()):
        for i in range(T):
            one = attention_prefill_ref(q[b:b + 1, :, i:i + 1], k[b:b + 1], v[b:b + 1], min(start + i, S - 1))
            assert_close(ref[b:b + 1, :, i:i + 1], one)


def test_reference_is_prefill_reference_row_by_row():
    """Known answers: with equal starts the reference is `attention_prefill_ref` at that start, and with
    different starts each (active) row is `attention_prefill_ref` of that row at its start."""
    q, k, v, _ = _inputs(8, 2, 5, 60, (12, 12), 64, torch.float32, seed=1)
    starts = torch.full((2,), 12)
    assert_close(attention_verify_ref(q, k, v, starts), attention_prefill_ref(q, k, v, 12))
    q, k, v, starts = _inputs(4, 1, 7, 60, (0, 20, 53), 128, torch.float32, seed=2)
    ref = attention_verify_ref(q, k, v, starts)
    for b, start in enumerate(starts.tolist()):
        assert_close(ref[b:b + 1], attention_prefill_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], start))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cpu_sdpa_matches_reference(case, dtype):
    """The "cpu" backend's verify attention (torch's SDPA with a bool mask, fp32 inside)."""
    q, k, v, starts = _inputs(*case, dtype, seed=case[2] * 100 + case[3])
    _check(attention_verify_sdpa(q, k, v, starts), q, k, v, starts)


def test_starts_are_never_read_on_the_host():
    """The launch (checks, arguments, constexprs) and both torch paths are built from meta tensors, whose
    values cannot be read: nothing on the host waits for the device's starts (CUDA-graph capturable)."""
    B, H, Hkv, T, S, D = 2, 4, 2, 5, 64, 64
    q = torch.empty(B, H, T, D, device="meta", dtype=torch.bfloat16)
    k = torch.empty(B, Hkv, S, D, device="meta", dtype=torch.bfloat16)
    starts = torch.empty(B, device="meta", dtype=torch.int64)
    out, (grid, _, constexprs, _) = mod._prepare_verify(q, k, k, starts, on_cuda=True)
    assert out.shape == q.shape and grid == (1, H, B) and constexprs["PER_ROW_START"] is True
    assert attention_verify_ref(q, k, k, starts).shape == q.shape
    assert attention_verify_sdpa(q, k, k, starts).shape == q.shape


def test_empty():
    k = torch.randn(2, 2, 10, 64)
    starts = torch.tensor([3, 9])
    for args in ((torch.randn(2, 4, 0, 64), k, k, starts), (torch.randn(0, 4, 5, 64), k[:0], k[:0], starts[:0])):
        for fn in (attention_verify, attention_verify_ref, attention_verify_sdpa):
            assert fn(*args).shape == args[0].shape, fn.__name__


def _bad(**overrides):
    base = dict(q=torch.randn(2, 4, 5, 64), k_cache=torch.randn(2, 2, 8, 64), v_cache=torch.randn(2, 2, 8, 64),
                starts=torch.tensor([0, 3]))
    base.update(overrides)
    return base


BAD = [
    pytest.param(_bad(q=torch.randn(4, 5, 64)), ValueError, "q must be a 4-d", id="q-3d"),
    pytest.param(_bad(k_cache=torch.randn(2, 2, 8, 64, 1)), ValueError, "k_cache must be a 4-d", id="k-5d"),
    pytest.param(_bad(q=torch.randn(2, 4, 5, 64, dtype=torch.float64)), TypeError, "not supported", id="float64"),
    pytest.param(_bad(v_cache=torch.randn(2, 2, 8, 64).half()), TypeError, "one dtype", id="mixed-dtypes"),
    pytest.param(_bad(q=torch.randn(2, 4, 5, 96), k_cache=torch.randn(2, 2, 8, 96), v_cache=torch.randn(2, 2, 8, 96)),
                 ValueError, "head_dim 96", id="head_dim-96"),
    pytest.param(_bad(v_cache=torch.randn(2, 2, 9, 64)), ValueError, "differ in shape", id="k-v-shapes"),
    pytest.param(_bad(k_cache=torch.randn(3, 2, 8, 64), v_cache=torch.randn(3, 2, 8, 64)), ValueError, "batch",
                 id="batch"),
    pytest.param(_bad(k_cache=torch.randn(2, 3, 8, 64), v_cache=torch.randn(2, 3, 8, 64)), ValueError,
                 "multiple of n_kv_heads", id="gqa-ratio"),
    pytest.param(_bad(k_cache=torch.randn(2, 2, 8, 64, device="meta")), ValueError, "one device", id="devices"),
    pytest.param(_bad(starts=[0, 3]), TypeError, "starts must be an int64 tensor", id="starts-list"),
    pytest.param(_bad(starts=torch.tensor([0, 3], dtype=torch.int32)), TypeError, "starts must be int64",
                 id="starts-int32"),
    pytest.param(_bad(starts=torch.tensor([0, 3, 4])), ValueError, r"starts must have shape \[B\] = \(2,\)",
                 id="starts-length"),
    pytest.param(_bad(starts=torch.tensor([[0], [3]])), ValueError, "starts must have shape", id="starts-2d"),
    pytest.param(_bad(starts=torch.tensor([0, 3], device="meta")), ValueError, "starts must be on q's device",
                 id="starts-device"),
    pytest.param(_bad(k_cache=torch.randn(2, 2, 0, 64), v_cache=torch.randn(2, 2, 0, 64)), ValueError,
                 "hold no positions", id="empty-cache"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_inputs_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        attention_verify(**kwargs)
