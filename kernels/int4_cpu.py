"""int4 projections on the CPU: the native kernels of csrc/ (`cpu_native.int4_linear_native`: fp32 activations;
up to `cpu_native.NATIVE_MAX_ROWS` rows directly, more through a native dequantization and torch's GEMM) where
they are built and apply, else torch's own packed kernel
(`aten._weight_int4pack_mm_for_cpu`), so a 4-bit model no longer dequantizes whole matrices at every call.
Reference: `int4.int4_linear_ref`.

Our weights are asymmetric (w = (q - z) s); torch's kernel computes (q - 8) s + zero per group, so the
zero it is given is (8 - z) s (exact in fp32: z and 8 are small integers). The packed copy of a weight is
made on its first use and kept on the weight object (it goes with it). Shapes the
kernel cannot take (output width not a multiple of 16, float16 x, non-CPU tensors) use the reference, and
so do fp32 calls of more than FP32_KERNEL_MAX_ROWS rows (prefill), for which torch's fp32 path is slow;
with `KernelOptions.cpu_bf16_prefill` (the default) on a CPU with fast bf16 GEMMs, prefill rows run in bf16.
"""
from __future__ import annotations

import torch

from .cpu_gemm import gemm, linear_bf16, prefill_in_bf16
from .cpu_native import int4_linear_native
from .int4_format import Int4Weight, dequantize_int4
from .options import DEFAULT_OPTIONS, KernelOptions
from .weight_cache import derived

_DTYPES = (torch.float32, torch.bfloat16)
_HAVE_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
# torch's fp32 path is slow per row (measured in bench/cpu_peer.py on 2 cores: prefill of the default model
# at 225 tok/s against 4832 dequantizing once per call); past this many rows, dequantizing wins
FP32_KERNEL_MAX_ROWS = 8
_CACHE = "_cpu_int4pack"  # the attribute of an Int4Weight holding (packed codes, scales and zeros, by dtype)


def supported(x: torch.Tensor, w: Int4Weight) -> bool:
    """Whether torch's CPU kernel takes this call (else the reference runs)."""
    out_features, in_features = w.shape
    return (x.device.type == "cpu" and w.qweight.device.type == "cpu" and x.dtype in _DTYPES
            and out_features % 16 == 0 and in_features % 2 == 0 and _HAVE_KERNEL)


def packed(w: Int4Weight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [out, in / 2] in torch's CPU layout, scales and zeros [in / g, out, 2] in `dtype`), cached."""
    def make():
        q, z = w.unpack()  # uint8 [out, in], [in / g, out]
        code = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        s = w.scales.float()
        return code, torch.stack([s, (8 - z.float()) * s], dim=-1).contiguous(), {}

    code, scales_zeros, by_dtype = derived(w, _CACHE, make)
    if dtype not in by_dtype:
        by_dtype[dtype] = scales_zeros.to(dtype)
    return code, by_dtype[dtype]


def int4_linear_cpu(x: torch.Tensor, w: Int4Weight, *, options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype, as `int4_linear_ref` (fp32 accumulation inside torch's kernel;
    bf16 x keeps bf16 products). fp32 prefill rows run in bf16 where `cpu_gemm.prefill_in_bf16` (options)."""
    native = int4_linear_native(x, w, options=options)
    if native is not None:
        return native
    if prefill_in_bf16(x, w.device, options):
        return linear_bf16(x, dequantize_int4(w, torch.bfloat16))
    if not supported(x, w) or (x.dtype == torch.float32 and x.numel() // x.shape[-1] > FP32_KERNEL_MAX_ROWS):
        return gemm(x, dequantize_int4(w, x.dtype))  # the reference's arithmetic, prefill via oneDNN
    code, scales_zeros = packed(w, x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), code, w.group_size, scales_zeros)
    return out.reshape(*x.shape[:-1], w.shape[0])
