"""The native CPU kernels of csrc/ (kernels/cpu_native.py): the projections equal their dequantize-then-matmul
references (fp32 to fp32 rounding; odd shapes, K and N tails, several rows, int4 groups 32/64/128/whole row,
GPTQ v1/v2 weights; NF4 through the int4 kernel with its codebook as the levels), the whole-step `Decoder`
equals the module graph (logits and the K/V it writes, rows at different positions, fp32/int8/int4/NF4), and
without the extension everything falls back to the PyTorch path with a one-line notice. Also the int8 format
itself (`kernels/int8_format.py`)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from codellama_rt.kernels import cpu_gemm, cpu_native
from codellama_rt.kernels.int4 import int4_linear_ref
from codellama_rt.kernels.int4_format import _pack_nibbles, dequantize_int4, quantize_int4, unpack_gptq
from codellama_rt.kernels.int8_format import (Int8Weight, dequantize_int8, int8_linear_ref, int8_linear_x16_ref,
                                              quantize_int8, quantize_x8, quantize_x16, rounded)
from codellama_rt.kernels.nf4 import nf4_linear_ref
from codellama_rt.kernels.nf4_format import dequantize_nf4, quantize_nf4
from codellama_rt.kernels.options import KernelOptions

TOL = 2e-6  # max|Δ| / max|ref|, fp32: the same products summed in another order
FP32 = KernelOptions(cpu_bf16_prefill=False)  # prefill rows stay fp32 (else bf16 where the CPU has it)
FP32_PRODUCTS = KernelOptions(cpu_bf16_prefill=False, cpu_integer_activations=False)  # decode rows not rounded

native = pytest.mark.skipif(not cpu_native.available(), reason="native CPU kernels not built (no C++ compiler?)")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


# ---- the int8 format ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_error_at_most_half_a_step(dtype):
    w = torch.randn(24, 40, generator=_g()).to(dtype)
    q = quantize_int8(w)
    assert q.qweight.dtype == torch.int8 and q.scales.dtype == dtype and q.qweight.abs().max() <= 127
    err = (dequantize_int8(q, torch.float32) - w.float()).abs()
    assert (err <= q.scales.float()[:, None] / 2 * (1 + 1e-6) + (0 if dtype == torch.float32 else 1e-2)).all()


def test_int8_grid_roundtrips_and_zero_rows():
    s = torch.tensor([0.5, 0.25, 1.0])
    q = torch.randint(-127, 128, (3, 16), generator=_g()).to(torch.int8)
    q[:, 0] = 127  # each row reaches the top of the grid, so its scale is found exactly
    w = q.float() * s[:, None]
    got = quantize_int8(w)
    assert torch.equal(got.qweight, q) and torch.equal(got.scales, s)
    zero = quantize_int8(torch.zeros(2, 8))
    assert torch.equal(dequantize_int8(zero), torch.zeros(2, 8))


@pytest.mark.parametrize("w,match", [(torch.zeros(4), "2-d"), (torch.zeros(2, 2, dtype=torch.float64), "dtype"),
                                     (torch.tensor([[1.0, float("nan")]]), "non-finite")])
def test_int8_quantize_rejects_bad_inputs(w, match):
    with pytest.raises((ValueError, TypeError), match=match):
        quantize_int8(w)


def test_int8_check_names_the_bad_field():
    q = quantize_int8(torch.randn(4, 8, generator=_g()))
    with pytest.raises(ValueError, match="scales"):
        Int8Weight(qweight=q.qweight, scales=q.scales[:2], shape=(4, 8)).check()
    with pytest.raises(ValueError, match="qweight"):
        Int8Weight(qweight=q.qweight.int(), scales=q.scales, shape=(4, 8)).check()


# ---- the projections ----------------------------------------------------------------------------

SHAPES = [(1, 5, 17), (3, 37, 85), (16, 64, 256), (2, 257, 704), (1, 4096, 256)]  # (rows, out, in)


@native
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_f32_equals_torch(M, N, K):
    w, x = torch.randn(N, K, generator=_g()), torch.randn(M, K, generator=_g(1))
    assert rel_err(torch.ops.codellama_rt_cpu.linear_f32(x, w), x @ w.T) < TOL


@native
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_equals_the_reference(M, N, K):
    w = quantize_int8(torch.randn(N, K, generator=_g()))
    x = torch.randn(2, M, K, generator=_g(1))
    got = cpu_native.int8_linear_cpu(x, w, options=FP32_PRODUCTS)
    assert got.shape == (2, M, N) and rel_err(got, int8_linear_ref(x, w)) < TOL


@native
@pytest.mark.parametrize("M,N,K", SHAPES + [(5, 9, 64), (4, 6, 1)])
def test_int8_x16_equals_its_reference(M, N, K):
    """x rounded to int16 blocks (csrc's quantize_x16, bitwise the Python one) times int8 rows: the kernel equals
    the reference matmul of the rounded x; both are within ~1e-4 of the fp32 products (x's rounding)."""
    w = quantize_int8(torch.randn(N, K, generator=_g()))
    x = torch.randn(M, K, generator=_g(1)) * torch.logspace(-3, 3, M)[:, None]  # (each row scaled alike)
    q, s = torch.ops.codellama_rt_cpu.quantize_x16(x)
    want_q, want_s = quantize_x16(x)
    assert torch.equal(q, want_q) and torch.equal(s, want_s)
    got = torch.ops.codellama_rt_cpu.linear_int8(x, w.qweight, w.scales, True)
    want = int8_linear_x16_ref(x, w)
    row_err = ((got - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
    assert row_err < TOL and rel_err(want, int8_linear_ref(x, w)) < 1e-4
    if cpu_native.integer_activations(KernelOptions()):  # the default decode path where the AVX2 kernel runs
        assert torch.equal(cpu_native.int8_linear_cpu(x, w, options=FP32), got)


@native
def test_x16_rounding_edge_cases():
    """Blocks of zeros, a NaN or an infinity (the block's outputs NaN, not a finite guess), values that round
    half to even, a tail block of one input."""
    x = torch.zeros(4, 129)
    x[1, :3] = torch.tensor([32767.0, 0.5, 1.5])  # s = 1: 0.5 -> 0, 1.5 -> 2
    x[2, 70], x[2, 128] = float("nan"), 2.0
    x[3, 5] = float("-inf")
    q, s = torch.ops.codellama_rt_cpu.quantize_x16(x)
    want_q, want_s = quantize_x16(x)
    assert torch.equal(q, want_q)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0, equal_nan=True)
    assert q.shape == (4, 192) and s.shape == (4, 3) and (q[:, 129:] == 0).all()
    assert q[1, :3].tolist() == [32767, 0, 2] and s[1, 0] == 1 and s[0].tolist() == [1, 1, 1]
    assert s[2].isnan().tolist() == [False, True, False] and q[2, 64:128].eq(0).all() and q[2, 128] == 32767
    w = quantize_int8(torch.randn(3, 129, generator=_g()))
    out = torch.ops.codellama_rt_cpu.linear_int8(x, w.qweight, w.scales, True)
    assert (out[0] == 0).all() and out[1].isfinite().all() and out[2:].isnan().all()


@native
def test_int8_bf16_scales_and_long_prefill():
    w = quantize_int8(torch.randn(48, 96, generator=_g()), dtype=torch.bfloat16)
    x = torch.randn(cpu_native.NATIVE_MAX_ROWS + 1, 96, generator=_g(1))  # past the native rows: the reference
    assert torch.equal(cpu_native.int8_linear_cpu(x, w, options=FP32), int8_linear_ref(x, w))
    assert rel_err(cpu_native.int8_linear_cpu(x[:3], w, options=FP32_PRODUCTS), int8_linear_ref(x[:3], w)) < TOL


@native
@pytest.mark.parametrize("M,N,K,g", [(1, 64, 96, 32), (3, 48, 128, 128), (7, 704, 256, 64), (16, 32, 704, 32),
                                     (2, 40, 704, 704)])
def test_int4_equals_the_reference(M, N, K, g):
    w = quantize_int4(torch.randn(N, K, generator=_g()), group_size=g if g <= 128 else 32)
    if g == K:  # one group per row, as GPTQ's group_size -1 loads: the first group's zeros and scales for all
        w = unpack_gptq(w.qweight, w.qzeros[:1], w.scales[:1], None, group_size=-1, checkpoint_format="gptq_v2")
        assert w.group_size == K
    x = torch.randn(M, K, generator=_g(1))
    got = cpu_native.int4_linear_native(x, w, options=FP32_PRODUCTS)
    assert got is not None and rel_err(got, int4_linear_ref(x, w)) < TOL
    # decode rows rounded to int8 blocks (llama.cpp's q8_0): the kernel equals the reference of the rounded x;
    # the rounding itself is within ~1% of the fp32 products
    q, s = torch.ops.codellama_rt_cpu.quantize_x8(x)
    want_q, want_s = quantize_x8(x)
    assert torch.equal(q, want_q) and torch.equal(s, want_s)
    c = cpu_native.native_copy(w)
    got = torch.ops.codellama_rt_cpu.linear_int4(x, c.codes, c.scales, c.zs, c.group_size, None, True)
    want = int4_linear_ref(rounded(x, want_q, want_s), w)
    assert rel_err(got, want) < TOL and rel_err(want, int4_linear_ref(x, w)) < 2e-2
    if cpu_native.integer_activations(KernelOptions()):  # the default decode path where the AVX2 kernel runs
        assert torch.equal(cpu_native.int4_linear_native(x, w), got)


@native
@pytest.mark.parametrize("M,N,K,blocksize,double_quant", [(1, 64, 96, 32, True), (3, 48, 128, 128, False),
                                                          (7, 704, 256, 64, True), (16, 40, 704, 64, False),
                                                          (2, 24, 512, 256, True), (3, 6, 96, 64, True),
                                                          (2, 8, 1376, 64, False)])
def test_nf4_equals_the_reference(M, N, K, blocksize, double_quant):
    """NF4 through the int4 kernel (codebook as the levels, absmax as the group scales, no zeros): the reference's
    products to fp32 rounding; prefill rows on the native dequantization, bitsandbytes' fp32 weights bit for bit.
    Blocks that straddle rows (96 and 1376 input columns, blocks of 64) take a scale per 32-weight chunk."""
    w = quantize_nf4(torch.randn(N, K, generator=_g()), blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(M, K, generator=_g(1))
    got = cpu_native.nf4_linear_native(x, w)
    assert got is not None and rel_err(got, nf4_linear_ref(x, w)) < TOL
    c = cpu_native.native_copy(w)
    group = blocksize if K % blocksize == 0 else 32
    assert cpu_native.nf4_group(w) == group == c.group_size and c.scales.shape == (N, K // group)
    dense = torch.ops.codellama_rt_cpu.dequantize_int4(c.codes, c.scales, torch.empty(0), group, c.levels)
    assert torch.equal(dense, dequantize_nf4(w, torch.float32))
    many = torch.randn(cpu_native.NATIVE_MAX_ROWS + 1, K, generator=_g(2))
    assert rel_err(cpu_native.nf4_linear_native(many, w, options=FP32), nf4_linear_ref(many, w)) < TOL


@native
def test_nf4_cases_the_kernel_cannot_take_fall_back():
    """bf16 rows, and an input width that is not a multiple of 32: no native result, and the cpu backend's op
    gives the reference's."""
    w = quantize_nf4(torch.randn(16, 64, generator=_g()).bfloat16())
    assert cpu_native.nf4_linear_native(torch.randn(2, 64, generator=_g(1)).bfloat16(), w) is None
    odd = quantize_nf4(torch.randn(6, 80, generator=_g()), blocksize=64)
    x = torch.randn(2, 80, generator=_g(1))
    assert not cpu_native.nf4_supported(odd) and cpu_native.nf4_linear_native(x, odd) is None
    torch.testing.assert_close(cpu_native.nf4_linear_cpu(x, odd), nf4_linear_ref(x, odd), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["int8", "int4", "int4-torch", "nf4", "nf4-torch"])
def test_prefill_rows_run_in_bf16_where_the_cpu_has_it(monkeypatch, kind):
    """Past NATIVE_MAX_ROWS rows, with `cpu_bf16_prefill` (the default) on a CPU with fast bf16 GEMMs: x and the
    dequantized weight in bf16, fp32 sums, the output rounded to bf16 (exactly `linear_bf16` of the bf16
    weight; within bf16 rounding of the fp32 reference). Decode rows, the option off, or a CPU without bf16 dot
    products keep fp32. int4-torch, nf4-torch: the same without the extension (the reference's dequantization)."""
    from codellama_rt.kernels import int4_cpu

    if kind.endswith("-torch"):
        monkeypatch.setattr(cpu_native, "_ext", None)
    elif not cpu_native.available():
        pytest.skip("native CPU kernels not built (no C++ compiler?)")
    monkeypatch.setattr(cpu_gemm, "_bf16_gemm", True)  # the path's logic on any CPU (bf16 GEMMs run anywhere)
    w32 = torch.randn(48, 128, generator=_g())
    if kind == "int8":
        w = quantize_int8(w32)
        op, ref, dense = cpu_native.int8_linear_cpu, int8_linear_ref, dequantize_int8(w, torch.float32)
    elif kind.startswith("nf4"):
        w = quantize_nf4(w32)
        op, ref, dense = cpu_native.nf4_linear_cpu, nf4_linear_ref, dequantize_nf4(w, torch.float32)
    else:
        w = quantize_int4(w32, group_size=64)
        op, ref, dense = int4_cpu.int4_linear_cpu, int4_linear_ref, dequantize_int4(w, torch.float32)
    x = torch.randn(cpu_native.NATIVE_MAX_ROWS + 1, 128, generator=_g(1))
    got = op(x, w)
    assert torch.equal(got, cpu_gemm.linear_bf16(x, dense.to(torch.bfloat16)))
    assert got.dtype == torch.float32 and 0 < rel_err(got, ref(x, w)) < 2e-2
    assert rel_err(op(x, w, options=FP32), ref(x, w)) < TOL
    decode_ref = ref
    if cpu_native.integer_activations(KernelOptions()) and kind in ("int8", "int4"):  # decode rows rounded
        decode_ref = int8_linear_x16_ref if kind == "int8" else lambda x, w: ref(rounded(x, *quantize_x8(x)), w)
    assert rel_err(op(x[:3], w), decode_ref(x[:3], w)) < TOL
    monkeypatch.setattr(cpu_gemm, "_bf16_gemm", False)
    assert rel_err(op(x, w), ref(x, w)) < TOL


@native
@pytest.mark.parametrize("kind", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("bf16", [True, False])
def test_prefill_dequantizes_a_chunk_of_rows_at_a_time(monkeypatch, kind, bf16):
    """Prefill rows multiply the weight dequantized PREFILL_CHUNK weights' worth of output rows at a time (the
    whole dequantized weight never exists: ~540 MB for a 7B w13), giving what the whole weight gives."""
    monkeypatch.setattr(cpu_gemm, "_bf16_gemm", bf16)
    w32 = torch.randn(48, 128, generator=_g())
    w, op = {"int8": (quantize_int8(w32), cpu_native.int8_linear_cpu),
             "int4": (quantize_int4(w32, group_size=64), cpu_native.int4_linear_native),
             "nf4": (quantize_nf4(w32), cpu_native.nf4_linear_cpu)}[kind]
    x = torch.randn(cpu_native.NATIVE_MAX_ROWS + 5, 128, generator=_g(1))
    whole = op(x, w)
    seen = []
    gemm = cpu_native.gemm
    monkeypatch.setattr(cpu_native, "gemm", lambda a, b: seen.append(b.shape[0]) or gemm(a, b))
    monkeypatch.setattr(cpu_native, "PREFILL_CHUNK", 5 * 128)
    got = op(x, w)
    assert seen == [5] * 9 + [3]
    assert rel_err(got, whole) < (1e-2 if bf16 else TOL)


def test_the_option_is_bound_into_the_cpu_backend():
    """`kernel_options` reaches the cpu backend's quantized projections (and only them)."""
    from codellama_rt.model.backends import resolve_backend

    cpu = resolve_backend("cpu", torch.device("cpu"), FP32)
    assert cpu.linear_int8.keywords == {"options": FP32} and cpu.linear_int4.keywords == {"options": FP32}


@native
@pytest.mark.parametrize("kind,K", [("f32", 256), ("f32", 85), ("int8", 256), ("int8", 85), ("int8-x16", 256),
                                    ("int8-x16", 85), ("int4", 256), ("int4", 544), ("int4-x8", 544), ("nf4", 544)])
def test_a_rows_result_does_not_depend_on_the_other_rows(kind, K):
    """Rows are tiled several at a time (XROWS x-rows per weight load): each row's outputs are still exactly
    (bitwise) what it gets alone, for every row count, so a verify pass scores a token as a decode step does.
    K = 85: a tail past the vector width; 544: int4 past one dequantized span (AVX2)."""
    N = 40 if kind.startswith(("int4", "nf4")) else 37  # (int4 packs 8 rows a word; 37: a tail past 4-row blocks)
    w = torch.randn(N, K, generator=_g())
    x = torch.randn(11, K, generator=_g(1))
    if kind == "f32":
        op = lambda rows: torch.ops.codellama_rt_cpu.linear_f32(rows, w)  # noqa: E731
    elif kind.startswith("int8"):
        q = quantize_int8(w)
        x16 = kind == "int8-x16"
        op = lambda rows: torch.ops.codellama_rt_cpu.linear_int8(rows, q.qweight, q.scales, x16)  # noqa: E731
    elif kind.startswith("int4"):
        q = quantize_int4(w, group_size=32)
        opts = KernelOptions(cpu_integer_activations=kind == "int4-x8")
        op = lambda rows: cpu_native.int4_linear_native(rows, q, options=opts)  # noqa: E731
    else:
        q = quantize_nf4(w, blocksize=32)
        op = lambda rows: cpu_native.nf4_linear_native(rows, q)  # noqa: E731
    alone = torch.cat([op(x[i:i + 1]) for i in range(11)])
    for M in (2, 3, 4, 5, 8, 11):
        assert torch.equal(op(x[:M]), alone[:M]), M


@native
def test_decoder_rows_of_one_slot_equal_successive_steps():
    """T rows of one cache slot at consecutive positions (`slots`): every row's K/V is written before any row
    attends, so the logits and the cache equal T one-row steps in order, bitwise."""
    from codellama_rt.model.native_decoder import native_decoder

    model = _models(None)[0]
    step = native_decoder(model)
    a, S = model.args, 32
    caches = [torch.zeros(a.n_layers, 2, 3, a.n_kv_heads, S, a.head_dim) for _ in range(2)]
    caches[0].normal_(generator=_g(5))
    caches[1].copy_(caches[0])
    tokens, positions = torch.tensor([7, 300, 11, 2000, 5]), torch.arange(9, 14)
    with torch.inference_mode():
        together = step(tokens, positions, caches[0], torch.full((5,), 2, dtype=torch.long))
        one_by_one = []
        for i in range(5):  # slot 2 as row 0 of a cache view holding only that slot
            view = caches[1][:, :, 2:3].clone()
            one_by_one.append(step(tokens[i:i + 1], positions[i:i + 1], view))
            caches[1][:, :, 2:3].copy_(view)
    assert torch.equal(together, torch.cat(one_by_one))
    assert torch.equal(caches[0], caches[1])
    with pytest.raises(RuntimeError, match="slot 3"):
        step(tokens[:1], positions[:1], caches[0], torch.tensor([3]))


@native
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_int4_gptq_weights(checkpoint_format):
    w = quantize_int4(torch.randn(64, 128, generator=_g()), group_size=64)
    if checkpoint_format == "gptq":  # v1 stores zero - 1: shift the zeros so each is at least 1
        z = w.unpack()[1].clamp(min=1)
        w.qzeros = _pack_nibbles(z - 1, dim=1)
    loaded = unpack_gptq(w.qweight, w.qzeros, w.scales, None, group_size=64, checkpoint_format=checkpoint_format)
    x = torch.randn(2, 128, generator=_g(1))
    assert rel_err(cpu_native.int4_linear_native(x, loaded, options=FP32_PRODUCTS), int4_linear_ref(x, loaded)) < TOL
    if cpu_native.integer_activations(KernelOptions()):  # the default decode rows' rounding there
        x8 = rounded(x, *quantize_x8(x))
        assert rel_err(cpu_native.int4_linear_native(x, loaded), int4_linear_ref(x8, loaded)) < TOL


@native
@pytest.mark.parametrize("N", [1, 13, 22])
def test_int4_op_single_rows_against_a_literal_dequantization(N):
    """The op itself on repacked codes, N not a multiple of the 4-row blocks: W = q s - zs per group."""
    K, g = 96, 32
    q = torch.randint(0, 16, (N, K), generator=_g())
    s, zs = torch.rand(N, K // g, generator=_g(1)) + 0.1, torch.randn(N, K // g, generator=_g(2))
    chunks = q.view(N, K // 32, 2, 16)
    codes = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(N, K // 2).to(torch.uint8).contiguous()
    W = q.float() * s.repeat_interleave(g, 1) - zs.repeat_interleave(g, 1)
    x = torch.randn(3, K, generator=_g(3))
    got = torch.ops.codellama_rt_cpu.linear_int4(x, codes, s, zs, g)
    assert rel_err(got, x @ W.T) < 1e-5


@native
def test_int4_prefill_rows_dequantize_natively_and_other_cases_return_none():
    w = quantize_int4(torch.randn(16, 64, generator=_g()), group_size=32)
    x = torch.randn(cpu_native.NATIVE_MAX_ROWS + 1, 64, generator=_g(1))
    assert rel_err(cpu_native.int4_linear_native(x, w, options=FP32), int4_linear_ref(x, w)) < TOL
    c = cpu_native.native_copy(w)
    want = dequantize_int4(w, torch.float32)  # q s - (z s) against (q - z) s: z s is rounded once in fp32
    assert rel_err(torch.ops.codellama_rt_cpu.dequantize_int4(c.codes, c.scales, c.zs, 32), want) < 1e-6
    assert cpu_native.int4_linear_native(x.to(torch.bfloat16), w) is None  # not fp32 rows


@native
def test_bad_arguments_raise_naming_them():
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.codellama_rt_cpu.linear_f32(torch.randn(1, 17), w)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.codellama_rt_cpu.linear_f32(torch.randn(1, 16).double(), w)
    with pytest.raises(RuntimeError, match="int8 scale"):
        torch.ops.codellama_rt_cpu.linear_int8(torch.randn(1, 16), w.to(torch.int8), torch.ones(3))
    with pytest.raises(RuntimeError, match="multiples of 32"):
        torch.ops.codellama_rt_cpu.linear_int4(torch.randn(1, 48), torch.zeros(8, 24, dtype=torch.uint8),
                                               torch.ones(8, 3), torch.ones(8, 3), 16)
    with pytest.raises(RuntimeError, match="levels"):
        torch.ops.codellama_rt_cpu.linear_int4(torch.randn(1, 64), torch.zeros(8, 32, dtype=torch.uint8),
                                               torch.ones(8, 2), torch.empty(0), 32, torch.ones(8))
    with pytest.raises(RuntimeError, match="int8 activations takes no levels"):
        torch.ops.codellama_rt_cpu.linear_int4(torch.randn(1, 64), torch.zeros(8, 32, dtype=torch.uint8),
                                               torch.ones(8, 2), torch.empty(0), 32, torch.ones(16), True)
    with pytest.raises(RuntimeError, match="x must be a contiguous fp32"):
        torch.ops.codellama_rt_cpu.quantize_x8(torch.randn(2, 32).double())


# ---- argmax over rows (sampling) ----------------------------------------------------------------

def _argmax_cases():
    """(name, x fp32 [B, V]): random values, ties (the first index wins), odd widths either side of the 16
    lanes, and rows that are not finite (NaN in the first lanes or the tail, +inf, only -inf)."""
    g = _g(5)
    cases = [(f"random-{V}", torch.randn(3, V, generator=g)) for V in (1, 7, 16, 17, 33, 1000, 32016)]
    cases += [(f"ties-{V}", torch.randint(-2, 2, (5, V), generator=g).float()) for V in (2, 15, 16, 31, 48, 101)]
    top = torch.zeros(2, 64)
    top[:, [5, 21, 37, 53]] = 1.0  # one maximum per lane position: the lanes' reduction picks the first
    cases.append(("lane-ties", top))
    bad = torch.randn(6, 40, generator=g)
    bad[0, 3], bad[1, 39], bad[2, 20] = float("nan"), float("nan"), float("inf")
    bad[3] = float("-inf")
    bad[4, :10] = float("-inf")  # a finite row with some -inf (a masked vocabulary): its argmax stands
    cases.append(("nonfinite", bad))
    return cases


def _argmax_want(x, nonfinite):
    return torch.argmax(x, dim=-1).masked_fill(~torch.isfinite(x.amax(dim=-1)), nonfinite)


@pytest.mark.parametrize("name,x", _argmax_cases(), ids=[c[0] for c in _argmax_cases()])
def test_argmax_rows_equals_torch_and_marks_nonfinite_rows(name, x):
    got = cpu_native.argmax_rows(x, -1)
    assert got.dtype == torch.int64 and torch.equal(got, _argmax_want(x, -1))
    if name == "nonfinite":
        assert got[:4].tolist() == [-1] * 4 and got[4] >= 10 and got[5] >= 0
    for strided in (x.t().contiguous().t(), torch.cat([x, x], dim=1)[:, :x.shape[1]]):  # no native kernel
        assert torch.equal(cpu_native.argmax_rows(strided, 7), _argmax_want(x, 7))


@native
def test_argmax_rows_native_kernel_arguments(monkeypatch):
    x = torch.randn(9, 32016, generator=_g(2))
    assert torch.equal(cpu_native.extension().argmax_rows(x, -1), x.argmax(dim=-1))
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_native.extension().argmax_rows(x.double(), -1)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_native.extension().argmax_rows(torch.empty(2, 0), -1)
    monkeypatch.setattr(cpu_native, "_ext", None)  # the fallback gives the same
    assert torch.equal(cpu_native.argmax_rows(x, -1), x.argmax(dim=-1))


# ---- the whole decode step ----------------------------------------------------------------------

def _models(quantize, **kernel_options):
    """(the cpu backend's model, the module graph its native step must equal): the reference backend's, or for
    int8 / int4 with decode rows rounded to integers (`cpu_native.integer_activations`) the cpu model's own graph,
    whose projections round them the same way."""
    from codellama_rt.api import load_model

    kw = dict(dtype="float32", quantize=quantize, group_size=64 if quantize == "int4" else None)
    model = load_model(None, kernel_options=kernel_options or None, **kw).module
    if quantize in ("int8", "int4") and cpu_native.integer_activations(model.ops.options):
        return model, model
    return model, load_model(None, backend="reference", **kw).module


@native
@pytest.mark.parametrize("quantize", [None, "int8", "int8-fp32-products", "int4", "int4-fp32-products", "nf4"])
def test_decoder_equals_the_module_graph(quantize):
    """Three rows at positions 0, 17 and the cache's last over a cache of 4 rows holding random past K/V:
    the native step's logits and the K/V it writes equal the module graph (`_models`)."""
    from codellama_rt.model.native_decoder import native_decoder

    if quantize and quantize.endswith("-fp32-products"):
        model, ref = _models(quantize.split("-")[0], cpu_integer_activations=False)
    else:
        model, ref = _models(quantize)
    step = native_decoder(model)
    assert step is not None and native_decoder(model) is step  # built once, kept on the model
    if model is ref:  # rows rounded to integers: a last-bit difference in an activation (the two orders of fp32
        # sums) can move its code by one step, 1/32767 (int16) or 1/127 (int8) of its block's largest
        tol = 3e-4 if quantize == "int8" else 3e-3
        _step_equals_the_graph(step, model, ref, tol=tol, cache_tol=tol)
    else:
        _step_equals_the_graph(step, model, ref)


def _step_equals_the_graph(step, model, ref, tol=1e-5, cache_tol=1e-6):
    from codellama_rt.model.kv_cache import KVCache
    from codellama_rt.model.transformer import Decode

    S = 48
    caches = [KVCache(model.args, 4, S, torch.float32, "cpu") for _ in range(2)]
    caches[0].data.normal_(generator=_g(5))
    caches[1].data.copy_(caches[0].data)
    tokens, positions = torch.tensor([5, 100, model.args.vocab_size - 1]), torch.tensor([0, 17, S - 1])
    with torch.inference_mode():
        got = step(tokens, positions, caches[0].data)
        want = ref(tokens[:, None], Decode(positions, S), caches[1])[:, -1]
    assert got.shape == want.shape == (3, model.args.vocab_size)
    assert rel_err(got, want) < tol
    assert rel_err(caches[0].data, caches[1].data) < cache_tol


@native
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_prefill_chunks_through_the_native_step_near_the_graph(quantize):
    """DecodeState.prefill on the CPU (the native step with prompt=True: a packed GEMM, transposed-key attention) and
    with the module graph: a 37-row chunk at position 0, then 29 rows after it (a cached prefix), into cache row 1;
    the last row's logits and every K / V written agree to fp32 rounding (bf16 off)."""
    from codellama_rt.api import load_model
    from codellama_rt.engine.decode_state import DecodeState

    model = load_model(None, dtype="float32", quantize=quantize, kernel_options=FP32_PRODUCTS).module
    ids = [(7 * i + 3) % model.args.vocab_size for i in range(66)]
    got = {}
    for native in (True, False):
        if not native:  # (the model's kept native step set aside: `ops.decoder` then gives None)
            model.__dict__["_native_decoder"] = False
        state = DecodeState(model, max_batch=2, max_seq_len=128, graphed=False, vocab_limit=model.args.vocab_size)
        state.ensure(128, set())
        with torch.inference_mode():
            first = state.prefill(ids[:37], 0, 1)
            second = state.prefill(ids[37:], 37, 1)
        got[native] = first, second, state.cache.data[:, :, 1, :, :66].clone()
    model.__dict__.pop("_native_decoder")
    for g, w in zip(got[True], got[False]):
        assert g.shape == w.shape and rel_err(g, w) < 1e-5


@native
def test_int8_weight_rows_one_at_a_time_give_the_same_logits(monkeypatch):
    """int8 decode rows (fp32 products) read the weight rows one at a time where `int8_one_row` says the weights
    stream from DRAM, else four side by side: the same sums, so the same logits, bitwise; and a decode row
    equals the first row of a verify block of five (tiles of several x rows) either way."""
    from codellama_rt.model import native_decoder as nd

    model = _models("int8", cpu_integer_activations=False)[0]
    a, S = model.args, 32
    cache = torch.randn(a.n_layers, 2, 1, a.n_kv_heads, S, a.head_dim, generator=_g(3))
    got = {}
    for one_row in (False, True):
        monkeypatch.setattr(nd, "int8_one_row", lambda parts, isa, on=one_row: on)
        model.__dict__.pop(nd._ATTR, None)
        step = nd.native_decoder(model)
        with torch.inference_mode():
            got[one_row] = [step(torch.tensor([7]), torch.tensor([4]), cache.clone()),
                            step(torch.tensor([7, 9, 11, 13, 15]), torch.arange(4, 9), cache.clone(),
                                 torch.zeros(5, dtype=torch.long))]
    assert all(torch.equal(g, w) for g, w in zip(got[True], got[False]))
    assert torch.equal(got[True][0][0], got[True][1][0])


def test_int8_rows_stream_one_at_a_time_only_past_the_cache_on_avx512():
    from codellama_rt.model.native_decoder import int8_one_row

    def parts(kind, n_bytes):
        return [(kind, torch.zeros(n_bytes, dtype=torch.int8), torch.zeros(0), torch.zeros(0))]

    big, small = parts(1, 40 << 20), parts(1, 4 << 20)
    assert int8_one_row(big, "avx512", cache_bytes=32 << 20)
    assert not int8_one_row(small, "avx512", cache_bytes=32 << 20)  # cache-resident: four rows side by side
    assert not int8_one_row(big, "avx2", cache_bytes=32 << 20)  # (not measured there)
    assert not int8_one_row(big, "avx512", cache_bytes=0)  # cache size unknown
    assert not int8_one_row(parts(0, 40 << 20), "avx512", cache_bytes=32 << 20)  # no int8 weights


def test_last_level_cache_bytes_reads_sysfs(tmp_path):
    from codellama_rt.model.native_decoder import last_level_cache_bytes

    for name, level, size in [("index0", 1, "48K"), ("index2", 2, "1024K"), ("index3", 3, "32768K")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(f"{level}\n")
        (tmp_path / name / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 32 << 20
    (tmp_path / "index3" / "size").write_text("lots\n")
    assert last_level_cache_bytes(tmp_path) == 0
    assert last_level_cache_bytes(tmp_path / "missing") == 0


@native
def test_decoder_rejects_bad_steps():
    from codellama_rt.model.native_decoder import native_decoder

    model = _models(None)[0]
    step = native_decoder(model)
    a = model.args
    cache = torch.zeros(a.n_layers, 2, 1, a.n_kv_heads, 8, a.head_dim)
    with pytest.raises(RuntimeError, match="token id"):
        step(torch.tensor([a.vocab_size]), torch.tensor([0]), cache)
    with pytest.raises(RuntimeError, match="position 8"):
        step(torch.tensor([1]), torch.tensor([8]), cache)
    with pytest.raises(RuntimeError, match="cache"):
        step(torch.tensor([1, 2]), torch.tensor([0, 0]), cache)  # two rows, a cache of one


@native
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_greedy_tokens_with_the_native_step_equal_the_graph(quantize):
    from codellama_rt.api import load_model

    prompts = ["def fibonacci(n):", "class Stack:\n    def __init__(self):\n"]
    got = [c.token_ids for c in load_model(None, dtype="float32", quantize=quantize).generate(prompts,
                                                                                             max_new_tokens=24)]
    want = [c.token_ids for c in load_model(None, backend="reference", dtype="float32",
                                            quantize=quantize).generate(prompts, max_new_tokens=24)]
    assert got == want


def test_without_the_extension_the_pytorch_path_runs_with_one_notice(monkeypatch, capsys):
    from codellama_rt.api import load_model
    from codellama_rt.model.native_decoder import native_decoder

    monkeypatch.setattr(cpu_native, "_ext", None)
    monkeypatch.setattr(cpu_native, "_noticed", False)
    w = quantize_int8(torch.randn(16, 32, generator=_g()))
    x = torch.randn(2, 32, generator=_g(1))
    assert torch.equal(cpu_native.int8_linear_cpu(x, w), int8_linear_ref(x, w))
    model = load_model(None, dtype="float32", quantize="int8")
    assert native_decoder(model.module) is None
    out = model.generate("def f(x):", max_new_tokens=4)
    assert len(out.token_ids) == 4
    err = capsys.readouterr().err
    assert err.count("native CPU kernels not built") == 1


def test_the_decoder_stays_off_where_it_does_not_apply():
    from codellama_rt.api import load_model
    from codellama_rt.model.native_decoder import native_decoder

    assert native_decoder(load_model(None, dtype="bfloat16").module) is None  # fp32 activations only



@native
def test_a_projection_of_several_parts_runs_them_side_by_side():
    """bitsandbytes checkpoints keep q, k, v (gate, up) as NF4 tensors of their own: the native step runs a
    projection's parts into one output (no stacked copy), whatever their formats, blocksizes or codebooks,
    equal to the module graph."""
    from codellama_rt.model.native_decoder import native_decoder
    from codellama_rt.quant.linear import QuantLinear, set_module

    model, ref = _models(None, cpu_integer_activations=False)  # (the reference's int8 arithmetic)
    q, k, v = model.layers[0].attn.wqkv.weight.detach().split([256, 64, 64])
    other = quantize_nf4(v, blocksize=32)
    qkv = QuantLinear([quantize_nf4(q), quantize_nf4(k, blocksize=128),
                       dataclasses.replace(other, code=other.code * 0.5)])  # a codebook of its own
    gate, up = model.layers[1].mlp.w13.weight.detach().chunk(2)
    w13 = QuantLinear([quantize_int8(gate), quantize_nf4(up)])
    for m in (model, ref):
        set_module(m, "layers.0.attn.wqkv", qkv)
        set_module(m, "layers.1.mlp.w13", w13)
    step = native_decoder(model)
    assert step is not None
    _step_equals_the_graph(step, model, ref)
