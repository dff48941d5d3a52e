"""Triton device functions that dequantize int4 tiles (`int4_format`'s GPTQ layout), shared by the decode
GEMV (`int4_gemv`) and the prefill GEMM (`int4_gemm`).

Dequantization: q - z exactly via the magic-number trick (q | 0x4B000000 read as fp32 is 2**23 + q;
no int->float conversion instructions), times the fp32 scale, rounded to x's dtype: the values of
`dequantize_int4(w, x.dtype)`. x times w is exact in fp32 (16-bit operands), accumulated in fp32.
FP32_DOT: float32 x takes IEEE dots (tl.dot would use TF32). UPCAST_DOT (interpreter only): Triton
3.6's interpreter cannot multiply bf16 values, so bf16 dot operands go to fp32 (same exact products).
"""
from __future__ import annotations

import triton
import triton.language as tl

FLOAT_BIAS_BITS = 0x4B000000  # the fp32 2^23: OR-ed with a nibble q (< 2^23) it reads as 2^23 + q


@triton.jit
def _dequant_tile(qw, zero, scale, DTYPE: tl.constexpr):
    """qw int32 [R, BN] (input rows 8r .. 8r+7 per int32, lowest nibble first); zero, scale fp32 [BN]
    (this group's) -> [R, 8, BN] (q - zero) * scale computed in fp32, rounded to DTYPE (element [r, j]
    is input row 8r + j)."""
    shifts = tl.arange(0, 8) * 4
    q = (qw[:, None, :] >> shifts[None, :, None]) & 0xF
    q_minus_z = (q | 0x4B000000).to(tl.float32, bitcast=True) - (zero + 8388608.0)[None, None, :]
    return (q_minus_z * scale[None, None, :]).to(DTYPE)


@triton.jit
def _group_scale_zero(QZ, S, group, offs_n, n_mask, N):
    """This group's scale and zero point for columns offs_n, both fp32 [BN]."""
    scale = tl.load(S + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    zw = tl.load(QZ + group * (N // 8) + offs_n // 8, mask=n_mask, other=0)
    zero = ((zw >> ((offs_n % 8) * 4)) & 0xF).to(tl.float32)
    return scale, zero


@triton.jit
def _k_block_dot(acc, x_ptrs, m_mask, qw_ptrs, QZ, S, k0, offs_n, n_mask, N,
                 GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
                 FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc [BM, BN] + x[:, k0:k0+BK] @ dequantized W^T[k0:k0+BK, :] for one K block (inside one group):
    the weight tile rounded to DTYPE exactly as `dequantize_int4` rounds it, fp32 accumulation."""
    scale, zero = _group_scale_zero(QZ, S, k0 // GROUP_SIZE, offs_n, n_mask, N)
    qw = tl.load(qw_ptrs + (k0 // 8) * N, mask=n_mask[None, :], other=0)
    w = tl.reshape(_dequant_tile(qw, zero, scale, DTYPE), (BLOCK_K, BLOCK_N))
    x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
    if UPCAST_DOT:
        x, w = x.to(tl.float32), w.to(tl.float32)
    if FP32_DOT:
        acc = tl.dot(x, w, acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w, acc)
    return acc

