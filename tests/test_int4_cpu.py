"""int4 projections through torch's packed CPU kernel (`kernels/int4_cpu.py`, the "cpu" backend's
linear_int4): equal to the dequantize-then-matmul reference (fp32: to fp32 rounding; bf16: to bf16's), odd
shapes and tails, the reference where the kernel cannot run, the packed copy made once and freed with its
weight, and the "cpu" backend as auto's choice on a CPU."""
from __future__ import annotations

import gc

import pytest
import torch

from codellama_rt.kernels import int4_cpu
from codellama_rt.kernels.int4 import int4_linear_ref
from codellama_rt.kernels.int4_format import quantize_int4
from codellama_rt.kernels import cpu_gemm, cpu_native
from codellama_rt.kernels.options import KernelOptions
from codellama_rt.model.backends import resolve_backend

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # max|Δ| / max|ref|
FP32 = KernelOptions(cpu_bf16_prefill=False)  # prefill rows stay fp32 (else bf16 where the CPU has it)


@pytest.fixture(autouse=True)
def torch_kernel_only(monkeypatch):
    """These tests are about torch's packed kernel: without the native one (tests/test_cpu_native.py),
    which int4_linear_cpu tries first."""
    from codellama_rt.kernels import cpu_native

    monkeypatch.setattr(cpu_native, "_ext", None)


def weight(out_f, in_f, g, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return quantize_int4(w, group_size=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,g,rows", [(64, 96, 32, 1), (48, 128, 128, 3), (704, 256, 64, 7),
                                               (32, 64, 32, 17)])
def test_equals_the_reference(dtype, out_f, in_f, g, rows):
    w = weight(out_f, in_f, g).to(dtype=dtype)
    x = torch.randn(2, rows, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert int4_cpu.supported(x, w)
    got, want = int4_cpu.int4_linear_cpu(x, w, options=FP32), int4_linear_ref(x.float(), w.to(dtype=torch.float32))
    assert got.dtype == dtype and got.shape == (2, rows, out_f)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < TOL[dtype]


def test_shapes_the_kernel_cannot_take_use_the_reference():
    w = weight(40, 64, 32)  # 40 outputs: not a multiple of 16
    x = torch.randn(3, 64)
    assert not int4_cpu.supported(x, w)
    assert torch.equal(int4_cpu.int4_linear_cpu(x, w), int4_linear_ref(x, w))
    w16 = weight(64, 64, 32).to(dtype=torch.float16)
    assert not int4_cpu.supported(x.half(), w16)


def test_fp32_prefill_dequantizes_once_instead(monkeypatch):
    w = weight(64, 64, 32)
    calls = []
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(a) or 1 / 0)
    x = torch.randn(int4_cpu.FP32_KERNEL_MAX_ROWS + 1, 64)
    assert torch.equal(int4_cpu.int4_linear_cpu(x, w, options=FP32), int4_linear_ref(x, w)) and not calls


def test_the_packed_copy_is_made_once_and_goes_with_its_weight():
    import weakref

    w = weight(64, 64, 32)
    x = torch.randn(1, 64)
    int4_cpu.int4_linear_cpu(x, w)
    first = int4_cpu.packed(w, torch.float32)
    assert int4_cpu.packed(w, torch.float32)[0] is first[0]
    gone = weakref.ref(first[0])
    del w, first
    gc.collect()
    assert gone() is None


def test_auto_on_a_cpu_is_the_cpu_backend():
    cpu = resolve_backend("auto", torch.device("cpu"))
    ref = resolve_backend("reference", torch.device("cpu"))
    assert cpu.name == "cpu" and cpu.linear_int4.func is int4_cpu.int4_linear_cpu  # bound to the options
    assert cpu.linear_nf4.func is cpu_native.nf4_linear_cpu
    assert all(getattr(cpu, op) is getattr(ref, op) for op in ("rms_norm", "rotary_attention_decode"))
    assert cpu.linear is cpu_gemm.gemm  # dense prefill projections through oneDNN
