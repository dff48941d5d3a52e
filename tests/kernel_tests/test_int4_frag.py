"""int4 in fragment order (issue 20's kernel-native layout): the layout against its documented index map, the
round trip and dequantization against `Int4Weight`'s (ours, GPTQ v1 and v2), the Triton twin of the Gluon
GEMV (Triton's interpreter) against the fp32 dequantize-then-matmul reference, the conversion's PTX run
through a small emulator against the twin's arithmetic, the launcher's refusals, the experiment's
dispatch, and the Gluon kernel's AOT compile and static loop figures (issue 20's targets)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from codellama_rt.bench.common import aot_models
from codellama_rt.kernels import int4_frag as mod
from codellama_rt.kernels import ops, sass
from codellama_rt.kernels._triton import compile_kernel
from codellama_rt.kernels.int4_format import dequantize_int4, quantize_int4, unpack_gptq
from codellama_rt.kernels.int4_frag import FRAG_ASM, frag_eligible, frag_of, int4_frag_linear, int4_frag_linear_ref
from codellama_rt.kernels.int4_frag_format import (FRAG_BLOCK_N, Int4FragWeight, dequantize_frag, frag_scales,
                                                   to_frag, unpack_frag)
from codellama_rt.kernels.options import KernelOptions

from .ptx_emulator import run_ptx

BF16_ULP = 2.0 ** -7  # one unit in the last place of bf16 (8 significant bits), relative, at most


def _int4(out_f, in_f, group_size, seed=0, skewed=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    if skewed:
        w[0, :group_size] += 0.5  # a group with its zero point far from 8
    return quantize_int4(w, group_size=group_size, dtype=torch.bfloat16)


def _assert_one_rounding(y, ref, x, fw):
    """y and ref (both bf16, each one rounding of an fp32 sum) differ by at most one bf16 ulp of ref, plus the
    fp32 sums' own rounding where terms cancel (relative to sum |x| |w|)."""
    w32 = dequantize_frag(fw, torch.float32)
    scale = x.float().reshape(-1, x.shape[-1]).abs() @ w32.abs().t()
    bound = BF16_ULP * ref.float().reshape(scale.shape).abs() + 16 * 2.0 ** -24 * x.shape[-1] ** 0.5 * scale
    err = (y.float() - ref.float()).reshape(scale.shape).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"


def _x(M, K, seed=1, lead=()):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, M, K, generator=g).to(torch.bfloat16)


