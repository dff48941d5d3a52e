"""The NF4 dequant-matmul op: Triton GEMV (decode) and GEMM kernels, their launcher `nf4_linear` and the
PyTorch reference `nf4_linear_ref`, for weights in `nf4_format`'s bitsandbytes layout (blocksize 64).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import LaunchConfig, as_rows, cdiv, kernel, launch_config, next_power_of_2, triton_dtype
from .nf4_format import (BLOCKSIZES, NF4_CODE, NF4Weight, _quantize_blockwise_8bit,  # noqa: F401 (re-exported)
                         dequantize_nf4, dynamic_map, quantize_nf4)

# The weight format's names (`nf4_format`) stay importable from here.


def nf4_linear_ref(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """y = x @ W.T with W = dequantize_nf4(w): x [..., in] -> [..., out] in x's dtype (PyTorch's linear on
    the dequantized weight, which is rounded to w.dtype first)."""
    return F.linear(x, dequantize_nf4(w).to(x.dtype))


# ---- Triton dequant-matmul ---------------------------------------------------------------------
#
# y[m, n] = sum_k x[m, k] * W[n, k], W[n, k] = code[q[n, k]] * absmax[n, k // 64], accumulated in fp32.
# Both kernels walk the input dim one quantization block (64 values = 32 bytes of a weight row) per step,
# so a step needs one absmax per output row: `_block_scale` loads it, undoing double quant in the kernel
# (nested_code[absmax_u8] * nested_absmax[block // 256] + offset, in fp32). Nibbles are looked up in the
# 16-entry codebook by a gather from the 64-byte `code` tensor (it stays in L1): Triton has no
# register-indexed arrays, and a 15-select tree per value (bitsandbytes' Triton backend has one) compiles
# to about twice the instructions of the whole gather-based loop.
#
# GEMV (decode, M <= GEMV_MAX_M): grid (cdiv(N, BLOCK_N),); a program owns BLOCK_N output rows and every
# row of x, so the packed codes are read once. Its tile is [32 bytes, BLOCK_N rows] (bytes along dim 0):
# the byte load and the codebook gathers then share one register layout (a [BLOCK_N, 32] tile makes
# Triton shuffle the nibbles through shared memory, with barriers, every step). x is read as integers
# holding the (even, odd) pair of a byte's two values, split with integer ops. Per step and row of x:
# t[n] = sum_j code_hi[j, n] * x[2j] + code_lo[j, n] * x[2j + 1], then acc += t * absmax: the weights are
# never rounded to the model dtype (more exact than the reference, which rounds them).
# GEMM (M > GEMV_MAX_M): grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)), M tiles fastest so neighbouring
# programs share a weight tile in L2 (with M <= 16 there is one M tile: weights still read once). The
# [BLOCK_N, 64] weight tile code * absmax is rounded to x's dtype exactly as `dequantize_nf4` rounds it and
# fed to tl.dot (FP32_DOT: float32 uses IEEE dots, not TF32; UPCAST_DOT, interpreter only: bf16 operands
# go to the dot as fp32, since the interpreter cannot multiply bf16; the products are the same).
#
# Requirements (the launcher checks them): blocksize 64 and in % 64 == 0 (blocks never straddle rows),
# x with unit stride along in. On the GPU the double-quant multiply-add may compile to one FMA (one
# rounding instead of two); the interpreter rounds twice, as the reference does.

QBLOCK = 64  # the quantization block the kernels support
_QB = tl.constexpr(QBLOCK)  # the same, as kernels see globals
GEMV_MAX_M = 2  # rows of x up to which the GEMV kernel is used (see nf4_launch)


@triton.jit
def _block_scale(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset, blk, mask,
                 DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """absmax of quantization blocks `blk` (int64 [BLOCK_N]) as fp32; 0 where ~mask."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + q) * nested + offset
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _dequant_block(packed, code_ptr, scale):
    """[BLOCK_N, 32] packed bytes -> [BLOCK_N, 64] fp32 code[nibble] * scale[:, None], in k order."""
    hi = tl.load(code_ptr + (packed >> 4).to(tl.int32))   # element 2j
    lo = tl.load(code_ptr + (packed & 15).to(tl.int32))   # element 2j + 1
    return tl.interleave(hi, lo) * scale[:, None]


