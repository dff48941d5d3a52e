"""Triton GEMV (batch-1 dense projection) against `gemv_ref`, run in Triton's interpreter on CPU, with
both the interpreter's tile and the tile CUDA uses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codellama_rt.kernels import gemv as mod
from codellama_rt.kernels.gemv import CUDA_LAUNCH, INTERPRETER_LAUNCH, gemv, gemv_ref, linear
from tolerances import assert_close, assert_error_within_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K): N below, at and off the row block; K below one K tile, not a multiple of it, and several tiles
SHAPES = [(1, 1), (3, 17), (40, 1024), (33, 1500), (130, 2053), (7, 4096)]
LAUNCHES = [pytest.param(None, id="default"), pytest.param(CUDA_LAUNCH, id="cuda-tile")]


def _inputs(N, K, dtype, seed, lead=(1,)):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    return x, w


def _check(y, x, w):
    assert not y.isnan().any(), "unwritten output elements (NaN poison survived)"
    ref = gemv_ref(x, w)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_contiguous()
    assert_close(y, ref)
    y64 = F.linear(x.double(), w.double())
    assert_error_within_torch(y, ref, y64, x.dtype)


@pytest.mark.parametrize("cfg", LAUNCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", SHAPES, ids=str)
def test_matches_reference(nan_empty, N, K, dtype, cfg):
    x, w = _inputs(N, K, dtype, seed=N * 7 + K)
    _check(gemv(x, w, cfg), x, w)


@pytest.mark.parametrize("lead", [(), (1, 1), (1, 1, 1)], ids=str)
def test_leading_dims(nan_empty, lead):
    x, w = _inputs(50, 300, torch.bfloat16, seed=1, lead=lead)
    y = gemv(x, w)
    assert y.shape == (*lead, 50)
    _check(y, x, w)


def test_strided_weight_rows_and_x(nan_empty):
    """A weight whose rows are a slice of wider rows (row stride > K) and an x that is a column slice."""
    big_w = torch.randn(64, 700).to(torch.bfloat16)
    big_x = torch.randn(1, 900).to(torch.bfloat16)
    w, x = big_w[:, 100:612], big_x[:, 3:515]
    assert w.stride() == (700, 1) and x.data_ptr() != big_x.data_ptr()
    _check(gemv(x, w, CUDA_LAUNCH), x, w)
    _check(gemv(x, w), x, w)


def test_large_values_accumulate_in_fp32(nan_empty):
    """bf16 inputs whose products sum far past bf16's exact-integer range: fp32 partial sums keep them."""
    K = 4096
    w = torch.full((4, K), 3.0, dtype=torch.bfloat16)
    x = torch.full((1, K), 5.0, dtype=torch.bfloat16)
    y = gemv(x, w, CUDA_LAUNCH)
    assert torch.equal(y, torch.full((1, 4), 15.0 * K, dtype=torch.bfloat16))


def test_empty():
    x, w = _inputs(0, 32, torch.float32, seed=0)
    assert gemv(x, w).shape == (1, 0)
    x, w = torch.empty(1, 0), torch.empty(5, 0)
    assert torch.equal(gemv(x, w), torch.zeros(1, 5))


def test_linear_dispatch_on_cpu_is_f_linear():
    """On CPU the backend's linear is exactly F.linear, one row or many (the interpreter is too slow for
    the model tests; the kernel is checked above). On CUDA one row takes the kernel (tests/test_gpu_kernels.py)."""
    x1, w = _inputs(24, 96, torch.float32, seed=3)
    assert torch.equal(linear(x1, w), F.linear(x1, w))
    x4 = torch.randn(4, 96)
    assert torch.equal(linear(x4, w), F.linear(x4, w))
    x3 = torch.randn(2, 3, 96)
    assert torch.equal(linear(x3, w), F.linear(x3, w))
    wt = torch.randn(96, 24).t()  # [24, 96] with stride 1 along N, not K
    assert torch.equal(linear(x1, wt), F.linear(x1, wt))


@pytest.mark.parametrize("x,w,err,match", [
    (torch.randn(1, 8), torch.randn(4, 8).double(), TypeError, "dtype"),
    (torch.randn(1, 8).int(), torch.randn(4, 8).int(), TypeError, "dtype"),
    (torch.randn(1, 9), torch.randn(4, 8), ValueError, r"\[\.\.\., 8\]"),
    (torch.randn(2, 8), torch.randn(4, 8), ValueError, "one row"),
    (torch.randn(1, 8), torch.randn(8), ValueError, "2-d"),
    (torch.randn(1, 8), torch.randn(8, 4).t(), ValueError, "unit stride along K"),
    (torch.randn(1, 8), torch.empty(4, 8, device="meta"), ValueError, "meta"),
], ids=["w-dtype", "int", "K", "two-rows", "w-1d", "w-stride", "device"])
def test_bad_input_names_the_problem(x, w, err, match):
    with pytest.raises(err, match=match):
        gemv(x, w)


def test_launch_choice():
    assert mod.gemv_launch(on_cuda=True) == CUDA_LAUNCH
    assert mod.gemv_launch(on_cuda=False) == INTERPRETER_LAUNCH


def test_aot_configs_compile(check_aot):
    configs = mod.aot_configs()
    labels = " ".join(c.label for c in configs)
    assert "bf16" in labels and "fp16" in labels and "masked K" in labels  # 7B w2: K = 11008
    check_aot(configs)


# ---- the SwiGLU epilogue (w13 = [gate; up]) ----------------------------------------------------

@pytest.mark.parametrize("cfg", [pytest.param(None, id="default"), pytest.param(mod.SWIGLU_CUDA_LAUNCH, id="cuda-tile")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("F_,K", [(1, 1), (5, 17), (70, 1030), (33, 2048)], ids=str)
def test_swiglu_epilogue_equals_the_unfused_kernels(nan_empty, F_, K, dtype, cfg):
    """One kernel computes exactly what gemv followed by the swiglu kernel computes (same tile), and is
    within tolerance of the reference."""
    from codellama_rt.kernels.swiglu import swiglu

    x, w13 = _inputs(2 * F_, K, dtype, seed=F_ + K)
    w13 = (w13 * 3).to(dtype)  # gates well into both tails of silu
    fused = mod.gemv_swiglu(x, w13, cfg)
    assert fused.shape == (1, F_) and fused.dtype == dtype and not fused.isnan().any()
    tile = cfg or mod.gemv_launch(on_cuda=False)
    gate, up = gemv(x, w13, tile).chunk(2, dim=-1)
    assert torch.equal(fused, swiglu(gate, up))
    assert_close(fused, mod.linear_swiglu_ref(x, w13))


def test_swiglu_dispatch_on_cpu_and_bad_input():
    from codellama_rt.kernels.swiglu import swiglu

    x, w13 = _inputs(48, 64, torch.float32, seed=9)
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    assert torch.equal(mod.linear_swiglu(x, w13), swiglu(gate, up))  # CPU: F.linear, then the swiglu kernel
    x4 = torch.randn(4, 64)
    assert torch.equal(mod.linear_swiglu(x4, w13), swiglu(*F.linear(x4, w13).chunk(2, dim=-1)))
    with pytest.raises(ValueError, match="odd row count 47"):
        mod.gemv_swiglu(x, w13[:47])
    assert torch.equal(mod.gemv_swiglu(torch.empty(1, 0), torch.empty(6, 0)), torch.zeros(1, 3))
