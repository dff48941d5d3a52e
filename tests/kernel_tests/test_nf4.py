"""NF4 weights: quantize/dequantize against bitsandbytes (bit for bit, where it is installed) and on their
own (error bounds, exact codebook round trip, a hand-made example); the Triton dequant-matmul against
`nf4_linear_ref` in Triton's interpreter on CPU with the GPU's tiles; its CUDA launches compiled ahead of
time for sm_80 / sm_90."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.kernels import nf4 as mod
from codellama_rt.kernels import nf4_format
from codellama_rt.kernels.nf4 import (NF4_CODE, NF4Weight, dequantize_nf4, dynamic_map, nf4_linear,
                                      nf4_linear_ref, quantize_nf4)
from codellama_rt.bench.common import aot_models
from tolerances import assert_close, assert_error_within_torch

# Triton's interpreter turns 1-element arrays into loop bounds with int(); NumPy deprecates that.

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(out, inn, dtype, seed, kind="normal"):
    """Random weights with per-row scales over three decades (absmax spread for the nested level);
    kind "zeros" also zeroes a third of the rows (all-zero blocks)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 10 ** (torch.rand(out, 1, generator=g) * 3 - 3)
    if kind == "zeros":
        w[: out // 3] = 0
    return w.to(dtype)


def _bnb():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_f

    return bnb_f


def _assert_same_as_bnb(mine: NF4Weight, packed: torch.Tensor, state, double_quant: bool):
    assert torch.equal(mine.codes, packed.reshape(-1)), "packed codes differ from bitsandbytes"
    assert mine.shape == tuple(state.shape) and mine.dtype == state.dtype and mine.blocksize == state.blocksize
    assert torch.equal(mine.code, state.code)
    assert torch.equal(mine.absmax, state.absmax), "absmax (or its nested 8-bit codes) differ from bitsandbytes"
    if double_quant:
        assert mine.nested_offset == state.offset.item()
        assert torch.equal(mine.nested_absmax, state.state2.absmax)
        assert torch.equal(mine.nested_code, state.state2.code)
        assert mine.nested_blocksize == state.state2.blocksize
    else:
        assert mine.nested_absmax is None and mine.nested_code is None


# ---- (a) against bitsandbytes ------------------------------------------------------------------

def test_codebooks_are_bitsandbytes():
    bnb_f = _bnb()
    assert torch.equal(NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb_f.create_dynamic_map(signed=True))


# numel: whole blocks / a partial last block / odd; n_blocks a multiple of 256 or not
SHAPES = [(64, 128), (24, 320), (7, 33), (300, 200), (2, 8192 + 64)]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_bitsandbytes(shape, dtype, double_quant):
    bnb_f = _bnb()
    w = _weight(*shape, dtype, seed=sum(shape), kind="zeros" if shape[0] > 20 else "normal")
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    _assert_same_as_bnb(quantize_nf4(w, double_quant=double_quant), packed, state, double_quant)


def test_quantize_matches_bitsandbytes_on_many_random_weights():
    """200 random shapes (in any size, numel rarely a multiple of 64 * 256), dtypes and scales."""
    bnb_f = _bnb()
    g = torch.Generator().manual_seed(0)
    for i in range(200):
        out, inn = (int(v) for v in torch.randint(1, 200, (2,), generator=g))
        if i % 3 == 0:
            inn = 64 * int(torch.randint(1, 8, (), generator=g))
        w = _weight(out, inn, DTYPES[i % 3], seed=i, kind="zeros" if i % 5 == 0 else "normal")
        dq = i % 2 == 0
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        _assert_same_as_bnb(quantize_nf4(w, double_quant=dq), packed, state, dq)


def test_rounding_at_midpoints_matches_bitsandbytes():
    """Values exactly on (and one fp32 ulp either side of) the midpoints between codes, for both levels:
    NF4 takes the lower code at a midpoint; the 8-bit level maps values to a 65536-point grid first."""
    bnb_f = _bnb()
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    w = torch.cat([torch.tensor([1.0]), near, torch.zeros(64 - 1 - near.numel() % 64)])  # block absmax 1
    w = torch.cat([w, torch.zeros(-w.numel() % 64)]).view(-1, 64)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(quantize_nf4(w, double_quant=False).codes, packed.reshape(-1))

    code = dynamic_map()
    mids8 = (code[:-1] + code[1:]) / 2
    values = torch.cat([mids8, torch.nextafter(mids8, torch.tensor(2.0)), torch.nextafter(mids8, torch.tensor(-2.0)),
                        code, torch.randn(3000)])
    for chunk in values.split(255):
        v = torch.cat([torch.tensor([1.0]), chunk])  # absmax 1: normed value == value
        q, st = bnb_f.quantize_blockwise(v, blocksize=256)
        idx, absmax = mod._quantize_blockwise_8bit(v, code, 256)
        assert torch.equal(idx, q) and torch.equal(absmax, st.absmax)


# bitsandbytes' CPU dequantize_4bit indexes absmax per row when in % 16 == 0 (wrong unless in % 64 == 0:
# it disagrees with its own quantize then), and runs a torch.compile'd fallback for odd in; these shapes
# avoid both.
DEQUANT_SHAPES = [(64, 128), (24, 320), (10, 200), (300, 200), (2, 8192 + 64)]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DEQUANT_SHAPES, ids=str)
def test_dequantize_matches_bitsandbytes(shape, dtype, double_quant):
    bnb_f = _bnb()
    w = _weight(*shape, dtype, seed=sum(shape) + 1, kind="zeros")
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = dequantize_nf4(quantize_nf4(w, double_quant=double_quant))
    theirs = bnb_f.dequantize_4bit(packed, state)
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours, theirs)


