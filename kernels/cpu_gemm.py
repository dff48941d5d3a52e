"""Prefill GEMMs of the cpu backend: many rows of x against a dense weight, through oneDNN's linear
(`torch.ops.mkldnn._linear_pointwise`) instead of `F.linear` (MKL's sgemm), and quantized weights' prefill in
bf16 where the CPU has bf16 dot products.

Measured on an AMD EPYC VM (AVX-512, AVX512-BF16; 2 threads), the ~57M model's four projections at 512 rows:
F.linear 15.5 ms, oneDNN on the same plain fp32 weight 7.0 ms (MKL takes a slower path on this CPU), both
IEEE fp32 (max relative error ~1e-6 against fp64, the summation order differs); bf16 3.9 ms. Up to
NATIVE_MAX_ROWS rows (decode, speculative verify passes) keep `F.linear`, so those paths' results do not
change. Without oneDNN (`onednn_available()` False) everything is `F.linear`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .options import KernelOptions
from .rms_norm import rms_norm_ref
from .swiglu import swiglu_ref

# Up to this many rows a projection is decode-sized: the native kernels (csrc/) or F.linear run it.
NATIVE_MAX_ROWS = 16

_onednn: dict = {}  # dtype -> whether oneDNN's linear runs in it here
_bf16_gemm: Optional[bool] = None


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether torch was built with oneDNN and its linear op runs here in `dtype` (tried once per dtype on a tiny
    input: oneDNN refuses bf16 inner products on CPUs without AVX-512, e.g. an AVX2 laptop)."""
    if dtype not in _onednn:
        try:
            x = torch.ones(2, 4, dtype=dtype)
            _onednn[dtype] = bool(torch.backends.mkldnn.is_available()) and torch.equal(
                torch.ops.mkldnn._linear_pointwise(x, torch.ones(3, 4, dtype=dtype), None, "none", [], "").float(),
                torch.full((2, 3), 4.0))
        except (AttributeError, RuntimeError, NotImplementedError):
            _onednn[dtype] = False
    return _onednn[dtype]


def bf16_gemm_available() -> bool:
    """Whether this CPU has the bf16 dot products (AVX512-BF16 or AMX) that make a bf16 GEMM faster than an fp32
    one (~1.8x oneDNN's fp32, ~4x MKL's, on the EPYC above); read once."""
    global _bf16_gemm
    if _bf16_gemm is None:
        _bf16_gemm = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return _bf16_gemm


def _many_rows(x: torch.Tensor) -> bool:
    return x.numel() // max(x.shape[-1], 1) > NATIVE_MAX_ROWS


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)  # float16 inner products are refused on CPUs without AVX512-FP16


# oneDNN keeps what it builds for each distinct row count (~1 MB: a primitive, its JIT code), and a server sees
# every prompt length: the default model's prefill at each length from 17 to 512 grew a process from 332 MB to
# 2.6 GB, and kept growing past its primitive cache's capacity. Rows are padded with zeros up to the next
# multiple of an eighth of their power-of-two octave (at least 8): a weight sees 18 row counts from 17 to 512 and
# 20 more up to 16K, and padding adds at most 41% of the rows (17 -> 24), under 25% past 32 rows. Prefill of the
# default model at 20-500 rows measured 0-9% slower than unpadded, its memory flat (332 -> 415 MB, all lengths).
# (Sending the rows past a multiple to F.linear instead of padding measured 15-45% slower: MKL is ~2x slower per
# row on the AMD CPU above.)
MIN_ROW_STEP = 8


def padded_rows(rows: int) -> int:
    """The row count `gemm` hands oneDNN for `rows` (> NATIVE_MAX_ROWS) rows: rows rounded up to a multiple of
    max(MIN_ROW_STEP, (the power of two >= rows) / 8)."""
    step = max(MIN_ROW_STEP, (1 << (rows - 1).bit_length()) // 8)
    return -(-rows // step) * step


def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) (x [..., K], w [N, K], same float dtype, CPU): fp32 or bf16 through oneDNN past
    NATIVE_MAX_ROWS rows where it is available (its rows zero-padded to `padded_rows`), else F.linear."""
    if (x.device.type != "cpu" or not _many_rows(x) or x.dtype != w.dtype or x.dtype not in _ONEDNN_DTYPES
            or not onednn_available(x.dtype)):
        return F.linear(x, w)
    K = x.shape[-1]
    rows = x.numel() // K
    pad = padded_rows(rows) - rows
    x2 = F.pad(x.reshape(rows, K), (0, 0, 0, pad)) if pad else x.reshape(rows, K)
    y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), w.contiguous(), None, "none", [], "")
    return (y[:rows] if pad else y).reshape(*x.shape[:-1], w.shape[0])


def linear_swiglu_cpu(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """`gemv.linear_swiglu_ref` with `gemm`: silu(gate) * up of x @ w13^T ([..., 2F] -> [..., F])."""
    gate, up = gemm(x, w13).chunk(2, dim=-1)
    return swiglu_ref(gate, up)


def norm_linear_cpu(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                    w: torch.Tensor, swiglu: bool = False):
    """`gemv.norm_linear_ref` with `gemm`: (projection of rms_norm(x + residual) * norm_weight, h)."""
    normed, h = rms_norm_ref(x, norm_weight, eps, residual)
    return (linear_swiglu_cpu(normed, w) if swiglu else gemm(normed, w)), h


def prefill_in_bf16(x: torch.Tensor, weight_device: torch.device, options: KernelOptions) -> bool:
    """Whether a quantized projection of x runs `linear_bf16`: fp32 prefill rows (more than NATIVE_MAX_ROWS)
    on a CPU with fast bf16 GEMMs, and `options.cpu_bf16_prefill`."""
    return (options.cpu_bf16_prefill and x.dtype == torch.float32 and x.device.type == "cpu"
            and weight_device.type == "cpu" and _many_rows(x) and bf16_gemm_available())


def linear_bf16(x: torch.Tensor, w_bf16: torch.Tensor) -> torch.Tensor:
    """x [..., in] fp32 @ w_bf16 [out, in]^T in bf16 (x rounded to bf16, fp32 sums, the output rounded to bf16),
    returned in fp32."""
    return gemm(x.to(torch.bfloat16), w_bf16).float()
