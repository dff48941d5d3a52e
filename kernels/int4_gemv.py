"""int4 decode kernels (M <= 16 rows of x): the split-K GEMV, its tensor-core variant with the weight as
the MMA's A operand, and the split-K reduction. Launched by `int4.int4_linear`; reference `int4.int4_linear_ref`.

Decode (M <= 16 rows): `_int4_gemv_kernel`, grid (cdiv(N, BLOCK_N), SPLIT_K). Program (n, s) streams
the packed columns [n * BLOCK_N, +BLOCK_N) of qweight over its share of the K tiles, each int32
loaded once as a [BLOCK_K // 8, BLOCK_N] tile and dequantized in registers: nibble j of each int32
(shift by 4j, mask) minus the group's zero, times its scale (BLOCK_K divides the group, so one
scale/zero row per tile), rounded to x's dtype. M = 1 differs: the 8 nibble planes stay in the layout
the tile was loaded in (input rows 8r + j); per plane (q - z) exactly (the magic-number trick of `int4_tiles`) times
the matching stride-8 slice of x, fp32 FMAs into a per-tile [BLOCK_K // 8, BLOCK_N] sum that is
multiplied by the group's scale once per tile and added to the accumulator, reduced once after the
loop. That is 4 instructions a weight instead of 7 (no scale multiply, no rounding to x's dtype and
back per weight): 20-30% faster on an H200 (bench/results/NVIDIA-H200-2026-11-26/gemv-sweep.md), and
the dequantized weights are not rounded to x's dtype, so the result is nearer the exact product than
`int4_linear_ref` is. 2 <= M <= 16: one 16-row tile (rows past M masked); the
tile expanded to [BLOCK_K // 8, 8, BLOCK_N], reshaped to [BLOCK_K, BLOCK_N] and fed to tl.dot.
With SPLIT_K > 1 each program writes fp32 partials [SPLIT_K, M, N] and `_int4_splitk_reduce_kernel`
sums them in split order (deterministic) and rounds to x's dtype (with the experiment "int4_one_pass",
the column block's last program does, `_sum_splits_if_last`); with SPLIT_K = 1 the program writes the
output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import cdiv, kernel, last_to_finish, next_power_of_2, pdl_prologue, ticket_reset
from .int4_tiles import _group_scale_zero, _k_block_dot


@triton.jit
def _gemv_program(QW, N, K, k_per_split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This GEMV program's columns (offs_n, n_mask), its K range (k_start, k_end) and the pointers of its
    first [BLOCK_K / 8, BLOCK_N] qweight tile: grid (column blocks, K splits)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_K // 8)
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    return offs_n, n_mask, offs_r, k_start, k_end, QW + offs_r[:, None] * N + offs_n[None, :]


@kernel(do_not_specialize=["k_per_split", "float_bias"])
def _int4_gemv_kernel(
    X, QW, QZ, S, Out, Part,  # x [M, K] row-strided; qweight [K/8, N]; qzeros [K/g, N/8]; scales [K/g, N]
    Tickets,  # ONE_PASS: int32 [cdiv(N, BLOCK_N)], zero
    M, N, K, stride_xm, stride_om, k_per_split,  # out [M, N] row-strided; Part fp32 [SPLIT_K, M, N]
    float_bias,  # FLOAT_BIAS_BITS, a run-time value so that ptxas merges mask and OR into one LOP3 (M = 1)
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ONE_PASS: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    offs_n, n_mask, offs_r, k_start, k_end, qw_ptrs = _gemv_program(QW, N, K, k_per_split, BLOCK_N, BLOCK_K)
    DTYPE: tl.constexpr = X.dtype.element_ty

    if BLOCK_M == 1:
        # nibble plane j of the tile is input rows k0 + 8r + j: dequantized in the layout qw was loaded
        # in (no layout conversion), multiplied by the matching strided slice of x (L1-resident).
        # Nibbles 0..4 are masked where they lie (bits 4m.., m = j; below the float's 23 mantissa bits),
        # nibbles 5..7 after one shift by 20 (m = j - 5), and read as the float 2^23 + q 16^m; minus
        # 2^23 + z 16^m that is (q - z) 16^m exactly, and x's slice comes pre-scaled by 16^-m, so the
        # product is (q - z) x exactly as with a shifted nibble: one LOP3, one FADD and one FFMA a weight
        # (plus one shift per 8 weights) instead of a shift and an extract more (ptxas: 4.7 instead of
        # 5.7 instructions a weight in the loop at sm_90).
        acc2 = tl.zeros([BLOCK_K // 8, BLOCK_N], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            scale, zero = _group_scale_zero(QZ, S, k0 // GROUP_SIZE, offs_n, n_mask, N)
            qw = tl.load(qw_ptrs + (k0 // 8) * N, mask=n_mask[None, :], other=0, eviction_policy="evict_first")
            high = qw >> 20  # nibbles 5..7 at bits 0..11 (the masks drop the sign extension)
            tile = tl.zeros([BLOCK_K // 8, BLOCK_N], tl.float32)
            for j in tl.static_range(8):
                src = qw if j < 5 else high
                m = j if j < 5 else j - 5
                q = ((src & (0xF << (4 * m))) | float_bias).to(tl.float32, bitcast=True)
                step = 1.0 * (1 << (4 * m))  # 16^m
                zero_magic = zero * step + 8388608.0
                x = tl.load(X + k0 + offs_r * 8 + j).to(tl.float32) * (1.0 / step)
                tile += (q - zero_magic[None, :]) * x[:, None]
            acc2 += tile * scale[None, :]
        acc = tl.sum(acc2, 0)[None, :]  # [1, BLOCK_N]
        offs_m = tl.arange(0, 1)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            acc = _k_block_dot(acc, x_ptrs, m_mask, qw_ptrs, QZ, S, k0, offs_n, n_mask, N,
                               GROUP_SIZE, BLOCK_K, BLOCK_N, DTYPE, FP32_DOT, UPCAST_DOT)

    mask = (offs_m[:, None] < M) & n_mask[None, :]
    if WRITE_PARTIALS:
        rows = (tl.program_id(1) * M + offs_m).to(tl.int64)
        tl.store(Part + rows[:, None] * N + offs_n[None, :], acc, mask=mask)
        if ONE_PASS:
            _sum_splits_if_last(Part, Out, Tickets, acc, offs_m[:, None].to(tl.int64), offs_n[None, :], mask,
                                M, N, stride_om)
    else:
        out = Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_if_last(Part, Out, Tickets, acc, rows, cols, mask, M, N, stride_om):
    """ONE_PASS split-K: the column block's last program to finish (`last_to_finish`) sums every split's
    partials in split order, as `_int4_splitk_reduce_kernel` does (the same bits), and writes Out.
    acc: this program's [.., ..] partial (for the shape); rows, cols: broadcastable int64 / int32 indices
    of the output rows and columns in acc's layout; mask: acc's valid elements."""
    ticket_ptr = Tickets + tl.program_id(0)
    if last_to_finish(ticket_ptr, tl.num_programs(1)):
        total = tl.zeros_like(acc)
        part_ptrs = Part + rows * N + cols
        for _ in range(tl.num_programs(1)):
            total += tl.load(part_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            part_ptrs += M * N
        tl.store(Out + rows * stride_om + cols, total.to(Out.dtype.element_ty), mask=mask)
        ticket_reset(ticket_ptr)


# ---- decode GEMV on tensor cores, the weight tile as the MMA's A operand -------------------------

# A nibble q OR-ed into the low mantissa bits of bf16 128.0 (0x4300) or fp16 1024.0 (0x6400) reads as
# exactly bias + q: both have a unit step there. One PRMT gathers byte b of two int32 into the low bytes
# of each 16-bit half, one LOP3 computes (t & 0x000F000F) | bias: two weights in two instructions.
MMA_FLOAT_BIAS = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}
MMA_BLOCK_K = 128  # 16 int32 rows: each of the 8 nibble planes is one K = 16 MMA step


def nibble_pair_asm(byte: int, bias_bits: int) -> str:
    """PTX taking two int32 ($1, $2) to two 16-bit floats in $0 (the first in the low half): the low
    nibble of byte `byte` of each, OR-ed into the float bias `bias_bits`."""
    selector = ((4 + byte) << 8) | byte  # result byte 0 <- $1's byte, byte 2 <- $2's byte
    return (f"{{ .reg .b32 t; prmt.b32 t, $1, $2, {selector:#x}; "
            f"lop3.b32 $0, t, 0x000F000F, {bias_bits * 0x10001:#x}, 0xEA; }}")  # 0xEA: (a & b) | c


_NIBBLE_ASM_BF16 = tl.constexpr(tuple(nibble_pair_asm(b, MMA_FLOAT_BIAS[torch.bfloat16][0]) for b in range(4)))
_NIBBLE_ASM_FP16 = tl.constexpr(tuple(nibble_pair_asm(b, MMA_FLOAT_BIAS[torch.float16][0]) for b in range(4)))


@triton.jit
def _nibble_plane(qw, qw_hi, J: tl.constexpr, DTYPE: tl.constexpr, BIAS: tl.constexpr, ASM: tl.constexpr):
    """Nibble J of every int32 of qw as the float BIAS + q in DTYPE (exact), same shape. qw_hi is qw >> 4
    (odd nibbles then sit at the bottom of a byte). ASM: PRMT + LOP3 per two weights (CUDA); else the
    same values by arithmetic (the interpreter runs no PTX)."""
    src = qw_hi if J % 2 == 1 else qw
    if ASM:
        if DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_NIBBLE_ASM_BF16[J // 2], "=r,r,r", [src], dtype=tl.bfloat16,
                                             is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(_NIBBLE_ASM_FP16[J // 2], "=r,r,r", [src], dtype=tl.float16,
                                             is_pure=True, pack=2)
    else:
        return (((src >> (8 * (J // 2))) & 0xF).to(tl.float32) + BIAS).to(DTYPE)


@kernel(do_not_specialize=["k_per_split"])
def _int4_gemv_mma_kernel(
    X, QW, QZ, S, Out, Part,  # x [M, K] row-strided; qweight [K/8, N]; qzeros [K/g, N/8]; scales [K/g, N]
    Tickets,  # ONE_PASS: int32 [cdiv(N, BLOCK_N)], zero
    M, N, K, stride_xm, stride_om, k_per_split,  # out [M, N] row-strided; Part fp32 [SPLIT_K, M, N]
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_PARTIALS: tl.constexpr,
    BIAS: tl.constexpr, ASM: tl.constexpr, ONE_PASS: tl.constexpr = False,  # BIAS: MMA_FLOAT_BIAS[x.dtype][1]
    PDL: tl.constexpr = False,
):
    """Up to 16 rows of x against BLOCK_N output columns, K tiles of BLOCK_K = 128 (inside one group).
    out^T = W x^T with the weight as the A operand, so its dequantized tile goes from the registers it
    was loaded into straight to the tensor cores (x, the B operand, is the small one).
    Nibble plane j of the [16, BLOCK_N] int32 tile is input rows k0 + 8r + j (r = 0..15): one
    [BLOCK_N, 16] x [16, 16] MMA against the matching strided rows of x. The planes hold bias + q
    (`_nibble_plane`), so per group and column: sum_k (q_k - z) x_k = part - (bias + z) sum_k x_k, then
    times the scale, in fp32 (fp16: see ZERO_IN_PLANES)."""
    pdl_prologue(PDL)
    offs_n, n_mask, offs_r, k_start, k_end, qw_ptrs = _gemv_program(QW, N, K, k_per_split, BLOCK_N, BLOCK_K)
    offs_m = tl.arange(0, 16)
    m_mask = offs_m < M
    DTYPE: tl.constexpr = X.dtype.element_ty
    # fp16's bias of 1024 would cost the fp32 sums 10 bits (a tenth of fp16 results off by one ulp), so
    # fp16 subtracts bias + z from the planes (exact, half an instruction a weight); bf16's 128 costs 7.
    ZERO_IN_PLANES: tl.constexpr = DTYPE == tl.float16
    x_ptrs = X + offs_m[None, :].to(tl.int64) * stride_xm + offs_r[:, None] * 8  # [16 (r), 16 (m)]

    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        scale, zero = _group_scale_zero(QZ, S, k0 // GROUP_SIZE, offs_n, n_mask, N)
        qw = tl.load(qw_ptrs + (k0 // 8) * N, mask=n_mask[None, :], other=0, eviction_policy="evict_first")
        qw = tl.trans(qw)  # [BLOCK_N, 16]
        qw_hi = qw >> 4
        zero_bias = zero + BIAS
        part = tl.zeros([BLOCK_N, 16], tl.float32)
        x_sum = tl.zeros([16, 16], tl.float32)
        for j in tl.static_range(8):
            w = _nibble_plane(qw, qw_hi, j, DTYPE, BIAS, ASM)
            if ZERO_IN_PLANES:
                w = w - zero_bias.to(DTYPE)[:, None]
            x = tl.load(x_ptrs + k0 + j, mask=m_mask[None, :], other=0.0)
            if not ZERO_IN_PLANES:
                x_sum += x.to(tl.float32)
            if ASM:
                part = tl.dot(w, x, part)
            else:  # the interpreter's numpy has no bf16 matmul; the products are exact in fp32 either way
                part = tl.dot(w.to(tl.float32), x.to(tl.float32), part, input_precision="ieee")
        if ZERO_IN_PLANES:
            acc += part * scale[:, None]
        else:
            col_sum = tl.sum(x_sum, 0)  # [16]: each row of x summed over this K tile
            acc += (part - zero_bias[:, None] * col_sum[None, :]) * scale[:, None]

    mask = n_mask[:, None] & m_mask[None, :]
    if WRITE_PARTIALS:
        rows = (tl.program_id(1) * M + offs_m).to(tl.int64)
        tl.store(Part + rows[None, :] * N + offs_n[:, None], acc, mask=mask)
        if ONE_PASS:
            _sum_splits_if_last(Part, Out, Tickets, acc, offs_m[None, :].to(tl.int64), offs_n[:, None], mask,
                                M, N, stride_om)
    else:
        out = Out + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        tl.store(out, acc.to(Out.dtype.element_ty), mask=mask)


@kernel(do_not_specialize=["num_splits"])
def _int4_splitk_reduce_kernel(Part, Out, M, N, stride_om, num_splits, BLOCK: tl.constexpr,
                               PDL: tl.constexpr = False):
    """Grid (M, cdiv(N, BLOCK)): out[m, n] = sum over splits s (in order) of Part[s, m, n], in fp32."""
    pdl_prologue(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(num_splits):
        acc += tl.load(Part + (s * M + m) * N + offs, mask=mask, other=0.0)
    tl.store(Out + m * stride_om + offs, acc.to(Out.dtype.element_ty), mask=mask)


REDUCE_BLOCK = 1024  # output columns of one reduce program (at most)


def splitk_reduce_launch(part: torch.Tensor, out2: torch.Tensor, num_splits: int) -> tuple:
    """(kernel, grid, args, constexprs) of `_int4_splitk_reduce_kernel` summing fp32 part [num_splits, M, N]
    into out2 [M, N]: the split-K GEMVs' second launch."""
    M, N = out2.shape
    block = min(REDUCE_BLOCK, next_power_of_2(N))
    return (_int4_splitk_reduce_kernel, (M, cdiv(N, block)), (part, out2, M, N, out2.stride(0), num_splits),
            dict(BLOCK=block))