# ---- (b) on their own --------------------------------------------------------------------------

def _max_gap(code: torch.Tensor) -> float:
    return (code[1:] - code[:-1]).max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(40, 192), (7, 33), (300, 200)], ids=str)
def test_roundtrip_error_bound(shape, dtype):
    """Each value lands within half the largest NF4 gap times its block's absmax (plus the rounding to the
    dtype); double quant moves each block's absmax by at most half the largest dynamic-map gap (plus the
    grid step of bitsandbytes' 8-bit quantizer) times its nested absmax, and the values with it."""
    w = _weight(*shape, dtype, seed=3, kind="zeros")
    flat = w.float().reshape(-1)
    ulp = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]

    q = quantize_nf4(w, double_quant=False)
    per_value = q.absmax.repeat_interleave(64)[: flat.numel()]
    err = (dequantize_nf4(q).float().reshape(-1) - flat).abs()
    bound = _max_gap(NF4_CODE) / 2 * per_value + ulp * flat.abs() + 1e-30
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"

    dq = quantize_nf4(w, double_quant=True)
    assert torch.equal(dq.codes, q.codes)
    absmax_err = (dq.block_absmax() - q.absmax).abs()
    nested = dq.nested_absmax.repeat_interleave(256)[: q.absmax.numel()]
    assert (absmax_err <= (_max_gap(dq.nested_code) / 2 + 2 / 65535) * nested * (1 + 1e-6) + 1e-30).all()
    err_dq = (dequantize_nf4(dq).float().reshape(-1) - flat).abs()
    bound_dq = bound + absmax_err.repeat_interleave(64)[: flat.numel()] * (1 + 1e-6)
    assert (err_dq <= bound_dq + ulp * bound_dq).all()


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_codebook_values_roundtrip_exactly(dtype, double_quant):
    """Blocks holding every codebook value times a power of two come back unchanged (with double quant the
    absmax are all equal, so the nested level sees all-zero blocks and restores them exactly too)."""
    w = (NF4_CODE.repeat(4 * 12) * 2.0 ** -5).view(12, 64).to(dtype)
    q = quantize_nf4(w, double_quant=double_quant)
    nibbles = torch.stack([q.codes >> 4, q.codes & 15], 1).reshape(-1)
    assert torch.equal(nibbles, torch.arange(16, dtype=torch.uint8).repeat(48))
    assert torch.equal(dequantize_nf4(q), w)


