"""Triton GEMV (batch-1 dense projection) against `gemv_ref`, run in Triton's interpreter on CPU, with
both the interpreter's tile and the tile CUDA uses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codellama_rt.kernels import gemv as mod
from codellama_rt.kernels.gemv import CUDA_LAUNCH, INTERPRETER_LAUNCH, gemv, gemv_ref, linear
from codellama_rt.bench.common import aot_models
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
    configs = mod.aot_configs(aot_models())
    labels = " ".join(c.label for c in configs)
    assert "bf16" in labels and "fp16" in labels and "masked K" in labels  # 7B w2: K = 11008
    check_aot(configs)


# ---- the SwiGLU epilogue (w13 = [gate; up]) ----------------------------------------------------

@pytest.mark.parametrize("cfg", [pytest.param(None, id="default"),
                                 pytest.param(mod.SWIGLU_CUDA_LAUNCH, id="cuda-tile")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("F_,K", [(1, 1), (5, 17), pytest.param(70, 1030, marks=pytest.mark.slow, id="70-1030"),
                                  pytest.param(33, 2048, marks=pytest.mark.slow, id="33-2048")], ids=str)
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


# ---- the RMSNorm prologue (pre-norm projections: wqkv, w13) ---------------------------------------

NORM_LAUNCHES = [pytest.param(None, id="default"), pytest.param("cuda", id="cuda-tile")]


def _norm_inputs(N, K, dtype, seed, residual=True):
    x, w = _inputs(N, K, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    r = (3 * torch.randn(1, K, generator=g)).to(dtype) if residual else None  # the stream dominates x
    nw = (1 + 0.5 * torch.randn(K, generator=g)).to(dtype)
    return x, r, nw, w


def _normed64(x, r, nw, eps):
    """The exact pre-norm operand from the io-dtype residual sum: fp64 rms, weight, no rounding."""
    h = (x if r is None else x + r).double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * nw.double()


@pytest.mark.parametrize("cfg", NORM_LAUNCHES)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "first-layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(5, 17), (40, 1024), (33, 1500), (7, 4096)], ids=str)
def test_norm_prologue_matches_reference(nan_empty, N, K, dtype, residual, cfg):
    """norm_gemv = the rms_norm kernel then gemv, within tolerance, with an error against the exact result
    no worse than the unfused reference's; h is exactly the io-dtype residual sum (x itself without one)."""
    x, r, nw, w = _norm_inputs(N, K, dtype, seed=N + K, residual=residual)
    tile = mod.gemv_launch(True, norm=True) if cfg == "cuda" else None
    y, h = mod.norm_gemv(x, r, nw, 1e-5, w, cfg=tile)
    ref, h_ref = mod.norm_linear_ref(x, r, nw, 1e-5, w)
    assert not y.isnan().any() and y.shape == (1, N) and y.dtype == dtype
    assert torch.equal(h, h_ref) and (h is x) == (r is None)
    assert_close(y, ref)
    assert_error_within_torch(y, ref, F.linear(_normed64(x, r, nw, 1e-5), w.double()), dtype)


