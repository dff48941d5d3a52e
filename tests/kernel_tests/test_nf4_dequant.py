"""The NF4 dequantization kernel (kernels/nf4_dequant.py, Triton's interpreter): bitwise `dequantize_nf4`
(bitsandbytes' dequantize_4bit) for every dtype, with and without double quant, blocksizes other than 64, odd
and partial-block sizes; its refusals; the experiment "nf4_dequant_gemm" giving prefill rows `nf4_linear_ref`'s
exact result (and leaving decode rows alone), through the op torch.compile sees too; its AOT compile."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.bench.common import aot_models
from codellama_rt.kernels import nf4_dequant as mod
from codellama_rt.kernels import ops
from codellama_rt.kernels.nf4 import nf4_linear, nf4_linear_ref
from codellama_rt.kernels.nf4_format import dequantize_nf4, quantize_nf4
from codellama_rt.kernels.options import KernelOptions

ON = KernelOptions(experiments={"nf4_dequant_gemm"})


def _weight(out_f, in_f, dtype=torch.bfloat16, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(out_f, in_f, generator=g).to(dtype), **kw)


@pytest.mark.parametrize("out_f,in_f,kw", [(40, 64, {}), (296, 256, {"double_quant": False}), (8, 384, {}),
                                           (7, 33, {}), (5, 100, {"blocksize": 128}), (3, 1030, {"blocksize": 32}),
                                           (130, 512, {"nested_blocksize": 3})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_bitwise_dequantize_nf4(out_f, in_f, kw, dtype):
    """Odd sizes (a half byte of padding, a partial last block), blocksizes 32/64/128, with and without double
    quant: the reference's bits, in the weight's dtype and in another."""
    w = _weight(out_f, in_f, dtype, seed=out_f, **kw)
    got = mod.dequantize_nf4_triton(w)
    assert got.shape == (out_f, in_f) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, dequantize_nf4(w))
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    assert torch.equal(mod.dequantize_nf4_triton(w, other), dequantize_nf4(w, other))


def test_refusals():
    w = _weight(16, 64)
    with pytest.raises(TypeError, match="NF4Weight"):
        mod.dequantize_nf4_triton(torch.zeros(16, 64), torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        mod.dequantize_nf4_triton(w, torch.int8)
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        mod.nf4_dequant_linear(torch.zeros(20, 32, dtype=torch.bfloat16), w)
    with pytest.raises(TypeError, match="weight's dtype"):
        mod.nf4_dequant_linear(torch.zeros(20, 64), w)


def test_experiment_gives_prefill_rows_the_references_exact_result():
    """More than 16 rows: F.linear of the dequantized weight, which is what `nf4_linear_ref` computes (bitwise
    here), eager and through the custom op; 16 rows or fewer keep the decode kernels."""
    w = _weight(96, 128, seed=3)
    x = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = ops.linear_nf4(x, w, options=ON)
    assert got.shape == (2, 9, 96) and torch.equal(got, nf4_linear_ref(x, w))
    args = (x, *ops._nf4_fields(w))
    assert torch.equal(ops._nf4_dequant_linear_op(*args), got)
    torch.library.opcheck(ops._nf4_dequant_linear_op, args, test_utils=("test_schema", "test_faketensor"))
    few = x[0, :16]
    assert torch.equal(ops.linear_nf4(few, w, options=ON), nf4_linear(few, w))


def test_aot_configs_compile(check_aot):
    configs = mod.aot_configs(aot_models())
    assert {c.kernel.__name__ for c in configs} == {"_nf4_dequant_kernel"}
    check_aot(configs)
