"""NF4 weights (`nf4_format`'s bitsandbytes layout) dequantized by a Triton kernel into a dense [out, in] tensor:
`dequantize_nf4_triton`, bitwise `nf4_format.dequantize_nf4` (bitsandbytes' `dequantize_4bit`), and
`nf4_dequant_linear`, that weight times x by the dense GEMM (cuBLAS on CUDA): `nf4.nf4_linear_ref`'s
arithmetic. What the experiment "nf4_dequant_gemm" runs for prefill rows (more than NF4_DEQUANT_MIN_M) instead
of the fused dequant-GEMM kernel (`nf4._nf4_gemm_kernel`, 12-19 SASS instructions a weight): the int4 twin of
this path (`int4_dequant`) is there because the fused int4 GEMM took 2.2x bf16's time to first token on an H200.
The dequantization reads ~0.52 bytes and writes 2 a weight (bf16), a few milliseconds at 7B on an H100/H200
against the 512-token GEMM's ~10.

The kernel: grid (cdiv(bytes, BLOCK),); each program decodes BLOCK bytes of the flat codes (byte i: elements 2 i,
high nibble, and 2 i + 1) to code[nibble] * absmax[element // blocksize] in fp32, rounded once to the dtype, and
writes them in order. The absmax comes in fp32, double quant undone beforehand by `NF4Weight.block_absmax` (torch's
separate multiply and add: bitsandbytes' two roundings, which a fused multiply-add in the kernel would change).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import triton.language as tl

from ._triton import LaunchConfig, add_config, cdiv, kernel, launch_config, triton_dtype
from .nf4_format import NF4Weight

BLOCK = 1024               # bytes a program decodes (2048 weights)
NF4_DEQUANT_MIN_M = 16     # the experiment takes calls of more rows than this (prefill); decode keeps the fused kernels
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@kernel
def _nf4_dequant_kernel(Codes, Absmax, Code, Out, numel, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Out (flat, numel) = code[nibble] * absmax[element // BLOCKSIZE] of this program's BLOCK bytes of Codes."""
    nbytes = (numel + 1) // 2
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < nbytes
    packed = tl.load(Codes + offs, mask=ok, other=0)
    scale = tl.load(Absmax + (2 * offs) // BLOCKSIZE, mask=ok, other=0.0)  # both of a byte's elements: one block
    hi = tl.load(Code + (packed >> 4).to(tl.int32)) * scale   # element 2 i
    lo = tl.load(Code + (packed & 15).to(tl.int32)) * scale   # element 2 i + 1
    out = tl.interleave(hi, lo).to(Out.dtype.element_ty)
    elem = tl.program_id(0) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(Out + elem, out, mask=elem < numel)


def _prepare(w: NF4Weight, dtype: torch.dtype, absmax: torch.Tensor):
    if not isinstance(w, NF4Weight):
        raise TypeError(f"dequantize_nf4_triton: w must be an NF4Weight, got {type(w).__name__}")
    if dtype not in _DTYPES:
        raise TypeError(f"dequantize_nf4_triton: dtype {dtype} is not supported; expected float32, float16 or "
                        "bfloat16")
    if w.blocksize % 2:
        raise ValueError(f"dequantize_nf4_triton: blocksize {w.blocksize} must be even")
    numel = math.prod(w.shape)
    codes = w.codes.reshape(-1)
    if codes.dtype != torch.uint8 or codes.numel() != (numel + 1) // 2 or not codes.is_contiguous():
        raise ValueError(f"dequantize_nf4_triton: codes must be contiguous uint8 with {(numel + 1) // 2} bytes for "
                         f"shape {w.shape}, got {codes.dtype} with {codes.numel()}")
    if numel >= 2 ** 31:  # the kernel's element offsets are int32
        raise ValueError(f"dequantize_nf4_triton: {numel} weights, past the kernel's int32 offsets (< 2**31)")
    out = torch.empty(w.shape, dtype=dtype, device=codes.device)
    args = (codes, absmax, w.code, out, numel)
    return out, (cdiv(codes.numel(), BLOCK),), args, dict(BLOCKSIZE=w.blocksize, BLOCK=BLOCK)


def dequantize_nf4_triton(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[out, in] in `dtype` (default w.dtype): bitwise `dequantize_nf4(w, dtype)` (code * absmax in fp32, rounded
    once), by the Triton kernel (compiled on CUDA, interpreted on CPU). Any even blocksize, with or without double
    quant, numel not a multiple of the blocksize (a partial last block) or odd."""
    dtype = dtype or w.dtype
    absmax = w.block_absmax().float().contiguous() if isinstance(w, NF4Weight) else None
    out, grid, args, constexprs = _prepare(w, dtype, absmax)
    device = torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()
    with device:
        _nf4_dequant_kernel.on(out)[grid](*args, **constexprs, num_warps=4, num_stages=1)
    return out


def nf4_dequant_linear(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x [..., in] @ W.T with W = `dequantize_nf4_triton(w, x.dtype)`: `nf4_linear_ref`'s result, bit for bit (the
    same weight, the same dense GEMM). The dense weight is transient (out x in in x's dtype)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"nf4_dequant_linear: x must be [..., {w.shape[1]}], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype != w.dtype:
        raise TypeError(f"nf4_dequant_linear: x dtype {x.dtype} differs from the weight's dtype {w.dtype}")
    return F.linear(x, dequantize_nf4_triton(w, x.dtype))


def aot_configs(models, dtypes=(torch.bfloat16, torch.float16)) -> list[LaunchConfig]:
    """The kernel at the linears of `models` (ModelShapes) in bf16 and fp16 on meta tensors (blocksize 64);
    shapes that specialise alike share one entry."""
    configs = {}
    for dtype in dtypes:
        for shape in models:
            for name, (n_out, n_in) in shape.projection_shapes().items():
                meta = dict(device="meta")
                w = NF4Weight(codes=torch.empty(n_out * n_in // 2, dtype=torch.uint8, **meta),
                              absmax=torch.empty(n_out * n_in // 64, **meta), code=torch.empty(16, **meta),
                              shape=(n_out, n_in), dtype=dtype)
                _, _, args, constexprs = _prepare(w, dtype, w.absmax)
                cfg = launch_config(_nf4_dequant_kernel, args, constexprs, num_warps=4, num_stages=1)
                add_config(configs, cfg, f"{triton_dtype(dtype)} dequant ({shape.label} {name} {n_out}x{n_in})")
    return list(configs.values())
