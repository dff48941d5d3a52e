"""int4 weights (`int4_format`'s GPTQ layout) dequantized by a Triton kernel into a dense [out, in] tensor:
`dequantize_int4_triton`, bitwise `int4_format.dequantize_int4` (its reference). What the experiment
"int4_dequant_gemm" runs for prefill rows (more than 16): the weight dequantized for the call, then the dense
GEMM (cuBLAS on CUDA), i.e. `int4.int4_linear_ref`'s arithmetic, instead of the fused dequant-GEMM kernel
(`int4_gemm`) that takes 2.2x bf16's time to first token on an H200. The dequantization reads 0.5 bytes and
writes 2 a weight; at 7B that is ~16 GB a prefill call, a few milliseconds on an H100/H200, against the
GEMM's tens at 512 tokens.

Grid (cdiv(out, BLOCK_N), in / BLOCK_K): each program turns a [BLOCK_K / 8, BLOCK_N] qweight tile (one
group's scale and zero) into the [BLOCK_N, BLOCK_K] block of the output, (q - z) s in fp32 rounded once.
"""
from __future__ import annotations

import contextlib

import torch
import triton.language as tl

from ._triton import LaunchConfig, add_config, cdiv, kernel, launch_config, triton_dtype
from .int4_format import _FLOAT_DTYPES, Int4Weight
from .int4_tiles import _dequant_tile, _group_scale_zero

BLOCK_N = 128


@kernel
def _int4_dequant_kernel(QW, QZ, S, Out, N, K, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """Out [N, K] (row-major, Out's dtype) = (q - z) * s of the qweight [K/8, N], qzeros [K/g, N/8], scales
    [K/g, N] tile of this program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k0 = tl.program_id(1) * BLOCK_K
    scale, zero = _group_scale_zero(QZ, S, k0 // GROUP_SIZE, offs_n, n_mask, N)
    rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    qw = tl.load(QW + rows[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    w = tl.reshape(_dequant_tile(qw, zero, scale, Out.dtype.element_ty), (BLOCK_K, BLOCK_N))  # [k, n]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(Out + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], w, mask=n_mask[None, :])


def _block_k(group_size: int) -> int:
    """The largest power of two up to 128 dividing the group (one scale and zero per tile)."""
    return min(128, group_size & -group_size)


def check_weight(w: Int4Weight, who: str) -> None:
    """TypeError / ValueError naming `who` unless the int4 kernels take `w`: a consistent Int4Weight, groups a
    multiple of 32, contiguous fields."""
    if not isinstance(w, Int4Weight):
        raise TypeError(f"{who}: w must be an Int4Weight, got {type(w).__name__}")
    w.check(who)
    if w.group_size % 32:
        raise ValueError(f"{who}: group_size={w.group_size} is not supported by the kernels (a multiple of 32)")
    for name, t in (("qweight", w.qweight), ("qzeros", w.qzeros), ("scales", w.scales)):
        if not t.is_contiguous():
            raise ValueError(f"{who}: {name} must be contiguous")


def _prepare(w: Int4Weight, dtype: torch.dtype):
    check_weight(w, "dequantize_int4_triton")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_int4_triton: dtype {dtype} is not supported; expected float32, float16 or "
                        "bfloat16")
    N, K = w.shape
    out = torch.empty(N, K, dtype=dtype, device=w.device)
    block_k = _block_k(w.group_size)
    grid = (cdiv(N, BLOCK_N), K // block_k)
    args = (w.qweight, w.qzeros, w.scales, out, N, K)
    return out, grid, args, dict(GROUP_SIZE=w.group_size, BLOCK_N=BLOCK_N, BLOCK_K=block_k)


def dequantize_int4_triton(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] in `dtype`: bitwise `dequantize_int4(w, dtype)` ((q - z) s in fp32, rounded once), by the
    Triton kernel (compiled on CUDA, interpreted on CPU). w: contiguous fields, group size a multiple of 32."""
    out, grid, args, constexprs = _prepare(w, dtype)
    device = torch.cuda.device(w.device) if w.device.type == "cuda" else contextlib.nullcontext()
    with device:
        _int4_dequant_kernel.on(out)[grid](*args, **constexprs, num_warps=4, num_stages=1)
    return out


def meta_weight(n_out: int, n_in: int, group_size: int, dtype: torch.dtype) -> Int4Weight:
    """An Int4Weight [n_out, n_in] of meta tensors (no memory): what the AOT case lists run launchers on."""
    return Int4Weight(qweight=torch.empty(n_in // 8, n_out, dtype=torch.int32, device="meta"),
                      qzeros=torch.empty(n_in // group_size, n_out // 8, dtype=torch.int32, device="meta"),
                      scales=torch.empty(n_in // group_size, n_out, dtype=dtype, device="meta"),
                      shape=(n_out, n_in), group_size=group_size)


def aot_configs(models, dtypes=(torch.bfloat16, torch.float16), group_size: int = 128) -> list[LaunchConfig]:
    """The kernel at the linears of `models` (ModelShapes) in bf16 and fp16, group 128, on meta tensors; shapes
    that specialise alike share one entry."""
    configs = {}
    for dtype in dtypes:
        for shape in models:
            for name, (n_out, n_in) in shape.projection_shapes().items():
                _, _, args, constexprs = _prepare(meta_weight(n_out, n_in, group_size, dtype), dtype)
                cfg = launch_config(_int4_dequant_kernel, args, constexprs, num_warps=4, num_stages=1)
                add_config(configs, cfg, f"{triton_dtype(dtype)} dequant ({shape.label} {name} {n_out}x{n_in})")
    return list(configs.values())