@pytest.mark.parametrize("shape, blocksize", [((37, 64), 64), ((5, 77), 64), ((3, 33), 32)])
def test_large_weights_quantize_in_chunks_to_the_same_codes(monkeypatch, shape, blocksize):
    """quantize_nf4 takes whole blocks QUANTIZE_CHUNK values at a time (its temporaries bounded): the same codes
    and absmax as in one go, partial last blocks and odd element counts included."""
    w = torch.randn(shape) * torch.linspace(0.01, 4, shape[0])[:, None]
    whole = quantize_nf4(w, blocksize=blocksize)
    monkeypatch.setattr(nf4_format, "QUANTIZE_CHUNK", 3 * blocksize)
    chunked = quantize_nf4(w, blocksize=blocksize)
    for field in ("codes", "absmax", "nested_absmax"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field)), field
    assert chunked.nested_offset == whole.nested_offset


def test_hand_made_example():
    """Known codes: a block with absmax 2 and values on, above and below code midpoints; an all-zero block;
    an odd element count (the final low nibble is 7, the code of 0)."""
    row = torch.zeros(64)
    row[:6] = torch.tensor([2.0, -2.0, 0.0, 2 * 0.0398, 2 * 0.0397, 1.0])  # midpoint 0.0398 between codes 7, 8
    w = torch.stack([row, torch.zeros(64)])
    q = quantize_nf4(w, double_quant=False)
    assert q.codes[:3].tolist() == [0xF0, 0x78, 0x7C] and (q.codes[3:] == 0x77).all()
    assert q.absmax.tolist() == [2.0, 0.0]
    expected = torch.zeros(2, 64)
    expected[0, :6] = 2 * NF4_CODE[[15, 0, 7, 8, 7, 12]]
    assert torch.equal(dequantize_nf4(q), expected)

    odd = quantize_nf4(torch.tensor([[0.5, -1.0, 0.25]]), double_quant=False)
    assert odd.codes.tolist() == [(12 << 4) | 0, (10 << 4) | 7]  # 0.5 -> 0.4407, -1 -> -1, 0.25 -> 0.2461
    assert odd.absmax.tolist() == [1.0]
    assert torch.equal(dequantize_nf4(odd), NF4_CODE[[12, 0, 10]].view(1, 3))


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-d"):
        quantize_nf4(torch.randn(64))
    with pytest.raises(ValueError, match="2-d"):
        quantize_nf4(torch.randn(0, 64))
    with pytest.raises(TypeError, match="dtype"):
        quantize_nf4(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(2, 64), blocksize=48)
    with pytest.raises(ValueError, match="nested_blocksize"):
        quantize_nf4(torch.randn(2, 64), nested_blocksize=0)


# ---- (c) the Triton dequant-matmul (interpreter) -----------------------------------------------

