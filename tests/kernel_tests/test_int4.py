"""int4 (GPTQ layout): the quantizer's error bound and exact grids, the packing against an unpacker
written here, GPTQ v1/v2 zero conventions and act-order refusal, and the Triton dequant-matmul (GEMV
for M <= 16, GEMM above, run in Triton's interpreter) against `int4_linear_ref`."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from codellama_rt.kernels import int4 as mod
from codellama_rt.kernels._triton import launch_config
from codellama_rt.kernels.int4 import (Int4Weight, dequantize_int4, int4_launch, int4_linear, int4_linear_ref,
                                       quantize_int4, unpack_gptq)
from codellama_rt.kernels.options import KernelOptions
from codellama_rt.bench.common import aot_models
from tolerances import assert_close, assert_error_within_torch

# the interpreter turns scalar loop bounds into 1-element arrays and int()s them (numpy deprecation)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- an independent reading of GPTQ's layout (bit operations restated with numpy uint32) ----------

def _nibbles(packed: torch.Tensor, axis: int) -> np.ndarray:
    """int32 array -> its 4-bit values, 8 per int32 along `axis`, lowest nibble first."""
    u = packed.numpy().view(np.uint32)
    planes = [(u >> np.uint32(4 * j)) & np.uint32(0xF) for j in range(8)]
    stacked = np.stack(planes, axis=axis + 1)  # [.., n, 8, ..]: element 8r + j is nibble j of int32 r
    shape = list(u.shape)
    shape[axis] *= 8
    return stacked.reshape(shape).astype(np.int64)


def _dequant_independent(qweight, qzeros, scales, group_size, zero_offset=0):
    """w [out, in] = scale * (q - (zero nibble + zero_offset)), in fp64, straight from the packed tensors."""
    q = _nibbles(qweight, axis=0)                        # [in, out]
    z = _nibbles(qzeros, axis=1) + zero_offset           # [in // g, out]
    s = scales.double().numpy()                          # [in // g, out]
    g = np.arange(q.shape[0]) // group_size
    return torch.from_numpy((s[g] * (q - z[g])).T.copy())


def _weight(out_f, in_f, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)


# ---- quantize / dequantize ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_error_at_most_half_a_step(dtype, group_size):
    """|dequant - w| <= scale / 2 everywhere, including awkward groups: all positive, all negative,
    constant, all zero, one outlier; fields have GPTQ's shapes and dtypes."""
    out_f, in_f = 24, 4 * group_size
    w = _weight(out_f, in_f, seed=group_size, dtype=torch.float32)
    w[0, :group_size] = w[0, :group_size].abs() + 0.5      # all positive
    w[1, :group_size] = -w[1, :group_size].abs() - 0.5     # all negative
    w[2, :group_size] = 0.3                                # constant
    w[3, :group_size] = 0.0                                # all zero
    w[4, 5] = 40.0                                         # outlier
    w = w.to(dtype)
    q = quantize_int4(w, group_size=group_size)
    groups = in_f // group_size
    assert q.shape == (out_f, in_f) and q.group_size == group_size and q.dtype == dtype
    assert q.qweight.shape == (in_f // 8, out_f) and q.qweight.dtype == torch.int32
    assert q.qzeros.shape == (groups, out_f // 8) and q.qzeros.dtype == torch.int32
    assert q.scales.shape == (groups, out_f) and q.scales.dtype == dtype
    step = q.scales.float().t().repeat_interleave(group_size, 1)  # [out, in]
    err = (dequantize_int4(q, torch.float32) - w.float()).abs()
    assert (err <= step / 2 * (1 + 1e-6) + 1e-30).all(), f"max err/step {(err / step).max().item():.4f}"
    assert (dequantize_int4(q, torch.float32)[3, :group_size] == 0).all()
    # the stored scale never under-covers the group's range (it is rounded up to the dtype)
    wg = w.double().reshape(out_f, groups, group_size)
    span = wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)
    assert (q.scales.double().t() * 15 >= span).all()
    assert dequantize_int4(q).dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_already_quantized_grid_roundtrips_exactly(dtype, group_size):
    """w = (q - z) * s with q spanning 0..15 in every group and s with 4 significant bits (so every grid
    value is exact in bf16): quantize recovers q, z and s, and dequantize gives w back bit for bit."""
    out_f, in_f = 16, 2 * group_size
    groups = in_f // group_size
    gen = torch.Generator().manual_seed(7 + group_size)
    q = torch.randint(0, 16, (out_f, in_f), generator=gen)
    q[:, ::group_size] = 0
    q[:, 1::group_size] = 15
    z = torch.randint(0, 16, (out_f, groups), generator=gen)
    mant = torch.randint(8, 16, (out_f, groups), generator=gen).double()
    expo = torch.randint(-12, -4, (out_f, groups), generator=gen).double()
    s = mant * 2.0 ** expo
    w64 = (q - z.repeat_interleave(group_size, 1)) * s.repeat_interleave(group_size, 1)
    w = w64.to(dtype)
    assert torch.equal(w.double(), w64)
    wq = quantize_int4(w, group_size=group_size)
    assert torch.equal(wq.scales.double(), s.t())
    q_got, z_got = wq.unpack()
    assert torch.equal(q_got.long(), q) and torch.equal(z_got.long(), z.t())
    assert torch.equal(dequantize_int4(wq), w)


@pytest.mark.parametrize("group_size,match", [(16, "group_size"), (256, "group_size"), (100, "group_size"),
                                              (64, "group_size=64 does not divide")])
def test_bad_group_size_raises(group_size, match):
    with pytest.raises(ValueError, match=match):
        quantize_int4(torch.randn(16, 96), group_size=group_size)


@pytest.mark.parametrize("out_f", [12, 4, 0])
def test_out_not_multiple_of_8_raises(out_f):
    with pytest.raises(ValueError, match="out_features"):
        quantize_int4(torch.randn(out_f, 128), group_size=32)


def test_quantize_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        quantize_int4(torch.randn(2, 8, 128))
    with pytest.raises(TypeError, match="dtype"):
        quantize_int4(torch.randn(8, 128).double())
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int4(torch.full((8, 128), float("inf")))


def test_scales_in_another_dtype_and_to():
    w = _weight(16, 128, seed=3)
    q = quantize_int4(w, group_size=64, dtype=torch.bfloat16)
    assert q.scales.dtype == torch.bfloat16 and q.dtype == torch.bfloat16
    q16 = q.to(dtype=torch.float32)
    assert q16.scales.dtype == torch.float32 and q16.qweight is not None
    assert torch.equal(dequantize_int4(q16), dequantize_int4(q, torch.float32))


# ---- packing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [32, 128])
def test_packing_matches_independent_unpack(group_size):
    """The packed ints read with the bit operations restated here give quantize's own q and zero
    (recomputed from the documented formula) and the same dequantized weight."""
    out_f, in_f = 24, 256
    w = _weight(out_f, in_f, seed=11)
    wq = quantize_int4(w, group_size=group_size)
    s = wq.scales.double()                                        # [groups, out]
    wg = w.double().reshape(out_f, in_f // group_size, group_size)
    lo = wg.amin(-1).clamp(max=0).t()                             # [groups, out]
    z_expect = torch.round(-lo / s).clamp(0, 15)
    q_expect = (torch.round(w.double().t() / s.repeat_interleave(group_size, 0))
                + z_expect.repeat_interleave(group_size, 0)).clamp(0, 15)  # [in, out]
    assert np.array_equal(_nibbles(wq.qzeros, axis=1), z_expect.numpy())
    assert np.array_equal(_nibbles(wq.qweight, axis=0), q_expect.numpy())
    # (q - z) * s is exact in fp64, so rounding it to fp32 once is what fp32 dequantization must give
    assert torch.equal(_dequant_independent(wq.qweight, wq.qzeros, wq.scales, group_size).float(),
                       dequantize_int4(wq, torch.float32))


def test_packing_literal_values():
    """q = 0..7 down the first eight input columns of output 0 packs to 0x76543210; a top nibble of 15
    makes the int32 negative (0xF0000000); zeros pack along the output dim the same way."""
    q = torch.zeros(8, 8, dtype=torch.long)           # [out, in]
    q[0] = torch.arange(8)
    q[1, 7] = 15
    z = torch.arange(8)[None, :]                      # [1 group, out]
    w = Int4Weight(qweight=mod._pack_nibbles(q.t(), dim=0), qzeros=mod._pack_nibbles(z, dim=1),
                   scales=torch.ones(1, 8), shape=(8, 8), group_size=8)
    assert w.qweight[0, 0].item() == 0x76543210
    assert w.qweight[0, 1].item() == 0xF0000000 - 2 ** 32
    assert w.qzeros[0, 0].item() == 0x76543210
    q_back, z_back = w.unpack()
    assert torch.equal(q_back.long(), q) and torch.equal(z_back.long(), z)


# ---- GPTQ checkpoints ---------------------------------------------------------------------------

def _gptq_tensors(group_size=64, out_f=16, in_f=128, seed=5):
    wq = quantize_int4(_weight(out_f, in_f, seed=seed).half(), group_size=group_size)
    g_idx = torch.arange(in_f, dtype=torch.int32) // group_size
    return wq, g_idx


def test_gptq_v2_zeros_are_stored_as_is():
    wq, g_idx = _gptq_tensors()
    got = unpack_gptq(wq.qweight, wq.qzeros, wq.scales, g_idx, group_size=64, checkpoint_format="gptq_v2")
    assert got.shape == (16, 128) and got.group_size == 64
    for f in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(got, f), getattr(wq, f))


def test_gptq_v1_zeros_are_stored_minus_one():
    """AutoGPTQ v1 ("gptq"): qzeros hold zero - 1 and w = scale * (q - (nibble + 1)). The loaded
    weight dequantizes to exactly that, and holds the zero point itself."""
    wq, g_idx = _gptq_tensors()
    z = _nibbles(wq.qzeros, axis=1)
    z[z == 0] = 1  # a v1 file cannot store zero 0 (it would be nibble -1)
    wq.qzeros = mod._pack_nibbles(torch.from_numpy(z), dim=1)
    v1_qzeros = mod._pack_nibbles(torch.from_numpy(z - 1), dim=1)
    got = unpack_gptq(wq.qweight, v1_qzeros, wq.scales, g_idx, group_size=64, checkpoint_format="gptq")
    assert torch.equal(got.qzeros, wq.qzeros)
    v1_meaning = _dequant_independent(wq.qweight, v1_qzeros, wq.scales, 64, zero_offset=1)
    assert torch.equal(dequantize_int4(got, torch.float64), v1_meaning)


def test_gptq_v1_zero_nibble_15_raises():
    wq, g_idx = _gptq_tensors()
    bad = wq.qzeros.clone()
    bad[0, 0] = 0x7777777F
    with pytest.raises(ValueError, match="zero point 16"):
        unpack_gptq(wq.qweight, bad, wq.scales, g_idx, group_size=64, checkpoint_format="gptq")


def test_gptq_act_order_g_idx_rejected():
    wq, g_idx = _gptq_tensors()
    perm = g_idx[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="desc_act/act-order checkpoints are not supported"):
        unpack_gptq(wq.qweight, wq.qzeros, wq.scales, perm, group_size=64, checkpoint_format="gptq_v2")


def test_gptq_g_idx_optional_and_group_minus_one():
    wq, _ = _gptq_tensors()
    got = unpack_gptq(wq.qweight, wq.qzeros, wq.scales, None, group_size=64, checkpoint_format="gptq_v2")
    assert torch.equal(got.qweight, wq.qweight)
    whole = quantize_int4(_weight(16, 128, seed=2), group_size=128)
    got = unpack_gptq(whole.qweight, whole.qzeros, whole.scales, torch.zeros(128, dtype=torch.int32),
                      group_size=-1, checkpoint_format="gptq_v2")
    assert got.group_size == 128


@pytest.mark.parametrize("change,match", [
    (lambda t: dict(t, qzeros=t["qzeros"][:, :1]), "qzeros has shape"),
    (lambda t: dict(t, scales=t["scales"][:1]), "scales has shape"),
    (lambda t: dict(t, qweight=t["qweight"].float()), "qweight must be a 2-d int32"),
    (lambda t: dict(t, qweight=t["qweight"][:, :12]), "positive multiple of 8"),
    (lambda t: dict(t, g_idx=t["g_idx"][:-1]), "g_idx must be an integer tensor of shape"),
    (lambda t: dict(t, group_size=48), "multiple of group_size"),
    (lambda t: dict(t, checkpoint_format="awq"), "checkpoint_format"),
])
def test_gptq_bad_tensors_raise(change, match):
    wq, g_idx = _gptq_tensors()
    t = change(dict(qweight=wq.qweight, qzeros=wq.qzeros, scales=wq.scales, g_idx=g_idx, group_size=64,
                    checkpoint_format="gptq_v2"))
    with pytest.raises(ValueError, match=match):
        unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size=t["group_size"],
                    checkpoint_format=t["checkpoint_format"])