# ---- the format --------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_codes_follow_the_documented_index_map(group_size):
    """Every (block, chunk, tile, lane, element, nibble) holds q[256 blk + 16 tile + 8 e1 + g, k]: k = 64 chunk + 16 t
    + 4 c + 2 e2 + e0, or with groups of 32, 64 chunk + 32 (c // 2) + 8 t + 4 (c % 2) + 2 e2 + e0 (each plane in one
    group); two row blocks."""
    w = _int4(296, 2 * group_size, group_size)
    q, _ = w.unpack()
    fw = to_frag(w)
    codes = fw.codes.numpy().astype(np.int64) & 0xFFFF
    blocks, chunks, tiles = codes.shape[:3]
    assert blocks == 2
    for blk in range(blocks):
        for chunk in range(chunks):
            for tile in range(tiles):
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for e in range(8):
                        e2, e1, e0 = e >> 2, (e >> 1) & 1, e & 1
                        n = FRAG_BLOCK_N * blk + 16 * tile + 8 * e1 + g
                        for c in range(4):
                            k = (64 * chunk + 32 * (c // 2) + 8 * t + 4 * (c % 2) + 2 * e2 + e0 if group_size == 32
                                 else 64 * chunk + 16 * t + 4 * c + 2 * e2 + e0)
                            if group_size == 32:  # planes 0-1 in the chunk's first group of 32, 2-3 in its second
                                assert k // 32 == 2 * chunk + c // 2
                            want = int(q[n, k]) if n < 296 else 0
                            got = (codes[blk, chunk, tile, lane, e] >> (4 * c)) & 0xF
                            assert got == want, (blk, chunk, tile, lane, e, c)


@pytest.mark.parametrize("out_f,in_f,group_size", [(8, 64, 64), (296, 256, 64), (264, 384, 128), (512, 128, 128),
                                                   (40, 128, 32), (296, 192, 32)])
def test_round_trip_scales_and_dequantization(out_f, in_f, group_size):
    """unpack_frag inverts to_frag; each row's (s, c) is (s, -(128 + z) s); the fp32 dequantization equals
    Int4Weight's ((q - z) s, exact for bf16 scales); the padding rows are zero."""
    w = _int4(out_f, in_f, group_size, seed=out_f)
    fw = to_frag(w)
    fw.check()
    q, z = w.unpack()
    assert fw.padded_out % FRAG_BLOCK_N == 0 and fw.padded_out >= out_f
    assert torch.equal(unpack_frag(fw), q)
    sc = frag_scales(fw)
    assert torch.equal(sc[:, :out_f, 0], w.scales.float())
    assert torch.equal(sc[:, :out_f, 1], -(128.0 + z.float()) * w.scales.float())
    padded = Int4FragWeight(codes=fw.codes, scales=fw.scales, shape=(fw.padded_out, in_f), group_size=group_size)
    assert not sc[:, out_f:].any() and not unpack_frag(padded)[out_f:].any()
    assert torch.equal(dequantize_frag(fw, torch.float32), dequantize_int4(w, torch.float32))


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("zero_convention", ["gptq", "gptq_v2"])
def test_gptq_checkpoints_lay_out_to_the_same_weights(zero_convention, group_size):
    """A GPTQ tensor set (v1 stores zero - 1) read by `unpack_gptq`, then laid out: the same dequantized
    weight as the Int4Weight it came from."""
    w = _int4(64, 256, group_size, seed=3, skewed=False)
    z = w.unpack()[1].to(torch.int64)
    stored = z - 1 if zero_convention == "gptq" else z
    assert (stored >= 0).all()  # v1 cannot store a zero point of 0
    shifts = torch.arange(8) * 4
    qzeros = ((stored.view(z.shape[0], -1, 8) << shifts).sum(-1) & 0xFFFFFFFF)
    qzeros = torch.where(qzeros >= 2 ** 31, qzeros - 2 ** 32, qzeros).to(torch.int32)
    read = unpack_gptq(w.qweight, qzeros, w.scales, None, group_size=group_size, checkpoint_format=zero_convention)
    assert torch.equal(dequantize_frag(to_frag(read), torch.float32), dequantize_int4(w, torch.float32))


def test_unsupported_layouts_are_refused():
    with pytest.raises(ValueError, match="in_features 96"):
        to_frag(_int4(16, 96, 32))  # 96 input columns: not whole chunks of 64
    fw = to_frag(_int4(16, 128, 64))
    bad = Int4FragWeight(codes=fw.codes[:, :1].contiguous(), scales=fw.scales, shape=fw.shape, group_size=64)
    with pytest.raises(ValueError, match="codes must be"):
        bad.check()


# ---- the conversion's PTX ----------------------------------------------------------------------

def _bf16_halves(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = ((words & 0xFFFF).astype(np.uint32) << 16).view(np.float32)
    hi = (words & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return lo, hi


def test_conversion_ptx_gives_the_twins_planes():
    """For every 16-bit pattern in each half: output c holds bf16 128 + ((half >> 4c) & 15) in that half,
    the value the twin computes; the halves do not mix."""
    lo16 = np.arange(1 << 16, dtype=np.uint32)
    hi16 = np.random.default_rng(0).permutation(lo16)
    words = lo16 | (hi16 << 16)
    planes = run_ptx(FRAG_ASM.value, [words], 4)
    for c, out in enumerate(planes):
        lo, hi = _bf16_halves(out)
        np.testing.assert_array_equal(lo, 128.0 + ((lo16 >> (4 * c)) & 15))
        np.testing.assert_array_equal(hi, 128.0 + ((hi16 >> (4 * c)) & 15))


def test_emulator_knows_lop3_luts():
    """The emulator's LUT reading on known functions: 0xea = (a & b) | c, 0x96 = a ^ b ^ c, 0x80 = a & b & c."""
    a, b, c = np.uint32(0b1100), np.uint32(0b1010), np.uint32(0b0110)
    for lut, want in ((0xEA, (a & b) | c), (0x96, a ^ b ^ c), (0x80, a & b & c)):
        got = run_ptx(f"lop3.b32 $0, $1, {int(b)}, {int(c)}, {lut:#x};", [np.array([a])], 1)[0]
        assert int(got[0]) == int(want), hex(lut)


# ---- the GEMV (the twin in the interpreter) ----------------------------------------------------

@pytest.mark.parametrize("out_f,in_f,group_size,M", [
    (296, 256, 64, 1), (264, 384, 128, 3), (512, 128, 64, 8), (8, 64, 64, 2), (520, 768, 128, 5),
    (264, 256, 64, 9), (40, 384, 128, 16), (296, 256, 32, 1), (264, 384, 32, 5), (40, 128, 32, 12),
])
def test_twin_matches_the_reference(out_f, in_f, group_size, M):
    """Odd widths (padding), 1..8 rows, groups 64/128, split-K: each output within one bf16 rounding of the
    fp32 reference (both round once; the sums agree to fp32 rounding)."""
    fw = to_frag(_int4(out_f, in_f, group_size, seed=M))
    x = _x(M, in_f, seed=M)
    y = int4_frag_linear(x, fw)
    ref = int4_frag_linear_ref(x, fw)
    assert y.dtype == torch.bfloat16 and y.shape == (M, out_f)
    _assert_one_rounding(y, ref, x, fw)


def test_fp32_sums_match_the_reference_to_fp32_rounding():
    """The split-K partials, summed, against the fp32 dequantize-then-matmul product: within fp32 rounding
    of sum |x| |w| (before the one rounding to bf16)."""
    fw = to_frag(_int4(264, 768, 64, seed=5))
    x = _x(4, 768, seed=6)
    _, launches = mod._prepare(x, fw)
    kern, grid, args, constexprs, num_warps = launches[0]
    assert constexprs["WRITE_PARTIALS"] and grid[1] > 1
    kern.on(x)[grid](*args, **constexprs, num_warps=num_warps, num_stages=1)
    part = args[4]
    got = part.sum(0, dtype=torch.float64)
    w32 = dequantize_frag(fw, torch.float32).double()
    exact = x.double() @ w32.t()
    scale = x.double().abs() @ w32.abs().t()
    assert ((got - exact).abs() <= 8 * 2.0 ** -24 * 768 ** 0.5 * scale + 1e-30).all()


def test_leading_dims_and_row_strides():
    """x [2, 3, K] and a row-strided view (no copy) give the rows of the plain call."""
    fw = to_frag(_int4(64, 128, 64, seed=7))
    x = _x(3, 128, seed=8, lead=(2,))
    y = int4_frag_linear(x, fw)
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y.view(6, 64), int4_frag_linear(x.reshape(6, 128), fw), rtol=0, atol=0)
    wide = _x(4, 256, seed=9)
    torch.testing.assert_close(int4_frag_linear(wide[:, :128], fw), int4_frag_linear(wide[:, :128].contiguous(), fw),
                               rtol=0, atol=0)


@pytest.mark.parametrize("call,err,match", [
    (lambda fw: int4_frag_linear(_x(1, 128).half(), fw), TypeError, "bfloat16"),
    (lambda fw: int4_frag_linear(_x(17, 128), fw), ValueError, "at most 16 rows"),
    (lambda fw: int4_frag_linear(_x(1, 64), fw), ValueError, r"\[\.\.\., 128\]"),
    (lambda fw: int4_frag_linear(_x(1, 128), _int4(64, 128, 64)), TypeError, "Int4FragWeight"),
])
def test_launcher_refuses_what_it_cannot_run(call, err, match):
    fw = to_frag(_int4(64, 128, 64))
    with pytest.raises(err, match=match):
        call(fw)


def test_empty_x_gives_an_empty_result():
    fw = to_frag(_int4(64, 128, 64))
    assert int4_frag_linear(_x(0, 128), fw).shape == (0, 64)


# ---- the experiment's dispatch -----------------------------------------------------------------

def test_experiment_routes_eligible_rows_to_the_fragment_kernel():
    """With "int4_frag": bf16 rows <= 16 take the fragment GEMV (its copy made once and kept on the weight);
    17 rows, fp32 rows or input widths that are not whole chunks of 64 take the GPTQ-layout kernels; without the
    experiment nothing changes."""
    w = _int4(64, 128, 64, seed=11)
    on = KernelOptions(experiments={"int4_frag"})
    x = _x(2, 128, seed=12)
    assert frag_eligible(x, w) and not frag_eligible(_x(17, 128), w) and not frag_eligible(x.float(), w)
    assert not frag_eligible(_x(2, 96), _int4(64, 96, 32))
    y = ops.linear_int4(x, w, options=on)
    fw = frag_of(w)
    assert frag_of(w) is fw
    torch.testing.assert_close(y, int4_frag_linear(x, fw), rtol=0, atol=0)
    _assert_one_rounding(y, int4_frag_linear_ref(x, fw), x, fw)
    many = _x(17, 128, seed=13)
    torch.testing.assert_close(ops.linear_int4(many, w, options=on), ops.linear_int4(many, w), rtol=0, atol=0)


def test_custom_op_matches_the_launcher():
    """The op torch.compile sees (codellama_rt::int4_frag_linear) gives the launcher's bits, and opcheck
    passes (schema, fake tensor)."""
    fw = to_frag(_int4(64, 128, 64, seed=14))
    x = _x(2, 128, seed=15)
    y = ops._int4_frag_linear_op(x, fw.codes, fw.scales, 64, 128, 64, True)
    torch.testing.assert_close(y, int4_frag_linear(x, fw), rtol=0, atol=0)
    torch.library.opcheck(ops._int4_frag_linear_op, (x, fw.codes, fw.scales, 64, 128, 64, True),
                          test_utils=("test_schema", "test_faketensor"))


# ---- the Gluon kernel, compiled ahead of time --------------------------------------------------

def test_aot_configs_compile(check_aot):
    """sm_80 and sm_90: no spills, within shared memory (it uses none); groups of 128 and of 32."""
    configs = mod.aot_configs(aot_models()) + mod.aot_configs(aot_models()[:1], group_size=32)
    assert {c.kernel.__name__ for c in configs} == {"_int4_frag_gemv_kernel"}
    rows = check_aot(configs)
    assert all(r.shared_bytes == 0 for r in rows)


@pytest.mark.parametrize("arch", [80, 90])
def test_main_loop_meets_issue_20s_targets(arch):
    """The static table's figures for the Gluon GEMV at the 7B shapes: at most 1.5 SASS instructions a weight for
    M = 1 and 8 (one n8 column tile of x), 2.0 for M = 16 (two: twice the MMAs and accumulator updates), at least
    32 KiB of loads in flight per SM, and the conversion at 7 instructions per 8 weights (the loop holds 4 LOP3
    and 3 SHF per 32-bit code word)."""
    for cfg in mod.aot_configs(aot_models()[:1]) + mod.aot_configs(aot_models()[:1], group_size=32, rows=(1,)):
        stats = sass.loop_stats(cfg, arch)
        # groups of 32 (one M = 1 config): two groups' scales and x sums per 64 input columns
        target = 2.0 if cfg.constexprs["GROUP_SIZE"] == 32 else 1.5 if cfg.constexprs["MT"] == 8 else 2.0
        assert stats.per_weight <= target, f"{cfg.label} sm_{arch}: {stats.per_weight:.3f} SASS a weight"
        assert stats.in_flight_kib >= 32, f"{cfg.label} sm_{arch}: {stats.in_flight_kib:.1f} KiB in flight"
        loop = sass.main_loop(sass.disassemble(compile_kernel(cfg, arch).asm["cubin"]))
        ops_ = [re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for ins in loop]
        words = stats.weights_per_thread / 8
        assert ops_.count("LOP3") >= 4 * words and ops_.count("HMMA") >= stats.weights_per_thread / 8
