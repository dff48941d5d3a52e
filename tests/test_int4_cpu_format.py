"""int4 and NF4 held in the native CPU kernels' layout (kernels/int4_cpu_format.py, the cpu backend's
`held_part`): the conversions are lossless both ways, the projections are the native kernel's on the checkpoint
layout's weight bit for bit, a loaded model holds each weight once and computes exactly what it computed with
the checkpoint's layout plus a repack, and checkpoints are still written in GPTQ's / bitsandbytes' layouts."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.api import load_model
from codellama_rt.kernels import cpu_native
from codellama_rt.kernels.int4 import int4_linear_ref
from codellama_rt.kernels.int4_cpu_format import (Int4CpuWeight, Nf4CpuWeight, dequantize_int4_cpu,
                                                  dequantize_nf4_cpu, int4_cpu_linear_ref, nf4_cpu_linear_ref)
from codellama_rt.kernels.int4_format import Int4Weight, _pack_nibbles, dequantize_int4, quantize_int4
from codellama_rt.kernels.nf4 import nf4_linear_ref
from codellama_rt.kernels.nf4_format import dequantize_nf4, quantize_nf4
from codellama_rt.kernels.options import KernelOptions
from codellama_rt.quant.linear import QuantLinear, quantized_modules, set_module

native = pytest.mark.skipif(not cpu_native.available(), reason="native CPU kernels not built (no C++ compiler?)")
FP32 = KernelOptions(cpu_bf16_prefill=False)


def _weight(out_f: int, in_f: int, group: int, dtype: torch.dtype, seed: int = 0) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    w = quantize_int4(torch.randn(out_f, in_f, generator=g).to(dtype), group_size=group)
    z = torch.randint(0, 16, (in_f // group, out_f), generator=g, dtype=torch.uint8)  # every zero point 0..15
    w.qzeros = _pack_nibbles(z, dim=1)
    return w


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_conversion_is_lossless_both_ways(group, dtype):
    w = _weight(40, 256, group, dtype)
    c = Int4CpuWeight.from_int4(w)
    c.check()
    assert c.format == "int4_cpu" and c.dtype == dtype and c.shape == (40, 256)
    back = c.to_int4()
    for field in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(back, field), getattr(w, field)), field
    assert back.scales.dtype == dtype and back.group_size == group


def test_dequantized_weight_is_gptqs_to_fp32_rounding():
    w = _weight(24, 192, 64, torch.float32)
    got, want = dequantize_int4_cpu(Int4CpuWeight.from_int4(w)), dequantize_int4(w)
    assert torch.allclose(got, want, rtol=0, atol=2e-6 * want.abs().max().item())  # q s - z s against (q - z) s
    x = torch.randn(3, 192)
    assert torch.allclose(int4_cpu_linear_ref(x, Int4CpuWeight.from_int4(w)), int4_linear_ref(x, w), atol=1e-5)


def test_widths_the_kernels_cannot_take_are_refused():
    """One group per 48-wide row (a GPTQ checkpoint's group_size -1): not whole 32-input chunks."""
    w = Int4Weight(qweight=torch.zeros(6, 16, dtype=torch.int32), qzeros=torch.zeros(1, 2, dtype=torch.int32),
                   scales=torch.ones(1, 16), shape=(16, 48), group_size=48)
    w.check()
    with pytest.raises(ValueError, match="multiples of 32"):
        Int4CpuWeight.from_int4(w)
    assert cpu_native.cpu_layout(w) is w  # (such a weight stays in GPTQ's layout)


NF4_CASES = [((40, 256), 64, True), ((24, 1376), 64, True), ((16, 192), 128, False), ((8, 96), 32, True)]


@pytest.mark.parametrize("shape, blocksize, double_quant", NF4_CASES)  # (1376: blocks straddle rows)
def test_nf4_conversion_is_lossless_and_dequantizes_as_bitsandbytes(shape, blocksize, double_quant):
    w = quantize_nf4(torch.randn(shape).bfloat16(), blocksize=blocksize, double_quant=double_quant)
    c = Nf4CpuWeight.from_nf4(w)
    assert c.format == "nf4_cpu" and c.dtype == torch.bfloat16 and c.group_size == (
        blocksize if shape[1] % blocksize == 0 else 32)
    back = c.to_nf4()
    for field in ("codes", "absmax", "code", "nested_absmax", "nested_code"):
        a, b = getattr(back, field), getattr(w, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert (back.shape, back.dtype, back.blocksize, back.nested_offset) == (w.shape, w.dtype, w.blocksize,
                                                                             w.nested_offset)
    assert torch.equal(dequantize_nf4_cpu(c, torch.float32), dequantize_nf4(w, torch.float32))  # fp32 products
    x = torch.randn(3, shape[1])
    assert torch.equal(nf4_cpu_linear_ref(x, c), nf4_linear_ref(x, w))


@native
@pytest.mark.parametrize("rows", [1, 9, 40])
def test_nf4_projection_is_the_native_kernels_on_the_bitsandbytes_weight(rows):
    w = quantize_nf4(torch.randn(48, 1376))
    x = torch.randn(rows, 1376)
    got = cpu_native.nf4_cpu_linear_cpu(x, Nf4CpuWeight.from_nf4(w), options=FP32)
    assert torch.equal(got, cpu_native.nf4_linear_native(x, w, options=FP32))


@native
@pytest.mark.parametrize("rows", [1, 3, 9, 40])  # decode, verify blocks, prefill (dequantized, then the GEMM)
def test_projection_is_the_native_kernels_on_the_gptq_weight(rows):
    w = _weight(48, 704, 64, torch.float32)
    x = torch.randn(rows, 704)
    got = cpu_native.int4_cpu_linear_cpu(x, Int4CpuWeight.from_int4(w), options=FP32)
    assert torch.equal(got, cpu_native.int4_linear_native(x, w, options=FP32))
    bf16 = x.bfloat16()  # not the native kernel's (fp32 rows only): the reference's arithmetic
    assert torch.allclose(cpu_native.int4_cpu_linear_cpu(bf16, Int4CpuWeight.from_int4(w)).float(),
                          int4_linear_ref(bf16, w).float(), rtol=2e-2, atol=2e-2)


@native
@pytest.mark.parametrize("quantize", ["int4", "nf4"])
def test_a_loaded_model_holds_each_weight_once_and_computes_what_it_did(quantize):
    model = load_model(None, dtype="float32", quantize=quantize, group_size=64 if quantize == "int4" else None)
    mods = quantized_modules(model.module)
    assert mods and all(p.format == f"{quantize}_cpu" for q in mods.values() for p in q.parts)
    assert not any(name.endswith(("qweight", "qzeros")) for name, _ in model.module.named_buffers())
    ids = model.tokenizer.encode("def fibonacci(n):")
    held = model.generate(ids, max_new_tokens=24)
    logits = model.logits(ids)  # the module graph's prefill (the decode steps above: the native step)

    for name, q in mods.items():  # back to the checkpoint layout: the native kernels then run on a repack of it
        set_module(model.module, name, QuantLinear([p.to_int4() if quantize == "int4" else p.to_nf4()
                                                    for p in q.parts]))
    model.module.__dict__.pop("_native_decoder", None)
    model.engine._state.steps.clear()
    assert torch.equal(model.logits(ids), logits)
    assert model.generate(ids, max_new_tokens=24).token_ids == held.token_ids


@native
@pytest.mark.parametrize("quantize", ["int4", "nf4"])
def test_the_reference_backend_keeps_the_checkpoint_layout(quantize):
    model = load_model(None, dtype="float32", quantize=quantize, backend="reference")
    assert all(p.format == quantize for q in quantized_modules(model.module).values() for p in q.parts)