# ---- Triton dequant-matmul ----------------------------------------------------------------------

# (in, out, group): every group size, out not a multiple of BLOCK_N, K tiles 1..12 (split-K 1..3)
LINEAR_SHAPES = [(128, 8, 128), (256, 24, 64), (384, 136, 32)]


def _check_linear(y, x, w, dtype):
    assert not y.isnan().any(), "unwritten output elements (NaN poison survived)"
    ref = int4_linear_ref(x, w)
    assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, ref)
    one_row = x.numel() == x.shape[-1]
    if one_row:  # the M = 1 kernel does not round the dequantized weights to x's dtype
        same_steps = F.linear(x.float(), dequantize_int4(w, torch.float32)).to(dtype)
        ref64 = F.linear(x.double(), dequantize_int4(w, torch.float64))
    else:  # the same dequantized weights as the reference
        same_steps = ref
        ref64 = F.linear(x.double(), dequantize_int4(w, x.dtype).double())
    if dtype != torch.float32:  # then only fp32 summation order differs
        assert (y == same_steps).float().mean() >= 0.98, "int4_linear's rounding steps are not the expected ones"
    assert_error_within_torch(y, ref, ref64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_f,out_f,group_size", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 40])
def test_int4_linear_matches_reference(nan_empty, M, in_f, out_f, group_size, dtype):
    w = quantize_int4(_weight(out_f, in_f, seed=in_f + out_f, dtype=dtype), group_size=group_size)
    x = torch.randn(M, in_f, generator=torch.Generator().manual_seed(M)).to(dtype)
    y = int4_linear(x, w)
    _check_linear(y, x, w, dtype)


@pytest.mark.parametrize("M", [1, 5, 33])
def test_int4_linear_strided_rows_and_leading_dims(nan_empty, M):
    """x as a column slice of a wider buffer (row stride != in, no copy) with two leading dims;
    scales in fp16 while x is bf16 (weights dequantize to x's dtype)."""
    in_f, out_f = 256, 40
    w = quantize_int4(_weight(out_f, in_f, seed=9), group_size=128, dtype=torch.float16)
    buf = torch.randn(M, 2, in_f + 24, generator=torch.Generator().manual_seed(1)).bfloat16()
    x = buf[..., 16:16 + in_f]
    y = int4_linear(x, w)
    assert y.shape == (M, 2, out_f)
    _check_linear(y, x, w, torch.bfloat16)


def test_int4_linear_empty_rows():
    w = quantize_int4(_weight(16, 128, seed=1), group_size=128)
    assert int4_linear(torch.empty(0, 128), w).shape == (0, 16)


@pytest.mark.parametrize("make,exc,match", [
    (lambda x, w: (x[:, :-8], w), ValueError, r"\[\.\.\., 256\]"),
    (lambda x, w: (x.int(), w), TypeError, "dtype"),
    (lambda x, w: (x, dequantize_int4(w)), TypeError, "Int4Weight"),
    (lambda x, w: (x.t().contiguous().t(), w), ValueError, "unit stride"),
    (lambda x, w: (x, Int4Weight(w.qweight, w.qzeros[:, :1], w.scales, w.shape, w.group_size)), ValueError, "qzeros"),
    (lambda x, w: (x, Int4Weight(w.qweight, torch.zeros(32, 2, dtype=torch.int32), torch.ones(32, 16), w.shape, 8)),
     ValueError, "group_size=8"),
])
def test_int4_linear_bad_inputs_raise(make, exc, match):
    x = torch.randn(4, 256)
    w = quantize_int4(_weight(16, 256, seed=4), group_size=128)
    x, w = make(x, w)
    with pytest.raises(exc, match=match):
        int4_linear(x, w)


def test_launch_decisions():
    """GEMV for M <= 16 (FMA rows for M = 1, one tensor-core tile otherwise), GEMM above; K tiles inside
    one group; on the GPU narrow layers split K until there are >= 4 programs per SM."""
    bf16 = torch.bfloat16
    assert int4_launch(1, 4096, 4096, 128, bf16).block_m == 1
    assert int4_launch(16, 4096, 4096, 128, bf16).kind == "gemv"
    assert int4_launch(17, 4096, 4096, 128, bf16).kind == "gemm"
    for M, N, K in [(1, 4096, 4096), (8, 8192, 28672), (1, 57344, 8192), (1, 8, 32)]:
        cfg = int4_launch(M, N, K, 128 if K % 128 == 0 else 32, bf16, num_sms=132)
        tiles = K // cfg.block_k
        assert tiles * cfg.block_k == K and 1 <= cfg.split_k <= tiles
        assert (tiles + cfg.split_k - 1) // cfg.split_k * (cfg.split_k - 1) < tiles  # no empty split
    assert int4_launch(1, 4096, 4096, 128, bf16, num_sms=132).split_k > 1
    assert int4_launch(1, 4096, 4096, 128, bf16).block_n == 256
    assert int4_launch(1, 4096 * 132, 8192, 128, bf16, num_sms=132).split_k == 1  # >= 4 column blocks per SM
    assert int4_launch(8, 57344, 8192, 128, bf16, num_sms=132).split_k == 1


# ---- the tensor-core GEMV (weight as the A operand) -----------------------------------------------

# (in, out, group): one to six K tiles of 128 (split-K 1..3), out not a multiple of the 256-column tile
MMA_SHAPES = [(128, 8, 128), (384, 136, 128), (768, 264, 128)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_f,out_f,group_size", MMA_SHAPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_int4_gemv_mma_matches_exact_product(nan_empty, M, in_f, out_f, group_size, dtype):
    """`_int4_gemv_mma_kernel` (its arithmetic nibble path; the PTX one is checked below): the exact
    dequantized weights (not rounded to x's dtype) times x, fp32 sums, one rounding at the end."""
    w = quantize_int4(_weight(out_f, in_f, seed=in_f + M, dtype=dtype), group_size=group_size)
    x = torch.randn(M, in_f, generator=torch.Generator().manual_seed(M)).to(dtype)
    cfg = int4_launch(M, out_f, in_f, group_size, dtype, on_cuda=False, kind="gemv_mma")
    assert cfg.kind == "gemv_mma" and cfg.split_k == min(3, in_f // 128)
    y = int4_linear(x, w, cfg)
    assert not y.isnan().any(), "unwritten output elements (NaN poison survived)"
    assert y.shape == (M, out_f) and y.dtype == dtype
    exact = F.linear(x.double(), dequantize_int4(w, torch.float64))
    same_steps = F.linear(x.float(), dequantize_int4(w, torch.float32)).to(dtype)
    differ = (y != same_steps).sum().item()  # fp32 summation order flips a rounding now and then
    assert differ <= max(1, 0.02 * y.numel()), f"{differ} of {y.numel()}: not the expected rounding steps"
    assert_error_within_torch(y, same_steps, exact, dtype)


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): result byte i is byte (selector nibble i) & 7 of {b, a}, its top bit
    replicated over the byte when the nibble's bit 3 is set."""
    pool = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (selector >> (4 * i)) & 0xF
        byte = (pool >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX lop3.b32: each result bit is bit (a_i b_i c_i) of the truth table lut (a is the high index)."""
    return sum(((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | (c >> i) & 1)) & 1) << i for i in range(32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_nibble_pair_asm_reads_bias_plus_nibble(dtype):
    """The PTX the CUDA path runs in place of `_nibble_plane`'s arithmetic, executed by a model of prmt
    and lop3 written from the PTX ISA: for random int32 pairs, byte b's low nibble of each (b = 0..3, and
    of qw >> 4 for the odd nibbles) lands in the right half as exactly bias + q in the float format."""
    bits, bias = mod.MMA_FLOAT_BIAS[dtype]
    assert torch.tensor([bits], dtype=torch.int16).view(dtype).item() == bias
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 2 ** 32, size=(64, 2), dtype=np.uint64).tolist() + [[0, 0], [2 ** 32 - 1, 2 ** 32 - 1]]
    for byte in range(4):
        asm = mod.nibble_pair_asm(byte, bits)
        prmt, lop3 = re.fullmatch(r"\{ \.reg \.b32 t; prmt\.b32 t, \$1, \$2, (0x[0-9a-f]+); "
                                  r"lop3\.b32 \$0, t, (0x[0-9a-f]+, 0x[0-9a-f]+, 0x[0-9a-f]+); \}", asm, re.I).groups()
        mask, bias_bits, lut = (int(v, 16) for v in lop3.split(", "))
        for a, b in pairs:
            for shift in (0, 4):  # even nibble 2 byte, odd nibble 2 byte + 1 (read from qw >> 4)
                sa, sb = a >> shift, b >> shift
                got = _lop3(_prmt(sa, sb, int(prmt, 16)), mask, bias_bits, lut)
                halves = torch.tensor([got & 0xFFFF, got >> 16], dtype=torch.int32).to(torch.int16).view(dtype)
                want = [bias + ((v >> (8 * byte)) & 0xF) for v in (sa, sb)]
                assert halves.tolist() == want, (asm, hex(a), hex(b), shift)


@pytest.mark.parametrize("M,dtype,group_size,match", [
    (17, torch.bfloat16, 128, "M=17"), (1, torch.float32, 128, "float32"), (1, torch.bfloat16, 64, "group_size=64")])
def test_int4_gemv_mma_refuses_what_it_cannot_run(M, dtype, group_size, match):
    with pytest.raises(ValueError, match=match):
        int4_launch(M, 64, 256, group_size, dtype, kind="gemv_mma")
    w = quantize_int4(_weight(64, 256, seed=3), group_size=group_size)
    cfg = mod.Int4Launch("gemv_mma", 16, 256, 128, 1, 4, 3)
    with pytest.raises(ValueError, match=match):
        int4_linear(torch.zeros(M, 256, dtype=dtype), w, cfg)
    with pytest.raises(ValueError, match="kind"):
        int4_launch(1, 64, 256, 128, torch.bfloat16, kind="mma")


MMA = KernelOptions(experiments={"int4_mma"})
ONE_PASS = KernelOptions(experiments={"int4_one_pass"})


def test_int4_mma_experiment_switch():
    """The experiment "int4_mma" gives decode rows the tensor-core GEMV where it can run (and only there);
    off, the shipped kernels."""
    bf16 = torch.bfloat16
    assert int4_launch(1, 4096, 4096, 128, bf16).kind == "gemv"
    for M in (1, 8, 16):
        assert int4_launch(M, 4096, 4096, 128, bf16, options=MMA) == int4_launch(M, 4096, 4096, 128, bf16,
                                                                                 kind="gemv_mma")
    assert int4_launch(1, 4096, 4096, 128, torch.float16, options=MMA).kind == "gemv_mma"
    assert int4_launch(17, 4096, 4096, 128, bf16, options=MMA).kind == "gemm"
    assert int4_launch(1, 4096, 4096, 128, torch.float32, options=MMA).kind == "gemv"  # no fp32 tensor-core GEMV
    assert int4_launch(1, 4096, 4096, 64, bf16, options=MMA).kind == "gemv"  # groups smaller than its K tile
    assert int4_launch(1, 4096, 4096, 128, bf16, kind="gemv", options=MMA).kind == "gemv"  # an explicit kind wins


def test_int4_linear_with_the_mma_experiment_runs_the_mma_kernel():
    """The experiment reaches `int4_linear` without a launch argument: the same bits as asking for gemv_mma."""
    w = quantize_int4(_weight(136, 384, seed=11, dtype=torch.bfloat16), group_size=128)
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = int4_linear(x, w, int4_launch(3, 136, 384, 128, torch.bfloat16, on_cuda=False, kind="gemv_mma"))
    fma = int4_linear(x, w)
    got = int4_linear(x, w, options=MMA)
    assert torch.equal(got, want)
    assert not torch.equal(fma, want)  # the kernels round differently, so the switch is seen


@pytest.mark.slow
@pytest.mark.parametrize("kind", [None, "gemv_mma"], ids=["fma", "mma"])
@pytest.mark.parametrize("M", [1, 3])
def test_one_pass_split_k_is_bitwise_the_reduce_kernel(nan_empty, M, kind):
    """The experiment "int4_one_pass": each column block's last program sums the split-K partials, in split
    order, as the reduce kernel would: the same bits, no reduce launch, and the tickets back at zero."""
    from codellama_rt.kernels._triton import tickets

    in_f, out_f = 768, 520  # 6 K tiles in 3 splits, a partial last column block
    w = quantize_int4(_weight(out_f, in_f, seed=M, dtype=torch.bfloat16), group_size=128)
    x = torch.randn(M, in_f, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)
    cfg = int4_launch(M, out_f, in_f, 128, torch.bfloat16, on_cuda=False, kind=kind)
    assert cfg.split_k == 3

    def kernels(**kw):  # what `int4_linear` would launch
        return [k for k, *_ in mod._prepare(x, w, on_cuda=False, cfg=cfg, **kw)[1]]

    want = int4_linear(x, w, cfg)
    assert kernels()[-1] is mod._int4_splitk_reduce_kernel
    assert len(kernels(options=ONE_PASS)) == 1  # no reduce kernel
    assert kernels(one_pass=True) == kernels(options=ONE_PASS)  # the explicit override wins either way
    assert kernels(one_pass=False, options=ONE_PASS) == kernels()
    assert torch.equal(int4_linear(x, w, cfg, options=ONE_PASS), want)
    assert (tickets(x.device, 64) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 8, 40])
def test_layer_output_cosine_after_quantization(M, dtype):
    """One layer's output with RTN int4 weights (group 128) stays close to the dense one: cosine > 0.99,
    the layer-level margin behind the model-level "logits cosine > 0.98" expectation."""
    g = torch.Generator().manual_seed(M)
    W = torch.randn(256, 512, generator=g) / 512 ** 0.5
    x = torch.randn(M, 512, generator=g)
    dense = (x.double() @ W.double().t()).flatten()
    y = int4_linear(x.to(dtype), quantize_int4(W.to(dtype), group_size=128)).double().flatten()
    cos = F.cosine_similarity(dense, y, dim=0).item()
    assert cos > 0.99, cos


def test_aot_configs_compile(check_aot):
    configs = mod.aot_configs(aot_models())
    labels = [c.label for c in configs]
    for t in ("bf16", "fp16"):
        kinds = {(c.kernel.__name__, c.constexprs.get("BLOCK_M"), c.constexprs.get("WRITE_PARTIALS"))
                 for c in configs if c.label.startswith(t)}
        assert kinds >= {("_int4_gemv_kernel", 1, True), ("_int4_gemv_kernel", 16, False),
                         ("_int4_gemv_kernel", 16, True), ("_int4_gemm_kernel", 128, None),
                         ("_int4_splitk_reduce_kernel", None, None), ("_int4_gemv_mma_kernel", None, True)}, (t, kinds)
    assert len(set(labels)) == len(labels)
    check_aot(configs)


def test_unsplit_one_row_gemv_compiles(check_aot):
    """M = 1 without split-K (no model linear is wide enough to skip the split on an H100): compiled from
    the launcher's own arguments for a layer with >= 4 column blocks per SM."""
    N, K = 256 * 4 * 132, 4096
    w = mod.Int4Weight(qweight=torch.empty(K // 8, N, dtype=torch.int32, device="meta"),
                       qzeros=torch.empty(K // 128, N // 8, dtype=torch.int32, device="meta"),
                       scales=torch.empty(K // 128, N, dtype=torch.bfloat16, device="meta"), shape=(N, K))
    x = torch.empty(1, K, dtype=torch.bfloat16, device="meta")
    _, launches = mod._prepare(x, w, on_cuda=True, num_sms=132)
    assert len(launches) == 1
    kern, _, args, constexprs, num_warps, num_stages = launches[0]
    assert constexprs["BLOCK_M"] == 1 and not constexprs["WRITE_PARTIALS"]
    check_aot([launch_config(kern, args, constexprs, num_warps=num_warps, num_stages=num_stages,
                             label="bf16 M=1 unsplit")])


@pytest.mark.parametrize("dtypes,group_size", [((torch.float32,), 128), ((torch.bfloat16,), 32),
                                               ((torch.float16,), 64)], ids=["fp32", "bf16-g32", "fp16-g64"])
def test_other_specialisations_compile(check_aot, dtypes, group_size):
    """fp32 (IEEE dots, the debugging path) and groups 32/64 (K tiles of 32/64) compile without spills
    too, at the 7B shapes."""
    check_aot(mod.aot_configs(aot_models()[:1], dtypes=dtypes, group_size=group_size))
