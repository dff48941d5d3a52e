"""The int4 dequantization kernel (kernels/int4_dequant.py, Triton's interpreter): bitwise `dequantize_int4` for
every group size, dtype and odd width; its refusals; the experiment "int4_dequant_gemm" giving prefill rows
`int4_linear_ref`'s exact result (and leaving decode rows alone); its AOT compile."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.bench.common import aot_models
from codellama_rt.kernels import int4_dequant as mod
from codellama_rt.kernels.int4 import int4_linear, int4_linear_ref
from codellama_rt.kernels.int4_format import dequantize_int4, quantize_int4, unpack_gptq
from codellama_rt.kernels.options import KernelOptions

ON = KernelOptions(experiments={"int4_dequant_gemm"})


def _weight(out_f, in_f, group_size, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_int4(torch.randn(out_f, in_f, generator=g), group_size=group_size, dtype=dtype)


@pytest.mark.parametrize("out_f,in_f,group_size", [(40, 64, 32), (296, 256, 64), (8, 384, 128), (264, 96, 32),
                                                   (136, 256, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_bitwise_dequantize_int4(out_f, in_f, group_size, dtype):
    w = _weight(out_f, in_f, group_size if group_size > 0 else 32, dtype=dtype, seed=out_f)
    if group_size < 0:  # one group a row, as GPTQ's group_size -1 loads (group K = 256: tiles of 128)
        w = unpack_gptq(w.qweight, w.qzeros[:1], w.scales[:1], None, group_size=-1, checkpoint_format="gptq_v2")
        assert w.group_size == in_f
    got = mod.dequantize_int4_triton(w, dtype)
    assert got.shape == (out_f, in_f) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, dequantize_int4(w, dtype))
    other = torch.bfloat16 if dtype != torch.bfloat16 else torch.float32  # scales read as fp32 whatever they are
    assert torch.equal(mod.dequantize_int4_triton(w, other), dequantize_int4(w, other))


def test_refusals():
    w = _weight(16, 64, 32)
    with pytest.raises(TypeError, match="Int4Weight"):
        mod.dequantize_int4_triton(torch.zeros(16, 64), torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        mod.dequantize_int4_triton(w, torch.int8)


def test_experiment_gives_prefill_rows_the_references_exact_result():
    """More than 16 rows: F.linear of the dequantized weight, which is what `int4_linear_ref` computes (bitwise
    here); 16 rows or fewer keep the decode GEMV; a bad x is refused as without the experiment."""
    w = _weight(96, 128, 64, seed=3)
    x = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = int4_linear(x, w, options=ON)
    assert got.shape == (2, 9, 96) and torch.equal(got, int4_linear_ref(x, w))
    few = x[0, :16]
    assert torch.equal(int4_linear(few, w, options=ON), int4_linear(few, w))
    with pytest.raises(ValueError, match=r"\[\.\.\., 128\]"):
        int4_linear(torch.zeros(20, 64, dtype=torch.bfloat16), w, options=ON)


def test_aot_configs_compile(check_aot):
    configs = mod.aot_configs(aot_models())
    assert {c.kernel.__name__ for c in configs} == {"_int4_dequant_kernel"}
    check_aot(configs)
