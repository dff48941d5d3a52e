"""NF4 in fragment order (issue 20's kernel-native layout for bitsandbytes' NF4): the layout against its
documented index map, the round trip and bitsandbytes' dequantized weights (bit for bit), the pair table, the
lookup's PTX run through the emulator against the documented shared-memory table, the Triton twin of the Gluon
GEMV (Triton's interpreter) against the fp32 reference and bitsandbytes' weights, the launcher's refusals, the
experiment's dispatch, and the Gluon kernel's AOT compile and static loop figures (issue 20's targets)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from codellama_rt.bench.common import aot_models
from codellama_rt.kernels import nf4_frag as mod
from codellama_rt.kernels import ops, sass
from codellama_rt.kernels._triton import compile_kernel
from codellama_rt.kernels.nf4 import nf4_linear_ref
from codellama_rt.kernels.nf4_format import dequantize_nf4, quantize_nf4
from codellama_rt.kernels.nf4_frag import (NF4_LOOKUP_ASM, TABLE_STRIDE, nf4_frag_eligible, nf4_frag_linear,
                                           nf4_frag_linear_ref, nf4_frag_of)
from codellama_rt.kernels.nf4_frag_format import (NF4_FRAG_BLOCK_N, Nf4FragWeight, dequantize_nf4_frag,
                                                  nf4_frag_scales, pair_table, to_nf4_frag, unpack_nf4_frag)
from codellama_rt.kernels.options import KernelOptions

from .ptx_emulator import run_ptx

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # one unit in the last place, relative, at most


def _nf4(out_f, in_f, dtype=torch.bfloat16, seed=0, double_quant=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    w[0, :64] *= 8.0  # one block with a much larger absmax
    return quantize_nf4(w.to(dtype), double_quant=double_quant)


def _x(M, K, dtype=torch.bfloat16, seed=1, lead=()):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, M, K, generator=g).to(dtype)


def _nibbles(w):
    """The NF4Weight's codes [out, in] (bitsandbytes: high nibble first)."""
    n, k = w.shape
    packed = w.codes.reshape(-1)[: n * k // 2]
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(n, k)


def _assert_one_rounding(y, ref, x, fw):
    """y and ref (each one rounding of an fp32 sum to x's dtype) differ by at most one ulp of ref, plus the fp32
    sums' own rounding where terms cancel (relative to sum |x| |w|)."""
    w32 = dequantize_nf4_frag(fw, torch.float32)
    scale = x.float().reshape(-1, x.shape[-1]).abs() @ w32.abs().t()
    bound = ULP[x.dtype] * ref.float().reshape(scale.shape).abs() + 16 * 2.0 ** -24 * x.shape[-1] ** 0.5 * scale
    err = (y.float() - ref.float()).reshape(scale.shape).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"


# ---- the format --------------------------------------------------------------------------------

def test_codes_follow_the_documented_index_map():
    """Every (column block, chunk, tile, lane, byte 4 b + c) holds bitsandbytes' byte of row n = 16 tile + 8 e1 + g
    and columns (k, k + 1), k = 64 chunk + 16 t + 4 c + 2 e2, b = 2 e2 + e1 (padding rows: code 7, 0.0)."""
    w = _nf4(40, 128)
    q = _nibbles(w)
    fw = to_nf4_frag(w)
    codes = fw.codes.numpy().astype(np.int64) & 0xFFFF
    blocks, chunks, tiles = codes.shape[:3]
    for blk in range(blocks):
        for chunk in range(chunks):
            for tile in range(tiles):
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for byte in range(16):
                        b, c = divmod(byte, 4)
                        e2, e1 = divmod(b, 2)
                        n = blk * NF4_FRAG_BLOCK_N + 16 * tile + 8 * e1 + g
                        k = 64 * chunk + 16 * t + 4 * c + 2 * e2
                        want = (int(q[n, k]) << 4 | int(q[n, k + 1])) if n < 40 else 0x77
                        got = (codes[blk, chunk, tile, lane, byte // 2] >> (8 * (byte % 2))) & 0xFF
                        assert got == want, (blk, chunk, tile, lane, byte)


@pytest.mark.parametrize("out_f,in_f,dtype,double_quant", [
    (8, 64, torch.bfloat16, True), (296, 256, torch.bfloat16, False), (264, 384, torch.float16, True),
    (512, 128, torch.float16, False), (40, 192, torch.bfloat16, True),
])
def test_round_trip_and_bitsandbytes_weights(out_f, in_f, dtype, double_quant):
    """unpack inverts the layout; the scales are each block's absmax with double quant undone (bitsandbytes'
    fp32 arithmetic); exact=True reproduces bitsandbytes' dequantized weight bit for bit; the kernel's weight is
    the dtype-rounded codebook times the absmax; padding is zero."""
    w = _nf4(out_f, in_f, dtype, seed=out_f, double_quant=double_quant)
    fw = to_nf4_frag(w)
    fw.check()
    assert fw.padded_out % NF4_FRAG_BLOCK_N == 0 and fw.padded_out >= out_f and fw.dtype == dtype
    assert torch.equal(unpack_nf4_frag(fw), _nibbles(w))
    sc = nf4_frag_scales(fw)
    assert torch.equal(sc[:, :out_f], w.block_absmax().view(out_f, in_f // 64).t())
    assert not sc[:, out_f:].any()
    assert torch.equal(dequantize_nf4_frag(fw, exact=True), dequantize_nf4(w))
    values = w.code.to(dtype).float()
    assert torch.equal(fw.values, values)
    kernel_w = values[_nibbles(w).long()] * w.block_absmax().view(out_f, in_f // 64).repeat_interleave(64, dim=1)
    assert torch.equal(dequantize_nf4_frag(fw, torch.float32), kernel_w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_table_holds_both_codes_values(dtype):
    """pairs[b]: the value of b's high nibble (input k) in the low half, of its low nibble (k + 1) in the high
    half, each as the dtype's bits (the register order of a k_width = 2 MMA operand)."""
    values = torch.linspace(-1, 1, 16).to(dtype).float()
    pairs = pair_table(values, dtype).numpy().view(np.uint32)
    bits = values.to(dtype).view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    for b in range(256):
        assert pairs[b] & 0xFFFF == bits[b >> 4] and pairs[b] >> 16 == bits[b & 15], b


def test_unsupported_layouts_are_refused():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="blocksize 128"):
        to_nf4_frag(quantize_nf4(torch.randn(16, 256, generator=g).bfloat16(), blocksize=128))
    with pytest.raises(ValueError, match="in_features 96"):
        to_nf4_frag(quantize_nf4(torch.randn(16, 96, generator=g).bfloat16()))
    with pytest.raises(ValueError, match="float32"):
        to_nf4_frag(quantize_nf4(torch.randn(16, 128, generator=g)))
    fw = to_nf4_frag(_nf4(16, 128))
    bad = Nf4FragWeight(codes=fw.codes[:, :1].contiguous(), scales=fw.scales, code=fw.code, values=fw.values,
                        pairs=fw.pairs, shape=fw.shape, dtype=fw.dtype)
    with pytest.raises(ValueError, match="codes must be"):
        bad.check()


# ---- the lookup's PTX --------------------------------------------------------------------------

def test_lookup_reads_the_lanes_own_column_of_the_bytes_entry():
    """NF4_LOOKUP_ASM for every lane and random code words, on a shared image whose word at TABLE_STRIDE e + 4 l
    (entry e, lane column l) is tagged (e, l) and every other word is poison: output c is the tag of (byte c,
    the lane itself). So each lane reads only its own column, bank l (no conflicts), of the entry its byte
    names, whatever `global_smem`'s address."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2 ** 32, size=(32, 64), dtype=np.uint64)
    lane = np.broadcast_to(np.arange(32, dtype=np.uint64)[:, None], words.shape)
    base = 1024
    image = np.full(256 * TABLE_STRIDE // 4, 0xDEADBEEF, dtype=np.uint32)
    e, col = np.meshgrid(np.arange(256), np.arange(32), indexing="ij")
    image[(e * TABLE_STRIDE + 4 * col) // 4] = (e << 8 | col).astype(np.uint32)
    out = run_ptx(NF4_LOOKUP_ASM.value, [words], 4, lane=lane, shared=image.view(np.uint8), shared_base=base)
    for c in range(4):
        byte = (words >> np.uint64(8 * c)) & np.uint64(0xFF)
        np.testing.assert_array_equal(out[c], (byte << np.uint64(8) | lane).astype(np.uint32))


def test_lookup_with_the_filled_table_gives_the_twins_pairs():
    """With the table as the kernel fills it (pairs[e] in every lane column of entry e), output c is
    pairs[byte c]: the bf16 pair the twin computes for that byte."""
    fw = to_nf4_frag(_nf4(16, 64))
    pairs = fw.pairs.numpy().view(np.uint32)
    image = np.zeros(256 * TABLE_STRIDE // 4, dtype=np.uint32)
    for col in range(32):
        image[(np.arange(256) * TABLE_STRIDE + 4 * col) // 4] = pairs
    words = np.arange(2 ** 16, dtype=np.uint64) * np.uint64(0x10001) ^ np.uint64(0x5A3C0000)
    lane = np.arange(words.size, dtype=np.uint64) % np.uint64(32)
    out = run_ptx(NF4_LOOKUP_ASM.value, [words], 4, lane=lane, shared=image.view(np.uint8))
    for c in range(4):
        np.testing.assert_array_equal(out[c], pairs[((words >> np.uint64(8 * c)) & np.uint64(0xFF)).astype(np.int64)])


def test_emulator_prmt_follows_ptx():
    """prmt.b32's default mode on known selectors: identity 0x3210, the bytes of b 0x7654, a byte replicated
    with its sign (bit 3 of the nibble), the address form the lookup uses (b byte 0, a byte 0, zeros of b)."""
    a, b = np.array([0x84838281], dtype=np.uint64), np.array([0x08070605], dtype=np.uint64)
    for sel, want in ((0x3210, 0x84838281), (0x7654, 0x08070605), (0x5504, 0x06068105), (0x0008, 0x818181FF)):
        got = run_ptx(f"prmt.b32 $0, $1, $2, {sel:#x};", [a, b], 1)[0]
        assert int(got[0]) == want, hex(sel)


# ---- the GEMV (the twin in the interpreter) ----------------------------------------------------

@pytest.mark.parametrize("out_f,in_f,M,dtype", [
    (296, 256, 1, torch.bfloat16), (264, 384, 3, torch.float16), (512, 128, 8, torch.bfloat16),
    (8, 64, 2, torch.float16), (520, 768, 5, torch.bfloat16), (264, 192, 9, torch.bfloat16),
    (40, 512, 16, torch.float16), (296, 320, 12, torch.bfloat16),
])
def test_twin_matches_the_reference(out_f, in_f, M, dtype):
    """Odd widths (padding), 1..16 rows, bf16 and fp16, one, two and four NF4 blocks a trip, split-K: each output
    within one rounding of the fp32 reference."""
    fw = to_nf4_frag(_nf4(out_f, in_f, dtype, seed=M))
    x = _x(M, in_f, dtype, seed=M)
    y = nf4_frag_linear(x, fw)
    assert y.dtype == dtype and y.shape == (M, out_f)
    _assert_one_rounding(y, nf4_frag_linear_ref(x, fw), x, fw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_twin_is_within_one_weight_rounding_of_bitsandbytes(dtype):
    """Against bitsandbytes' weights (code * absmax rounded to the dtype): each weight of the kernel
    (dtype-rounded code * absmax) is within two roundings of it, so the product is within 2 ulp of sum |x| |w|,
    plus the output's own rounding."""
    w = _nf4(264, 256, dtype, seed=4)
    fw = to_nf4_frag(w)
    x = _x(4, 256, dtype, seed=5)
    y = nf4_frag_linear(x, fw).float()
    ref = nf4_linear_ref(x.float(), w).float()
    scale = x.float().abs() @ dequantize_nf4(w, torch.float32).abs().t()
    assert ((y - ref).abs() <= 2 * ULP[dtype] * scale + ULP[dtype] * ref.abs()).all()


def test_fp32_sums_match_the_reference_to_fp32_rounding():
    """The split-K partials, summed, against the fp32 product with the kernel's weights: within fp32 rounding of
    sum |x| |w| (before the one rounding to the dtype)."""
    fw = to_nf4_frag(_nf4(264, 1024, seed=5))
    x = _x(4, 1024, seed=6)
    _, launches = mod._prepare(x, fw)
    kern, grid, args, constexprs, num_warps = launches[0]
    assert constexprs["WRITE_PARTIALS"] and grid[1] > 1 and constexprs["CHUNKS"] == 4
    kern.on(x)[grid](*args, **constexprs, num_warps=num_warps, num_stages=1)
    got = args[5].sum(0, dtype=torch.float64)
    w32 = dequantize_nf4_frag(fw, torch.float32).double()
    exact = x.double() @ w32.t()
    scale = x.double().abs() @ w32.abs().t()
    assert ((got - exact).abs() <= 8 * 2.0 ** -24 * 1024 ** 0.5 * scale + 1e-30).all()


def test_leading_dims_and_row_strides():
    """x [2, 3, K] and a row-strided view (no copy) give the rows of the plain call."""
    fw = to_nf4_frag(_nf4(64, 128, seed=7))
    x = _x(3, 128, seed=8, lead=(2,))
    y = nf4_frag_linear(x, fw)
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y.view(6, 64), nf4_frag_linear(x.reshape(6, 128), fw), rtol=0, atol=0)
    wide = _x(4, 256, seed=9)
    torch.testing.assert_close(nf4_frag_linear(wide[:, :128], fw), nf4_frag_linear(wide[:, :128].contiguous(), fw),
                               rtol=0, atol=0)


@pytest.mark.parametrize("call,err,match", [
    (lambda fw: nf4_frag_linear(_x(1, 128, torch.float16), fw), TypeError, "bfloat16"),
    (lambda fw: nf4_frag_linear(_x(17, 128), fw), ValueError, "at most 16 rows"),
    (lambda fw: nf4_frag_linear(_x(1, 64), fw), ValueError, r"\[\.\.\., 128\]"),
    (lambda fw: nf4_frag_linear(_x(1, 128), _nf4(64, 128)), TypeError, "Nf4FragWeight"),
])
def test_launcher_refuses_what_it_cannot_run(call, err, match):
    fw = to_nf4_frag(_nf4(64, 128))
    with pytest.raises(err, match=match):
        call(fw)


def test_empty_x_gives_an_empty_result():
    fw = to_nf4_frag(_nf4(64, 128))
    assert nf4_frag_linear(_x(0, 128), fw).shape == (0, 64)


# ---- the experiment's dispatch -----------------------------------------------------------------

def test_experiment_routes_eligible_rows_to_the_fragment_kernel():
    """With "nf4_frag": rows <= 16 in the weight's dtype take the fragment GEMV (its copy made once and kept on
    the weight); 17 rows, another dtype or a blocksize other than 64 take the bitsandbytes-layout kernels; without
    the experiment nothing changes."""
    w = _nf4(64, 128, seed=11)
    on = KernelOptions(experiments={"nf4_frag"})
    x = _x(2, 128, seed=12)
    assert nf4_frag_eligible(x, w) and not nf4_frag_eligible(_x(17, 128), w)
    assert not nf4_frag_eligible(x.float(), w)
    g = torch.Generator().manual_seed(0)
    assert not nf4_frag_eligible(x, quantize_nf4(torch.randn(64, 128, generator=g).bfloat16(), blocksize=128))
    y = ops.linear_nf4(x, w, options=on)
    fw = nf4_frag_of(w)
    assert nf4_frag_of(w) is fw
    torch.testing.assert_close(y, nf4_frag_linear(x, fw), rtol=0, atol=0)
    many = _x(17, 128, seed=13)
    torch.testing.assert_close(ops.linear_nf4(many, w, options=on), ops.linear_nf4(many, w), rtol=0, atol=0)


def test_custom_op_matches_the_launcher():
    """The op torch.compile sees (codellama_rt::nf4_frag_linear) gives the launcher's bits, and opcheck passes
    (schema, fake tensor)."""
    fw = to_nf4_frag(_nf4(64, 128, seed=14))
    x = _x(2, 128, seed=15)
    args = (x, fw.codes, fw.scales, fw.code, fw.values, fw.pairs, 64, 128, True)
    torch.testing.assert_close(ops._nf4_frag_linear_op(*args), nf4_frag_linear(x, fw), rtol=0, atol=0)
    torch.library.opcheck(ops._nf4_frag_linear_op, args, test_utils=("test_schema", "test_faketensor"))


# ---- the Gluon kernel, compiled ahead of time --------------------------------------------------

def test_aot_configs_compile(check_aot):
    """sm_80 and sm_90, bf16 and fp16: no spills; shared memory is exactly the 64 KiB table, the kernel's only
    allocation (the lookup's asm addresses it from `global_smem`, so nothing may sit before it)."""
    configs = mod.aot_configs(aot_models()) + mod.aot_configs(aot_models()[:1], dtypes=(torch.float16,))
    assert {c.kernel.__name__ for c in configs} == {"_nf4_frag_gemv_kernel"}
    rows = check_aot(configs)
    assert all(r.shared_bytes == 256 * TABLE_STRIDE for r in rows)


def test_the_table_is_the_only_shared_allocation():
    """The compiled kernel allocates shared memory once, at offset 0 (what `global_smem` points at)."""
    cfg = mod.aot_configs(aot_models()[:1], rows=(1,))[0]
    ttgir = compile_kernel(cfg, 90).asm["ttgir"]
    assert ttgir.count("ttg.local_alloc") == 1
    assert re.findall(r"allocation\.offset = (\d+)", ttgir) in ([], ["0"])


@pytest.mark.parametrize("arch", [80, 90])
def test_main_loop_meets_issue_20s_targets(arch):
    """The static table's figures at the 7B shapes: at most 1.5 SASS instructions a weight for M = 1 and 8, 2.0
    for M = 16 (two n8 column tiles), at least 32 KiB of loads in flight per SM, and the decoding at one PRMT and
    one LDS per byte of codes (two weights)."""
    for cfg in mod.aot_configs(aot_models()[:1]):
        stats = sass.loop_stats(cfg, arch)
        target = 1.5 if cfg.constexprs["MT"] == 8 else 2.0
        assert stats.per_weight <= target, f"{cfg.label} sm_{arch}: {stats.per_weight:.3f} SASS a weight"
        assert stats.in_flight_kib >= 32, f"{cfg.label} sm_{arch}: {stats.in_flight_kib:.1f} KiB in flight"
        loop = sass.main_loop(sass.disassemble(compile_kernel(cfg, arch).asm["cubin"]))
        ops_ = [re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for ins in loop]
        bytes_ = stats.weights_per_thread / 2
        assert bytes_ <= ops_.count("PRMT") <= bytes_ + 2 and ops_.count("LDS") == bytes_