@triton.jit
def _unpack_pairs(xp, X_DTYPE: tl.constexpr):
    """x values k = 2j, 2j + 1 read as one integer (int32 for 16-bit x, int64 for fp32; little-endian, so
    the even k is the low half) -> (even, odd) as fp32, with integer ops only (no layout shuffles)."""
    if X_DTYPE == tl.bfloat16:
        even = (xp << 16).to(tl.float32, bitcast=True)
        odd = ((xp >> 16) << 16).to(tl.float32, bitcast=True)
    elif X_DTYPE == tl.float16:
        even = xp.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (xp >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        even = xp.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (xp >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return even, odd


@kernel
def _nf4_gemv_kernel(xp_ptr, codes_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, code_ptr, out_ptr,
                     M, N, K, stride_xm, stride_codes, offset,  # xp [M, K/2] pairs; codes [N, K/2]; out [M, N]
                     DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Tiles are [32 bytes of a block, BLOCK_N rows] (bytes along dim 0): the byte load and the codebook
    # gathers then get the same register layout, with no shared-memory shuffles between them.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features n
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    pairs = tl.arange(0, _QB // 2)  # byte j of a block holds k = 2j (high nibble) and 2j + 1 (low nibble)
    code_ptrs = codes_ptr + pairs[:, None] + rows64[None, :] * stride_codes
    ms = tl.arange(0, BLOCK_M)
    blocks_per_row = K // _QB
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, blocks_per_row):
        packed = tl.load(code_ptrs + kb * (_QB // 2), mask=row_ok[None, :], other=0)  # [32, BLOCK_N] uint8
        scale = _block_scale(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset,
                             rows64 * blocks_per_row + kb, row_ok, DOUBLE_QUANT, NESTED_BLOCKSIZE)
        hi = tl.load(code_ptr + (packed >> 4).to(tl.int32))   # code of k = 2j, fp32
        lo = tl.load(code_ptr + (packed & 15).to(tl.int32))   # code of k = 2j + 1
        for m in tl.static_range(BLOCK_M):  # the decoded tile serves every row of x
            xp = tl.load(xp_ptr + m * stride_xm + kb * (_QB // 2) + pairs, mask=m < M, other=0)
            even, odd = _unpack_pairs(xp, out_ptr.dtype.element_ty)
            t = tl.sum(hi * even[:, None] + lo * odd[:, None], axis=0) * scale  # [BLOCK_N]
            acc = tl.where(ms[:, None] == m, acc + t[None, :], acc)
    out_ptrs = out_ptr + ms.to(tl.int64)[:, None] * N + rows[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(ms[:, None] < M) & row_ok[None, :])


@kernel
def _nf4_gemm_kernel(x_ptr, codes_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, code_ptr, out_ptr,
                     M, N, K, stride_xm, stride_codes, offset,
                     DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    row_ok = rows < N
    pairs = tl.arange(0, _QB // 2)
    ks = tl.arange(0, _QB)
    rows64 = rows.to(tl.int64)
    code_ptrs = codes_ptr + rows64[:, None] * stride_codes + pairs[None, :]
    x_ptrs = x_ptr + ms.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    blocks_per_row = K // _QB
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, blocks_per_row):
        x = tl.load(x_ptrs + kb * _QB, mask=m_ok[:, None], other=0.0)  # [BLOCK_M, 64]
        packed = tl.load(code_ptrs + kb * (_QB // 2), mask=row_ok[:, None], other=0)
        scale = _block_scale(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset,
                             rows64 * blocks_per_row + kb, row_ok, DOUBLE_QUANT, NESTED_BLOCKSIZE)
        # the weight tile [BLOCK_N, 64] rounded to the compute dtype, as dequantize_nf4 rounds it
        w = _dequant_block(packed, code_ptr, scale).to(x_ptr.dtype.element_ty)
        if UPCAST_DOT:
            x, w = x.to(tl.float32), w.to(tl.float32)
        if FP32_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    out_ptrs = out_ptr + ms.to(tl.int64)[:, None] * N + rows[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


# ---- launch heuristics -------------------------------------------------------------------------

@dataclass(frozen=True)
class NF4Launch:
    kind: str        # "gemv" or "gemm"
    block_m: int     # rows of x per program
    block_n: int     # output features per program
    num_warps: int
    num_stages: int  # software-pipelining depth of the code/x loads (GPU only)


def nf4_launch(m: int, dtype: torch.dtype) -> NF4Launch:
    """The one place kernel and tile sizes are picked, from the rows of x (m) and the dtype. The same on
    sm_80 and sm_90 and in the CPU interpreter, so the CPU tests run the tiling the GPU runs.

    m <= GEMV_MAX_M (2): the GEMV, BLOCK_M = m rounded up to a power of two, 64 output rows per program,
    4 warps (each thread decodes 16 bytes of one row per step). Its cost grows by about a third per row
    of x (one more FMA and reduction per weight: sm_90 SASS loop 9.2 instructions per weight at m = 1,
    12.5 at m = 2, 19 at m = 4), while the GEMM with a 16-row tile costs a flat 11.6-13 and pipelines its
    loads; hence the switch at 2 (to be confirmed on a GPU: it is this one constant).
    m <= 16 (batched decode): the GEMM with one 16 x 64 tile per 64 output rows (weights still read once),
    4 warps, 4 stages.
    Prefill: 64 x 64 up to m = 64 (4 warps), 128 x 64 up to 128 and 256 x 64 beyond (8 warps), 3 stages. The
    weight tile is dequantized once per M tile, so taller tiles amortize it: 256 x 64 runs 0.075 loop
    instructions per multiply-add, 128 x 64 0.126 (sm_90 SASS); 128 x 128 spills on sm_80 (255 registers).
    float32 (IEEE dots, a debugging path): 16 x 64, 8 warps, 2 stages for every m > GEMV_MAX_M (every taller
    tile or fewer warps spills: IEEE dots over a 64-deep step hold many registers).
    """
    if m <= GEMV_MAX_M:
        return NF4Launch("gemv", next_power_of_2(max(m, 1)), 64, 4, 2)
    if dtype == torch.float32:
        return NF4Launch("gemm", 16, 64, 8, 2)
    if m <= 16:
        return NF4Launch("gemm", 16, 64, 4, 4)
    if m <= 64:
        return NF4Launch("gemm", 64, 64, 4, 3)
    return NF4Launch("gemm", 128 if m <= 128 else 256, 64, 8, 3)


# ---- launcher ----------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_weight(w: NF4Weight, device: torch.device) -> None:
    """ValueError/TypeError unless w is a well-formed NF4Weight the kernels can read on `device`."""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"nf4_linear: w must be an NF4Weight, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"nf4_linear: w.shape must be (out, in), got {w.shape}")
    N, K = w.shape
    if w.blocksize != QBLOCK:
        raise ValueError(f"nf4_linear: blocksize {w.blocksize} is not supported; the kernels need {QBLOCK}")
    if K % QBLOCK or N < 1:
        raise ValueError(f"nf4_linear: in features {K} must be a positive multiple of {QBLOCK} "
                         f"(whole quantization blocks per row), out features {N} >= 1")
    n_blocks = N * K // QBLOCK
    expect = [("codes", w.codes, torch.uint8, N * K // 2), ("code", w.code, torch.float32, 16)]
    if w.double_quant:
        if w.nested_code is None:
            raise ValueError("nf4_linear: double-quant weight has nested_absmax but no nested_code")
        expect += [("absmax", w.absmax, torch.uint8, n_blocks), ("nested_code", w.nested_code, torch.float32, 256),
                   ("nested_absmax", w.nested_absmax, torch.float32, -(-n_blocks // w.nested_blocksize))]
    else:
        expect += [("absmax", w.absmax, torch.float32, n_blocks)]
    for name, t, dtype, numel in expect:
        if t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
            raise ValueError(f"nf4_linear: w.{name} must be a contiguous {dtype} tensor of {numel} elements, got "
                             f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
        if t.device != device:
            raise ValueError(f"nf4_linear: w.{name} is on {t.device}, x on {device}")


def _as_pairs(x2: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K even) as [M, K/2] integers each holding x[:, 2j] (low half) and x[:, 2j + 1]: int32 for
    16-bit x, int64 for fp32. A view when the row stride and offset allow it, else a contiguous copy."""
    as_int = torch.int64 if x2.dtype == torch.float32 else torch.int32
    try:
        return x2.view(as_int)
    except RuntimeError:
        return x2.contiguous().view(as_int)


def _prepare(x: torch.Tensor, w: NF4Weight, on_cuda: bool = None):
    """Check the arguments, allocate the output and build the launch: (out, (kernel, grid, args, constexprs,
    NF4Launch) or None when x has no rows). on_cuda (default: x on CUDA) picks the compiled kernel's
    constexprs over the interpreter's; `aot_configs` runs it on meta tensors with on_cuda."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("nf4_linear: x must be a tensor [..., in]")
    if x.dtype not in _DTYPES:
        raise TypeError(f"nf4_linear: x dtype {x.dtype} is not supported; expected float16, bfloat16 or float32")
    _check_weight(w, x.device)
    N, K = w.shape
    if x.dtype != w.dtype:
        raise TypeError(f"nf4_linear: x dtype {x.dtype} differs from the weight's dtype {w.dtype}")
    x2 = as_rows(x, K, "nf4_linear: x")
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    M = x2.shape[0]
    if M == 0:
        return out, None
    on_cuda = x.is_cuda if on_cuda is None else on_cuda
    cfg = nf4_launch(M, x.dtype)
    nested_code = w.nested_code if w.double_quant else w.code          # unused without double quant
    nested_absmax = w.nested_absmax if w.double_quant else w.absmax
    constexprs = dict(DOUBLE_QUANT=w.double_quant, NESTED_BLOCKSIZE=w.nested_blocksize,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    if cfg.kind == "gemv":
        xk = _as_pairs(x2)
        kern, grid = _nf4_gemv_kernel, (cdiv(N, cfg.block_n),)
    else:
        xk = x2
        kern, grid = _nf4_gemm_kernel, (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n))
        constexprs.update(FP32_DOT=x.dtype == torch.float32, UPCAST_DOT=not on_cuda and x.dtype == torch.bfloat16)
    args = (xk, w.codes, w.absmax, nested_code, nested_absmax, w.code, out, M, N, K, xk.stride(0), K // 2,
            float(w.nested_offset))
    return out, (kern, grid, args, constexprs, cfg)


def nf4_linear(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """Triton dequant-matmul y = x @ dequantize_nf4(w).T; same contract as `nf4_linear_ref`.

    x: [..., in] in w.dtype (float16, bfloat16 or float32), unit stride along in, leading dims that
    flatten to rows with one stride, read in place (the GEMV copies its few rows when their row stride or
    offset is odd, to read them as pairs). w: an NF4Weight (out, in) with blocksize 64,
    in % 64 == 0, with or without double quant, its tensors contiguous and on x's device.
    Returns a new contiguous [..., out] tensor in x's dtype.
    Numerics: fp32 accumulation. Up to GEMV_MAX_M rows of x the GEMV sums x * code per block and scales
    by the block's absmax in fp32 (the weights are not rounded to x's dtype: more exact than the
    reference); beyond, the GEMM rounds code * absmax to x's dtype as `dequantize_nf4` does and multiplies
    on the tensor cores (float32: IEEE, not TF32). CUDA tensors run the compiled kernels, CPU tensors
    Triton's interpreter.
    """
    out, launch = _prepare(x, w)
    if launch is not None:
        kern, grid, args, constexprs, cfg = launch
        device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
        with device:  # Triton launches on the current CUDA device
            kern.on(x)[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# ---- ahead-of-time specialisations -------------------------------------------------------------

def _meta_weight(n: int, k: int, dtype: torch.dtype, double_quant: bool) -> NF4Weight:
    meta = dict(device="meta")
    n_blocks = n * k // QBLOCK
    w = NF4Weight(codes=torch.empty(n * k // 2, dtype=torch.uint8, **meta),
                  absmax=torch.empty(n_blocks, dtype=torch.uint8 if double_quant else torch.float32, **meta),
                  code=torch.empty(16, dtype=torch.float32, **meta), shape=(n, k), dtype=dtype)
    if double_quant:
        w.nested_code = torch.empty(256, dtype=torch.float32, **meta)
        w.nested_absmax = torch.empty(-(-n_blocks // 256), dtype=torch.float32, **meta)
        w.nested_offset = 0.5
    return w


AOT_ROWS = (1, 2, 8, 40, 100, 512)  # decode: GEMV 1 and 2 rows, GEMM 16-row tile; prefill: 64/128/256-row tiles


def aot_configs(models) -> list[LaunchConfig]:
    """The CUDA launches of the linear layers (wqkv, wo, w13, w2) of `models` (ModelShapes, e.g. CodeLlama
    7B/34B/70B) in bf16 and fp16, with and without double quant, for x of AOT_ROWS rows (one per tile choice of
    `nf4_launch`): `_prepare` run on meta tensors of those shapes, typed as the JIT would type them. Every dimension
    of these layers is
    a multiple of 16, so the JIT specialises all of them alike and the list keeps one config per
    (rows, dtype, double quant): the layers' launches are exactly these binaries."""
    configs = {}
    for model in models:
        for n, k in model.projection_shapes().values():
            for dtype in (torch.bfloat16, torch.float16):
                for dq in (True, False):
                    w = _meta_weight(n, k, dtype, dq)
                    for m in AOT_ROWS:
                        x = torch.empty(m, k, dtype=dtype, device="meta")
                        _, (kern, _, args, constexprs, cfg) = _prepare(x, w, on_cuda=True)
                        label = (f"{cfg.kind} M={m} {triton_dtype(dtype)} {'dq' if dq else 'fp32-absmax'} "
                                 f"{cfg.block_m}x{cfg.block_n}")
                        lc = launch_config(kern, args, constexprs, num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages, label=label)
                        key = (kern.__name__, tuple(lc.signature.items()), tuple(lc.constexprs.items()),
                               lc.divisible_by_16, lc.num_warps, lc.num_stages)
                        configs.setdefault(key, lc)
    return list(configs.values())
