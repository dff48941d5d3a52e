"""Triton SwiGLU against `swiglu_ref`, run in Triton's interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.kernels import swiglu as mod
from codellama_rt.kernels.swiglu import swiglu, swiglu_ref
from codellama_rt.bench.common import aot_models
from tolerances import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims, F): rows 1/3/17/129; F odd, not a multiple of the block, and over one block (11008)
SHAPES = [((1,), 1), ((3,), 96), ((17,), 130), ((129,), 64), ((2, 3), 1000), ((1, 2), 11008)]


def _w13_out(lead, F, dtype, seed, scale=3.0):
    """gate and up as the model makes them: the two column halves of the fused w13 linear output."""
    g = torch.Generator().manual_seed(seed)
    out = (scale * torch.randn(*lead, 2 * F, generator=g)).to(dtype)
    return out.split([F, F], dim=-1)


def _check(out, gate, up):
    assert not out.isnan().any(), "unwritten output elements (NaN poison survived)"
    assert out.shape == gate.shape and out.dtype == gate.dtype and out.is_contiguous()
    ref = swiglu_ref(gate, up)
    assert_close(out, ref)
    if gate.dtype != torch.float32:  # same rounding steps as the reference: nearly all elements bit-identical
        assert (out == ref).float().mean() >= 0.99, "rounding steps differ from swiglu_ref"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,F", SHAPES, ids=str)
def test_matches_reference_on_w13_slices(nan_empty, lead, F, dtype):
    gate, up = _w13_out(lead, F, dtype, seed=F)
    assert F == 1 or not gate.is_contiguous()
    _check(swiglu(gate, up), gate, up)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_contiguous_inputs_and_extreme_gates(nan_empty, dtype):
    """Separate contiguous tensors; gates far into both tails (exp overflows to inf: silu -> -0, no NaN)."""
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(5, 300, generator=g) * 30).to(dtype)
    gate[0, :4] = torch.tensor([-100.0, 100.0, -1e4, 1e4]).to(dtype)
    up = torch.randn(5, 300, generator=g).to(dtype)
    _check(swiglu(gate, up), gate, up)


def test_empty():
    gate, up = _w13_out((0,), 64, torch.bfloat16, seed=0)
    assert swiglu(gate, up).shape == (0, 64)


@pytest.mark.parametrize("change,match", [
    (lambda g, u: (g.int(), u.int()), "dtype"),
    (lambda g, u: (g.double(), u.double()), "dtype"),
    (lambda g, u: (g, u.half()), "dtype"),
    (lambda g, u: (g, u[:, :-1]), "shape"),
    (lambda g, u: (g[:2], u), "shape"),
    (lambda g, u: (torch.randn(4, 192)[:, ::2], torch.randn(4, 96)), "unit stride"),
    (lambda g, u: (torch.randn(3, 4, 96).transpose(0, 1), torch.randn(4, 3, 96)), "flatten"),
])
def test_bad_inputs_raise(change, match):
    gate, up = change(*_w13_out((4,), 96, torch.float32, seed=0))
    with pytest.raises((TypeError, ValueError), match=match):
        swiglu(gate, up)


def test_aot_configs_compile(check_aot):
    configs = mod.aot_configs(aot_models())
    assert {c.label for c in configs} == {f"F={f} {t}" for f in (11008, 22016, 28672) for t in ("bf16", "fp16")}
    check_aot(configs)
