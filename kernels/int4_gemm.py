"""int4 prefill kernel (M > 16 rows of x): the tiled dequant-GEMM. Launched by `int4.int4_linear`;
reference `int4.int4_linear_ref`.

Prefill (M > 16): `_int4_gemm_kernel`, [BLOCK_M, BLOCK_N] output tiles in grouped order (GROUP_M
row tiles share the weight columns in L2), K loop of [BLOCK_M, BLOCK_K] x tiles and dequantized
[BLOCK_K, BLOCK_N] weight tiles, tl.dot with fp32 accumulation.
"""
from __future__ import annotations

import triton.language as tl

from ._triton import kernel
from .int4_tiles import _k_block_dot


@kernel
def _int4_gemm_kernel(
    X, QW, QZ, S, Out,  # x [M, K] row-strided; qweight [K/8, N]; qzeros [K/g, N/8]; scales [K/g, N]
    M, N, K, stride_xm, stride_om,  # out [M, N] row-strided
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n  # grouped order: GROUP_M row tiles walk the column tiles together
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_K // 8)
    m_mask = offs_m < M
    n_mask = offs_n < N
    DTYPE: tl.constexpr = X.dtype.element_ty
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    qw_ptrs = QW + offs_r[:, None] * N + offs_n[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _k_block_dot(acc, x_ptrs, m_mask, qw_ptrs, QZ, S, k0, offs_n, n_mask, N,
                           GROUP_SIZE, BLOCK_K, BLOCK_N, DTYPE, FP32_DOT, UPCAST_DOT)

    out = Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