def _check_linear(x, w):
    """nf4_linear against the reference. Every case: its error against the exact product of the NF4 values
    (fp64) at most 2x PyTorch's own error in x's dtype (the suite's rule for 4-bit matmul). Where the kernel
    computes what the reference computes (float32; the GEMM, which rounds the weights to x's dtype as
    dequantize_nf4 does) also elementwise within TOL, and in 16-bit nearly all elements bit-identical.
    (The GEMV keeps the fp32 weights, so in 16-bit it is closer to the exact product than the reference.)"""
    y = nf4_linear(x, w)
    assert not y.isnan().any(), "unwritten output elements (NaN poison survived)"
    ref = nf4_linear_ref(x, w)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_contiguous()
    exact = x.double() @ dequantize_nf4(w, torch.float32).double().T
    assert_error_within_torch(y, ref, exact, x.dtype)
    kind = mod.nf4_launch(x.numel() // x.shape[-1], x.dtype).kind
    if x.dtype == torch.float32 or kind == "gemm":
        assert_close(y, ref)
    if x.dtype != torch.float32 and kind == "gemm":  # same rounded weights, fp32 sums: only the order differs
        assert (y == ref).float().mean() >= 0.99
    return y


# in / out: awkward but whole blocks; rows 1/3 (GEMV), 16 (one 16-row GEMM tile), 17/40 (64-row tiles)
LINEAR_SHAPES = [(8, 128), (24, 192), (100, 320)]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out,inn", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])
def test_nf4_linear_matches_reference(nan_empty, m, out, inn, dtype, double_quant):
    w = quantize_nf4(_weight(out, inn, dtype, seed=out + inn), double_quant=double_quant)
    _check_linear(torch.randn(m, inn, generator=torch.Generator().manual_seed(m)).to(dtype), w)


@pytest.mark.parametrize("gemv_max_m", [0, 16], ids=["all-gemm", "all-gemv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 16])
def test_both_kernels_at_decode_sizes(nan_empty, monkeypatch, m, dtype, gemv_max_m):
    """The GEMV/GEMM switch is a performance knob: both kernels are right at every decode size."""
    monkeypatch.setattr(mod, "GEMV_MAX_M", gemv_max_m)
    assert mod.nf4_launch(m, dtype).kind == ("gemm" if gemv_max_m == 0 else "gemv")
    w = quantize_nf4(_weight(100, 192, dtype, seed=m))
    _check_linear(torch.randn(m, 192, generator=torch.Generator().manual_seed(5)).to(dtype), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [100, 130])
def test_prefill_tiles(nan_empty, m, dtype):
    """128- and 256-row tiles (M > 64), out features over two column tiles."""
    w = quantize_nf4(_weight(100, 128, dtype, seed=m))
    _check_linear(torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).to(dtype), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 40])
def test_strided_and_batched_x(nan_empty, m, dtype):
    """x as a column slice of a wider buffer (row stride 321: odd, so the GEMV's pair view needs a copy)
    and with two leading dims."""
    w = quantize_nf4(_weight(24, 256, dtype, seed=1))
    buf = torch.randn(m, 321, generator=torch.Generator().manual_seed(2)).to(dtype)
    _check_linear(buf[:, 64:320], w)
    x3 = torch.randn(2, m, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert _check_linear(x3, w).shape == (2, m, 24)


def test_empty_rows():
    w = quantize_nf4(torch.randn(8, 64).to(torch.bfloat16))
    assert nf4_linear(torch.empty(0, 64, dtype=torch.bfloat16), w).shape == (0, 8)


def test_nf4_linear_rejects_bad_input():
    w = quantize_nf4(torch.randn(8, 128).to(torch.bfloat16))
    x = torch.randn(2, 128).to(torch.bfloat16)
    with pytest.raises(TypeError, match="differs"):
        nf4_linear(x.float(), w)
    with pytest.raises(TypeError, match="not supported"):
        nf4_linear(x.double(), w)
    with pytest.raises(ValueError, match=r"\[\.\.\., 128\]"):
        nf4_linear(x[:, :64], w)
    with pytest.raises(ValueError, match="unit stride"):
        nf4_linear(torch.randn(128, 2).to(torch.bfloat16).t(), w)
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4_linear(torch.randn(2, 96).to(torch.bfloat16), quantize_nf4(torch.randn(8, 96).to(torch.bfloat16)))
    with pytest.raises(ValueError, match="blocksize"):
        nf4_linear(x, quantize_nf4(torch.randn(8, 128).to(torch.bfloat16), blocksize=128))
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_linear(x, torch.randn(8, 128))
    broken = quantize_nf4(torch.randn(8, 128).to(torch.bfloat16))
    broken.absmax = broken.absmax[:-1]
    with pytest.raises(ValueError, match="absmax"):
        nf4_linear(x, broken)


# ---- (d) ahead of time -------------------------------------------------------------------------

def test_aot_configs_compile(check_aot):
    configs = mod.aot_configs(aot_models())
    labels = {c.label for c in configs}
    assert len(labels) == len(configs) == len(mod.AOT_ROWS) * 2 * 2  # every layer shape shares its binary
    assert {"gemv M=1 bf16 dq 1x64", "gemv M=2 fp16 fp32-absmax 2x64", "gemm M=8 bf16 dq 16x64",
            "gemm M=512 fp16 dq 256x64"} <= labels
    check_aot(configs)