@pytest.mark.parametrize("cfg", NORM_LAUNCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("F_,K", [(3, 17), pytest.param(70, 1030, marks=pytest.mark.slow, id="70-1030"), (33, 2048)],
                         ids=str)
def test_norm_prologue_with_swiglu_epilogue(nan_empty, F_, K, dtype, cfg):
    """Both ends fused (w13): an error against the exact result no worse than the reference's (elementwise
    closeness is too strict here: the unrounded operand moves a gate or up by one rounding step now and
    then, and silu(gate) * up magnifies it), and the SwiGLU steps on the kernel's own rounded gate and up
    are those of the unfused epilogue."""
    x, r, nw, w13 = _norm_inputs(2 * F_, K, dtype, seed=F_ * 3 + K)
    w13 = (w13 * 3).to(dtype)
    tile = mod.gemv_launch(True, swiglu=True, norm=True) if cfg == "cuda" else None
    y, h = mod.norm_gemv(x, r, nw, 1e-5, w13, swiglu=True, cfg=tile)
    ref, h_ref = mod.norm_linear_ref(x, r, nw, 1e-5, w13, swiglu=True)
    assert y.shape == (1, F_) and not y.isnan().any() and torch.equal(h, h_ref)
    gate64, up64 = F.linear(_normed64(x, r, nw, 1e-5), w13.double()).chunk(2, dim=-1)
    assert_error_within_torch(y, ref, F.silu(gate64) * up64, dtype)
    gate, up = mod.norm_gemv(x, r, nw, 1e-5, w13, cfg=tile or mod.gemv_launch(False))[0].chunk(2, dim=-1)
    from codellama_rt.kernels.swiglu import swiglu

    assert torch.equal(y, swiglu(gate, up))


def test_norm_linear_dispatch():
    """The backend op on CPU: the rms_norm kernel then F.linear (then the swiglu kernel), experiment on or
    off (the fused kernel is for one row on CUDA); the reference is rms_norm_ref then F.linear."""
    from codellama_rt.kernels.options import KernelOptions
    from codellama_rt.kernels.rms_norm import rms_norm, rms_norm_ref
    from codellama_rt.kernels.swiglu import swiglu

    x, r, nw, w = _norm_inputs(48, 64, torch.float32, seed=5)
    normed, h = rms_norm(x, nw, 1e-5, r)
    for options in (KernelOptions(), KernelOptions(experiments={"norm_gemv"})):
        y, h2 = mod.norm_linear(x, r, nw, 1e-5, w, options=options)
        assert torch.equal(y, F.linear(normed, w)) and torch.equal(h2, h)
        y, _ = mod.norm_linear(x, r, nw, 1e-5, w, swiglu=True, options=options)
        assert torch.equal(y, swiglu(*F.linear(normed, w).chunk(2, dim=-1)))
    normed_ref, h_ref = rms_norm_ref(x, nw, 1e-5, r)
    y_ref, h_ref2 = mod.norm_linear_ref(x, r, nw, 1e-5, w)
    assert torch.equal(y_ref, F.linear(normed_ref, w)) and torch.equal(h_ref2, h_ref)


def test_prefetch_follows_the_options_unless_asked():
    """The kernel's PREFETCH is the experiment "gemv_prefetch" of the launch's options; `prefetch` overrides it."""
    from codellama_rt.kernels.options import KernelOptions

    x, w = _inputs(64, 128, torch.float32, seed=1)
    on = KernelOptions(experiments={"gemv_prefetch"})

    def prefetch(**kw):
        return mod._prepare(x, w, **kw)[2][2]["PREFETCH"]

    assert not prefetch() and prefetch(options=on)
    assert prefetch(prefetch=True) and not prefetch(prefetch=False, options=on)


@pytest.mark.parametrize("change,match", [
    (dict(nw=torch.ones(63)), r"norm weight must be a contiguous \[64\]"),
    (dict(nw=torch.ones(64).double()), "norm weight"),
    (dict(r=torch.ones(1, 63)), "residual must match x"),
    (dict(r=torch.ones(1, 64).half()), "residual must match x"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=float("nan")), "eps must be > 0"),
])
def test_norm_prologue_bad_input_names_the_problem(change, match):
    x, r, nw, w = _norm_inputs(8, 64, torch.float32, seed=2)
    args = dict(x=x, r=r, nw=nw, eps=1e-5) | change
    with pytest.raises(ValueError, match=match):
        mod.norm_gemv(args["x"], args["r"], args["nw"], args["eps"], w)
    with pytest.raises(ValueError, match="empty row"):
        mod.norm_gemv(torch.empty(1, 0), None, torch.empty(0), 1e-5, torch.empty(4, 0))
