"""The cpu backend's prefill GEMMs (kernels/cpu_gemm.py): oneDNN's linear equals F.linear to fp32 rounding
(odd shapes, leading dims, strided x, bf16), decode-sized calls stay F.linear bit for bit, the fused pre-norm
and SwiGLU projections equal their references, and without oneDNN everything is F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codellama_rt.kernels import cpu_gemm
from codellama_rt.kernels.gemv import linear_swiglu_ref, norm_linear_ref

onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@onednn
@pytest.mark.parametrize("lead,M,N,K", [((), 17, 37, 61), ((2,), 40, 96, 128), ((), 512, 2752, 512), ((3,), 9, 8, 5)])
def test_gemm_equals_f_linear_to_fp32_rounding(lead, M, N, K):
    x = torch.randn(*lead, M, K, generator=_g(1))
    w = torch.randn(N, K, generator=_g())
    got = cpu_gemm.gemm(x, w)
    exact = F.linear(x.double(), w.double())
    assert got.shape == (*lead, M, N) and got.dtype == torch.float32
    assert rel_err(got, exact) < 1e-5


@onednn
def test_gemm_takes_strided_rows_and_bf16():
    w = torch.randn(64, 96, generator=_g())
    wide = torch.randn(40, 200, generator=_g(1))
    x = wide[:, 3:99]  # row stride 200: not contiguous
    assert rel_err(cpu_gemm.gemm(x, w), F.linear(x.double(), w.double())) < 1e-5
    xb, wb = x.bfloat16(), w.bfloat16()
    got = cpu_gemm.gemm(xb, wb)
    assert got.dtype == torch.bfloat16 and rel_err(got, F.linear(xb.double(), wb.double())) < 1e-2


def test_padded_rows_are_few_and_close():
    """oneDNN keeps ~1 MB per distinct row count: every prompt length must map onto a few row counts."""
    counts = {cpu_gemm.padded_rows(r) for r in range(cpu_gemm.NATIVE_MAX_ROWS + 1, 513)}
    assert len(counts) == 18 and max(counts) == 512
    assert len({cpu_gemm.padded_rows(r) for r in range(513, 16385)}) == 20
    for r in range(cpu_gemm.NATIVE_MAX_ROWS + 1, 4097):
        p = cpu_gemm.padded_rows(r)
        assert r <= p <= r * 1.25 + 8 and cpu_gemm.padded_rows(p) == p


@onednn
def test_onednn_sees_only_padded_row_counts(monkeypatch):
    """Each call's rows are zero-padded to `padded_rows` for oneDNN and the padding cut off the result."""
    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    class Ops:
        @staticmethod
        def _linear_pointwise(x, *rest):
            seen.append(x.shape[0])
            return real(x, *rest)

    monkeypatch.setattr(cpu_gemm.torch.ops, "mkldnn", Ops)
    w = torch.randn(24, 32, generator=_g())
    for lead, M in (((), 17), ((3,), 21), ((), 100), ((), 512)):
        x = torch.randn(*lead, M, 32, generator=_g(M))
        got = cpu_gemm.gemm(x, w)
        assert got.shape == (*lead, M, 24) and rel_err(got, F.linear(x.double(), w.double())) < 1e-5
    assert seen == [24, 64, 112, 512]


def test_decode_sized_calls_and_no_onednn_are_f_linear(monkeypatch):
    w = torch.randn(48, 64, generator=_g())
    few = torch.randn(cpu_gemm.NATIVE_MAX_ROWS, 64, generator=_g(1))
    assert torch.equal(cpu_gemm.gemm(few, w), F.linear(few, w))
    many = torch.randn(cpu_gemm.NATIVE_MAX_ROWS + 1, 64, generator=_g(2))
    half = many.half(), w.half()  # oneDNN refuses fp16 inner products on most CPUs: F.linear
    assert torch.equal(cpu_gemm.gemm(*half), F.linear(*half))
    monkeypatch.setattr(cpu_gemm, "_onednn", {torch.float32: False})
    assert torch.equal(cpu_gemm.gemm(many, w), F.linear(many, w))


def test_a_dtype_onednn_refuses_here_is_f_linear(monkeypatch):
    """oneDNN refuses bf16 inner products on CPUs without AVX-512 (an AVX2 laptop): bf16 prefill rows go to
    F.linear there, fp32 rows still to oneDNN; each dtype is probed on its own."""
    w = torch.randn(48, 64, generator=_g())
    many = torch.randn(cpu_gemm.NATIVE_MAX_ROWS + 1, 64, generator=_g(2))
    monkeypatch.setattr(cpu_gemm, "_onednn", {torch.bfloat16: False})
    xb, wb = many.bfloat16(), w.bfloat16()
    assert torch.equal(cpu_gemm.gemm(xb, wb), F.linear(xb, wb))
    assert set(cpu_gemm._onednn) == {torch.bfloat16}  # (bf16 decided without probing fp32)
    assert cpu_gemm.onednn_available(torch.float32) == bool(torch.backends.mkldnn.is_available())


@pytest.mark.parametrize("swiglu", [False, True])
def test_norm_linear_and_swiglu_equal_their_references(swiglu):
    x = torch.randn(2, 30, 64, generator=_g(1))
    r = torch.randn(2, 30, 64, generator=_g(2))
    nw = torch.rand(64, generator=_g(3)) + 0.5
    w = torch.randn(96, 64, generator=_g())
    got, h = cpu_gemm.norm_linear_cpu(x, r, nw, 1e-5, w, swiglu)
    want, h_ref = norm_linear_ref(x, r, nw, 1e-5, w, swiglu)
    assert torch.equal(h, h_ref) and rel_err(got, want) < 1e-5
    assert rel_err(cpu_gemm.linear_swiglu_cpu(x, w), linear_swiglu_ref(x, w)) < 1e-5


def test_cpu_backend_prefill_logits_match_the_reference(hf_checkpoint):
    """A whole prefill on the cpu backend (dense projections through `gemm`) against the reference backend."""
    import codellama_rt as cl

    path, _ = hf_checkpoint(n_layers=2, ffn=160, dim=128, n_heads=4, n_kv_heads=2)
    ids = list(range(3, 60))
    a = cl.load(path, backend="cpu", dtype="float32").logits(ids)
    b = cl.load(path, backend="reference", dtype="float32").logits(ids)
    assert rel_err(a, b) < 1e-5
