"""Triton flash-attention prefill against `attention_prefill_ref`, run in Triton's interpreter on CPU with
the tile sizes the GPU uses (so the same stage split and masking), and its CUDA launches compiled ahead
of time for sm_80 / sm_90."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from codellama_rt.kernels import attention_prefill as mod
from codellama_rt.kernels._triton import launch_config, triton_dtype
from codellama_rt.kernels.attention_prefill import (aot_configs, attention_prefill, attention_prefill_ref,
                                                    attention_prefill_sdpa)
from codellama_rt.bench.common import aot_models
from tolerances import assert_close, assert_error_within_torch

# Triton's interpreter turns 1-element arrays into loop bounds with int(); NumPy deprecates that.

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, H, Hkv, T, start, extra, D): k/v hold S = start + T + extra positions (the extra ones are garbage the
# kernel must not read). Every T in {1, 5, 37, 130} meets every start in {0, 3, 100}; GQA ratios 1/4/8,
# D 64/128 (tiles 64x64 / 128x64 in 16-bit: T = 130 spans two or three query tiles, S rarely a multiple
# of 64), B 1/2. Heads are kept few where T is large: the interpreter pays per program.
CASES = [
    (1, 8, 8, 1, 0, 0, 128),
    (2, 8, 2, 1, 3, 5, 64),
    (1, 8, 1, 1, 100, 0, 128),
    (2, 4, 1, 5, 0, 7, 64),
    (1, 8, 8, 5, 3, 0, 128),
    (1, 8, 2, 5, 100, 29, 64),
    (1, 4, 1, 37, 0, 0, 128),
    (2, 2, 2, 37, 3, 64, 64),
    (1, 8, 1, 37, 100, 1, 128),
    (1, 8, 1, 130, 0, 3, 64),
    (2, 1, 1, 130, 3, 0, 128),
    (1, 4, 1, 130, 100, 70, 128),
]


def _case_id(c):
    B, H, Hkv, T, start, extra, D = c
    return f"B{B}-H{H}/{Hkv}-T{T}-start{start}-extra{extra}-D{D}"


def _inputs(B, H, Hkv, T, start, extra, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    S = start + T + extra
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    if extra:  # keys past start + T: huge scores and NaN values if read
        k[:, :, start + T:] = 1e4
        v[:, :, start + T:] = float("nan")
    return q, k, v


def _sdpa(q, k, v, start):
    """PyTorch's own attention in the inputs' dtype (the "torch in the same dtype" of the error rule)."""
    H, T, L = q.shape[1], q.shape[2], start + q.shape[2]
    k, v = (t[:, :, :L].repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    mask = torch.ones(T, L, dtype=torch.bool).tril(start)  # query i sees keys 0 .. start + i
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _check(out, q, k, v, start):
    dtype = q.dtype
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert not out.isnan().any(), "unwritten output elements (NaN poison survived) or garbage keys read"
    ref = attention_prefill_ref(q, k, v, start)
    assert_close(out, ref)
    if dtype != torch.float32:
        ref32 = attention_prefill_ref(q.float(), k.float(), v.float(), start)
        assert_error_within_torch(out, _sdpa(q, k, v, start), ref32, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(nan_empty, case, dtype):
    q, k, v = _inputs(*case, dtype, seed=sum(case))
    start = case[4]
    _check(attention_prefill(q, k, v, start), q, k, v, start)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_layout_views_read_in_place(nan_empty, dtype):
    """q as the model makes it (a view of the fused qkv projection, transposed), k/v as slices of a larger
    cache (more batch rows and positions than used, filled with garbage beyond the slice)."""
    B, H, Hkv, D, T, start, max_batch, max_seq = 2, 8, 2, 64, 37, 20, 3, 96
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    q = qkv[..., :H * D].view(B, T, H, D).transpose(1, 2)
    k_cache = torch.full((max_batch, Hkv, max_seq, D), float("nan"), dtype=dtype)
    v_cache = torch.full((max_batch, Hkv, max_seq, D), float("nan"), dtype=dtype)
    k_cache[:B, :, :start + T] = torch.randn(B, Hkv, start + T, D, generator=g).to(dtype)
    v_cache[:B, :, :start + T] = torch.randn(B, Hkv, start + T, D, generator=g).to(dtype)
    k, v = k_cache[:B, :, :start + T], v_cache[:B, :, :start + T]
    assert not q.is_contiguous() and not k.is_contiguous()
    before = [t.clone() for t in (qkv, k_cache, v_cache)]
    out = attention_prefill(q, k, v, start)
    for t, b in zip((qkv, k_cache, v_cache), before):
        assert torch.equal(t.view(torch.uint8), b.view(torch.uint8)), "inputs modified"
    _check(out, q.contiguous(), k.contiguous(), v.contiguous(), start)


def test_any_strides(nan_empty):
    """head_dim not the innermost dimension (no unit stride anywhere): still read through the strides."""
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, T, start, D = 1, 4, 2, 9, 4, 64
    q = torch.randn(B, H, D, T, generator=g).transpose(2, 3)
    k = torch.randn(B, D, Hkv, start + T, generator=g).permute(0, 2, 3, 1)
    v = torch.randn(Hkv, start + T, B, D, generator=g).permute(2, 0, 1, 3)
    _check(attention_prefill(q, k, v, start), q.contiguous(), k.contiguous(), v.contiguous(), start)


@pytest.mark.parametrize("D", [16, 32])
def test_small_head_dims(nan_empty, D):
    q, k, v = _inputs(1, 2, 1, 21, 5, 3, D, torch.float16, seed=D)
    _check(attention_prefill(q, k, v, 5), q, k, v, 5)


def test_chunked_prefill_matches_one_shot(nan_empty):
    """Prefill in chunks through a cache (as `Prefill.attend` does) gives the one-shot result."""
    g = torch.Generator().manual_seed(11)
    B, H, Hkv, D, T = 1, 4, 1, 128, 150
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    whole = attention_prefill(q, k, v, 0)
    k_cache = torch.full((B, Hkv, 256, D), float("nan"))
    v_cache = torch.full((B, Hkv, 256, D), float("nan"))
    chunks = []
    for a, b in ((0, 64), (64, 65), (65, 150)):
        k_cache[:, :, a:b], v_cache[:, :, a:b] = k[:, :, a:b], v[:, :, a:b]
        chunks.append(attention_prefill(q[:, :, a:b], k_cache[:, :, :b], v_cache[:, :, :b], a))
    assert_close(torch.cat(chunks, dim=2), whole)
    assert_close(whole, attention_prefill_ref(q, k, v, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cpu_sdpa_matches_reference(case, dtype):
    """The "cpu" backend's prefill attention (torch's fused SDPA in fp32)."""
    q, k, v = _inputs(*case, dtype, seed=sum(case))
    _check(attention_prefill_sdpa(q, k, v, case[4]), q, k, v, case[4])
    assert attention_prefill_sdpa(q[:, :, :0], k, v, 3).shape == q[:, :, :0].shape


def test_empty_chunk():
    q = torch.randn(2, 4, 0, 64)
    k = torch.randn(2, 2, 10, 64)
    out = attention_prefill(q, k, k, 10)
    assert out.shape == (2, 4, 0, 64)


def _bad(**overrides):
    base = dict(q=torch.randn(1, 4, 5, 64), k=torch.randn(1, 2, 8, 64), v=torch.randn(1, 2, 8, 64), start=3)
    base.update(overrides)
    return base


BAD = [
    pytest.param(_bad(q=torch.randn(4, 5, 64)), ValueError, "4-d", id="q-3d"),
    pytest.param(_bad(k=torch.randn(1, 2, 8, 64, 1)), ValueError, "4-d", id="k-5d"),
    pytest.param(_bad(q=torch.randn(1, 4, 5, 64, dtype=torch.float64)), TypeError, "not supported", id="float64"),
    pytest.param(_bad(k=torch.randn(1, 2, 8, 64).half()), TypeError, "one dtype", id="mixed-dtypes"),
    pytest.param(_bad(q=torch.randn(1, 4, 5, 96), k=torch.randn(1, 2, 8, 96), v=torch.randn(1, 2, 8, 96)),
                 ValueError, "head_dim 96", id="head_dim-96"),
    pytest.param(_bad(v=torch.randn(1, 2, 9, 64)), ValueError, "differ in shape", id="k-v-shapes"),
    pytest.param(_bad(k=torch.randn(2, 2, 8, 64), v=torch.randn(2, 2, 8, 64)), ValueError, "batch", id="batch"),
    pytest.param(_bad(k=torch.randn(1, 3, 8, 64), v=torch.randn(1, 3, 8, 64)), ValueError, "multiple of n_kv_heads",
                 id="gqa-ratio"),
    pytest.param(_bad(start=4), ValueError, r"hold 8 positions < start \+ T", id="too-few-keys"),
    pytest.param(_bad(start=-1), ValueError, "negative", id="negative-start"),
    pytest.param(_bad(start=3.0), TypeError, "start must be an int", id="float-start"),
    pytest.param(_bad(k=torch.randn(1, 2, 8, 64, device="meta")), ValueError, "one device", id="devices"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_inputs_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        attention_prefill(**kwargs)


# ---- ahead of time ---------------------------------------------------------------------------

def test_aot_configs_compile(check_aot):
    """Every CUDA launch (prefill and verify x bf16/fp16 x head_dim 128/64 x MHA 7B / GQA 34B-70B) compiles
    for sm_80 and sm_90 without spills and within shared memory; T and start (and verify's cache length S)
    stay runtime arguments, MHA's group a constexpr. Prefill passes no starts: Starts and S are constexpr
    None there, so its binary is the one it was before verify existed."""
    configs = aot_configs(aot_models())
    assert len(configs) == 16, [c.label for c in configs]
    for cfg in configs:
        verify = cfg.label.startswith("verify ")
        assert cfg.signature["T"] == "i32" and cfg.signature["start"] == "i32", cfg.label
        assert (cfg.signature["group"] == "constexpr") == ("7B" in cfg.label), cfg.label
        assert cfg.constexprs["UPCAST_DOT"] is False and cfg.constexprs["FP32_DOT"] is False, cfg.label
        assert cfg.constexprs["PER_ROW_START"] is verify, cfg.label
        assert {"Q", "K", "V", "Out", "stride_ks", "stride_vs"} <= set(cfg.divisible_by_16), cfg.label
        if verify:
            assert cfg.signature["Starts"] == "*i64" and cfg.signature["S"] == "i32", cfg.label
            assert cfg.constexprs["BLOCK_M"] == 16, cfg.label
        else:
            assert cfg.constexprs["Starts"] is None and cfg.constexprs["S"] is None, cfg.label
    assert sum(c.label.startswith("verify ") for c in configs) == 8
    check_aot(configs)


def test_fp32_cuda_launches_compile(check_aot):
    """The float32 (IEEE dot) path is no model default, but it must not spill either (prefill and verify)."""
    configs = aot_configs(aot_models(), dtypes=(torch.float32,))
    assert len(configs) == 8, [c.label for c in configs]
    check_aot(configs)


def test_aot_configs_type_real_tensors_alike():
    """The meta tensors behind `aot_configs` are typed as real allocations of the same layout would be."""
    by_label = {c.label: c for c in aot_configs(aot_models())}
    for dtype, head_dim, (H, Hkv), verify in itertools.product((torch.bfloat16, torch.float16), (128, 64),
                                                               ((32, 32), (64, 8)), (False, True)):
        if verify:
            tensors = mod._verify_model_tensors(H, Hkv, head_dim, dtype, device="cpu")
            _, (_, args, constexprs, cfg) = mod._prepare_verify(*tensors, on_cuda=True)
        else:
            _, (_, args, constexprs, cfg) = mod._prepare(*mod._model_tensors(H, Hkv, head_dim, dtype, device="cpu"),
                                                         on_cuda=True)
        prefix = f"{'verify ' if verify else ''}{triton_dtype(dtype)} D={head_dim} H={H} Hkv={Hkv} "
        [label] = [x for x in by_label if x.startswith(prefix)]
        real = launch_config(mod._attention_prefill_kernel, args, constexprs, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, label=label)
        aot = by_label[label]
        assert (real.signature, real.constexprs, real.divisible_by_16, real.num_warps, real.num_stages) == \
            (aot.signature, aot.constexprs, aot.divisible_by_16, aot.num_warps, aot.num_stages), label
