"""Triton RMSNorm (+ fused residual add) against `rms_norm_ref`, run in Triton's interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.kernels import rms_norm as mod
from codellama_rt.kernels.rms_norm import rms_norm, rms_norm_ref
from codellama_rt.bench.common import aot_models
from tolerances import assert_close, assert_error_within_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims, hidden): rows 1/3/17/129, hidden odd and not a power of two, up to the 16384 limit
SHAPES = [((1,), 64), ((3,), 96), ((17,), 130), ((129,), 64), ((2, 3), 4096), ((1, 2), 8192), ((1,), 16384)]


def _inputs(lead, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, dim, generator=g).to(dtype)
    r = (3 * torch.randn(*lead, dim, generator=g)).to(dtype)
    w = (1 + 0.2 * torch.randn(dim, generator=g)).to(dtype)
    return x, r, w


def _check(y, h, x, w, eps, r, dtype):
    assert not y.isnan().any() and not h.isnan().any(), "unwritten output elements (NaN poison survived)"
    y_ref, h_ref = rms_norm_ref(x, w, eps, r)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(h, h_ref)
    assert_close(y, y_ref)
    if dtype != torch.float32:  # same rounding steps as the reference: nearly all elements bit-identical
        assert (y == y_ref).float().mean() >= 0.99, "y's rounding steps differ from rms_norm_ref"
    y64, _ = rms_norm_ref(x.double(), w.double(), eps, None if r is None else r.double())
    assert_error_within_torch(y, y_ref, y64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,dim", SHAPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_matches_reference(nan_empty, lead, dim, dtype, with_residual):
    x, r, w = _inputs(lead, dim, dtype, seed=dim + len(lead))
    r = r if with_residual else None
    y, h = rms_norm(x, w, 1e-5, r)
    if r is None:
        assert h is x
    else:
        assert h.is_contiguous() and h.dtype == dtype
    _check(y, h, x, w, 1e-5, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_strided_inputs_and_zero_rows(nan_empty, dtype):
    """x and residual as column slices of wider buffers (different row strides, no copy); a zero row
    normalises to zeros (rstd = 1/sqrt(eps)), not NaN; a large eps is honoured."""
    g = torch.Generator().manual_seed(1)
    xbuf = torch.randn(2, 5, 160, generator=g).to(dtype)
    rbuf = torch.randn(2, 5, 200, generator=g).to(dtype)
    x, r = xbuf[..., 10:140], rbuf[..., :130]
    x[1, 2] = 0
    r[1, 2] = 0
    w = torch.randn(130, generator=g).to(dtype)
    for eps in (1e-5, 0.5):
        y, h = rms_norm(x, w, eps, r)
        _check(y, h, x, w, eps, r, dtype)
        assert (y[1, 2] == 0).all()


def test_empty_rows():
    x = torch.empty(0, 64, dtype=torch.bfloat16)
    y, h = rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5, torch.empty_like(x))
    assert y.shape == h.shape == (0, 64)


@pytest.mark.parametrize("make,match", [
    (lambda x, w, r: (x.int(), w, r), "dtype"),
    (lambda x, w, r: (x.double(), w.double(), r.double()), "dtype"),
    (lambda x, w, r: (x, w.half(), r), "weight"),
    (lambda x, w, r: (x, w[:-1], r), "weight"),
    (lambda x, w, r: (x, w, r[:, :-1]), "residual"),
    (lambda x, w, r: (x, w, r.half()), "residual"),
    (lambda x, w, r: (x.t(), w[:3], r.t()), "unit stride"),
    (lambda x, w, r: (torch.zeros(2, 16385), torch.ones(16385), None), "16384"),
])
def test_bad_inputs_raise(make, match):
    x, w, r = torch.randn(3, 96), torch.ones(96), torch.randn(3, 96)
    x, w, r = make(x, w, r)
    with pytest.raises((TypeError, ValueError), match=match):
        rms_norm(x, w, 1e-5, r)


def test_aot_configs_compile(check_aot):
    configs = mod.aot_configs(aot_models())
    assert {c.label for c in configs} == {f"dim={d} {t}{s}" for d in (4096, 8192) for t in ("bf16", "fp16")
                                          for s in ("", " +residual")}
    check_aot(configs)
