"""int4 group-wise asymmetric weights (GPTQ layout) and their dequant-matmul.

Conventions (the whole file): a weight w [out, in] is cut along the input dim into groups of g
consecutive columns; group i // g of output o has a scale s and a zero point z in 0..15, and
w[o, i] = (q[o, i] - z) * s with q in 0..15. Dequantization computes (q - z) * s in fp32 and rounds
once to the target dtype; the reference, the quantizer and the Triton kernels for M > 1 produce the same
dequantized values, so those differ from `int4_linear_ref` only by fp32 summation order. The one-row
decode kernel skips the rounding of each weight (q - z exact, the scale applied per tile in fp32): its
result is nearer the exact product than the reference's. So does `_int4_gemv_mma_kernel` (up to 16 rows
on tensor cores, the weight as the A operand; a launch one asks for, `int4_launch(kind="gemv_mma")`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import (H100_SMS, LaunchConfig, as_rows, cdiv, kernel, last_to_finish, launch_config,
                      next_power_of_2, pdl_prologue, sm_count, ticket_reset, tickets, triton_dtype)
from .options import DEFAULT_OPTIONS, KernelOptions


@dataclass
class Int4Weight:
    """A weight [out, in] quantized per group of `group_size` consecutive input columns:
    w[o, i] = (q[o, i] - zero[i // g, o]) * scale[i // g, o], q and zero in 0..15.

    Stored in GPTQ's layout (desc_act=False), so GPTQ checkpoints load as they are:
    qweight: int32 [in // 8, out], eight 4-bit q along the input dim per int32 (lowest nibble first);
    qzeros: int32 [in // g, out // 8], eight 4-bit zeros along the output dim per int32 (lowest first),
        holding the zero point itself (GPTQ "v1" files store zero - 1; the loader converts);
    scales: [in // g, out] in the model dtype.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    shape: tuple
    group_size: int = 128

    format = "int4"

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Int4Weight":
        """A copy on `device` (default: where it is) with scales in `dtype` (default: as they are);
        the packed integers are moved, never changed."""
        return Int4Weight(qweight=self.qweight.to(device), qzeros=self.qzeros.to(device),
                          scales=self.scales.to(device=device, dtype=dtype or self.scales.dtype),
                          shape=tuple(self.shape), group_size=self.group_size)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q uint8 [out, in], zero uint8 [in // g, out]): the 4-bit values, unpacked."""
        q = _unpack_nibbles(self.qweight, dim=0)  # [in, out]
        z = _unpack_nibbles(self.qzeros, dim=1)   # [in // g, out]
        return q.t().contiguous(), z

    def check(self, who: str = "Int4Weight") -> None:
        """ValueError unless the fields are a consistent GPTQ-layout weight (dtypes, shapes, group size)."""
        _check_layout(self.qweight, self.qzeros, self.scales, tuple(self.shape), self.group_size, who)


# ---- packing ---------------------------------------------------------------------------------

_SHIFTS = tuple(4 * j for j in range(8))


def _pack_nibbles(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Integers 0..15, `dim` of length 8n -> int32 with that dim n: value 8r + j goes to bits 4j..4j+3
    of int32 r (lowest nibble first), as GPTQ packs (the top nibble may make the int32 negative)."""
    v = v.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=v.device)
    packed = (v << shifts).sum(-1)                        # 0 .. 2**32 - 1
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # as int32 bits
    return packed.to(torch.int32).movedim(-1, dim).contiguous()


def _unpack_nibbles(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `_pack_nibbles`: int32 -> uint8 0..15, `dim` eight times longer."""
    p = p.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=p.device)
    v = (p[..., None] >> shifts) & 0xF
    return v.reshape(*p.shape[:-1], p.shape[-1] * 8).to(torch.uint8).movedim(-1, dim).contiguous()


# ---- quantize / dequantize -------------------------------------------------------------------

GROUP_SIZES = (32, 64, 128)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _round_up_to(s64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive float64 values -> `dtype`, rounded up (never below s64), so 15 steps of the stored scale
    span the group's range exactly, not just up to a rounding."""
    s = s64.to(dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    up = (s.view(bits) + 1).view(dtype)  # the next representable value up (s is positive and finite)
    return torch.where(s.double() < s64, up, s)


def quantize_int4(w: torch.Tensor, *, group_size: int = 128, dtype: Optional[torch.dtype] = None) -> Int4Weight:
    """Round-to-nearest asymmetric int4 of w [out, in] per group of `group_size` input columns.

    group_size: 32, 64 or 128, dividing in; out a multiple of 8 (GPTQ packs zeros along out).
    Per group, in fp32: lo = min(w, 0), hi = max(w, 0) (the range includes 0, as GPTQ's quantizer
    does, so zero is exact and an all-positive group cannot overflow the 16 levels);
    scale = (hi - lo) / 15 (1 for an all-zero group), stored in `dtype` (default w.dtype) rounded up,
    so 15 stored steps span the range; zero = clamp(round(-lo / scale), 0, 15);
    q = clamp(round(w / scale) + zero, 0, 15), with the stored scale. round is half-to-even.
    Then |dequantize_int4(.) - w| <= scale / 2 per element (plus the rounding to w's dtype), and a
    weight already on such a grid (q spanning 0..15 in each group) comes back exactly.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_int4: w must be [out, in], got shape {tuple(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_int4: w dtype {w.dtype} is not supported; expected float32, float16 or bfloat16")
    out_f, in_f = w.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quantize_int4: group_size={group_size} is not supported; expected one of {GROUP_SIZES}")
    if in_f % group_size:
        raise ValueError(f"quantize_int4: group_size={group_size} does not divide in_features={in_f}")
    if out_f % 8 or out_f == 0:
        raise ValueError(f"quantize_int4: out_features={out_f} must be a positive multiple of 8 "
                         f"(GPTQ packs eight zero points per int32 along the output dim)")
    dtype = dtype or w.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_int4: scales dtype {dtype} is not supported")
    if not torch.isfinite(w).all():
        raise ValueError("quantize_int4: w has non-finite values")

    wg = w.detach().float().reshape(out_f, in_f // group_size, group_size)  # [out, groups, g]
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    s64 = (hi.double() - lo.double()) / 15
    s64 = torch.where(s64 > 0, s64, torch.ones_like(s64))
    scales = _round_up_to(s64, dtype)
    if not torch.isfinite(scales).all():
        raise ValueError(f"quantize_int4: a scale overflows {dtype}")
    s = scales.float()
    zero = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(wg / s[..., None]) + zero[..., None]).clamp(0, 15)
    q = q.reshape(out_f, in_f).to(torch.uint8)
    return Int4Weight(qweight=_pack_nibbles(q.t(), dim=0), qzeros=_pack_nibbles(zero.t(), dim=1),
                      scales=scales.t().contiguous(), shape=(out_f, in_f), group_size=group_size)


def dequantize_int4(w: Int4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[out, in] in `dtype` (default w.dtype): (q - zero) * scale in fp32, rounded once to dtype."""
    w.check("dequantize_int4")
    q, z = w.unpack()                                       # [out, in], [groups, out]
    g = w.group_size
    zf = z.t().float().repeat_interleave(g, dim=1)          # [out, in]
    sf = w.scales.t().float().repeat_interleave(g, dim=1)   # [out, in]
    return ((q.float() - zf) * sf).to(dtype or w.dtype)


def int4_linear_ref(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype: F.linear(x, dequantize_int4(w, x.dtype))."""
    return F.linear(x, dequantize_int4(w, x.dtype))


# ---- GPTQ checkpoints ------------------------------------------------------------------------

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _check_layout(qweight, qzeros, scales, shape, group_size, who):
    """The shared shape/dtype checks of a GPTQ-layout weight; ValueError with the expected layout."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{who}: {name} must be a 2-d int32 tensor, got "
                             f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{who}: scales must be a 2-d float32/float16/bfloat16 tensor, got "
                         f"{(scales.dtype, tuple(scales.shape)) if isinstance(scales, torch.Tensor) else scales}")
    out_f, in_f = shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        raise ValueError(f"{who}: group_size={group_size} must be a positive multiple of 8")
    if in_f % group_size or out_f % 8 or out_f <= 0 or in_f <= 0:
        raise ValueError(f"{who}: shape {shape} needs in_features a multiple of group_size={group_size} and "
                         f"out_features a positive multiple of 8")
    groups = in_f // group_size
    want = {"qweight": (in_f // 8, out_f), "qzeros": (groups, out_f // 8), "scales": (groups, out_f)}
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{who}: {name} has shape {tuple(t.shape)}, expected {want[name]} for a "
                             f"[{out_f}, {in_f}] weight in groups of {group_size}")
    if len({qweight.device, qzeros.device, scales.device}) != 1:
        raise ValueError(f"{who}: qweight, qzeros and scales are on different devices")


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
                *, group_size: int, checkpoint_format: str) -> Int4Weight:
    """An Int4Weight from a GPTQ checkpoint's tensors of one linear layer (4 bits, desc_act=False).

    qweight int32 [in // 8, out]; qzeros int32 [in // g, out // 8]; scales [in // g, out] (kept in
    their dtype; `Int4Weight.to(dtype=...)` casts); g_idx int [in] or None (it must be i // g: an
    act-order permutation is refused). group_size: the config's; -1 (one group per row) means in.
    checkpoint_format: "gptq" (AutoGPTQ v1: qzeros hold zero - 1, dequant w = scale * (q - (nibble + 1)))
    or "gptq_v2" (qzeros hold the zero point itself). v1 nibbles are converted by +1; a v1 nibble 15
    (zero point 16, which 4 bits cannot hold; written by v1 packers for zero 0) raises ValueError.
    Shape errors raise ValueError naming the field (the caller adds the tensor's checkpoint name).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"unpack_gptq: checkpoint_format {checkpoint_format!r} is not supported; "
                         f"expected one of {CHECKPOINT_FORMATS}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise ValueError(f"unpack_gptq: qweight must be a 2-d int32 tensor [in // 8, out], got "
                         f"{tuple(qweight.shape) if isinstance(qweight, torch.Tensor) else type(qweight).__name__}")
    in_f, out_f = qweight.shape[0] * 8, qweight.shape[1]
    if group_size == -1:
        group_size = in_f
    _check_layout(qweight, qzeros, scales, (out_f, in_f), group_size, "unpack_gptq")
    if g_idx is not None:
        if not isinstance(g_idx, torch.Tensor) or g_idx.shape != (in_f,) or g_idx.is_floating_point():
            raise ValueError(f"unpack_gptq: g_idx must be an integer tensor of shape ({in_f},), got "
                             f"{(g_idx.dtype, tuple(g_idx.shape)) if isinstance(g_idx, torch.Tensor) else g_idx}")
        trivial = torch.arange(in_f, device=g_idx.device) // group_size
        if not torch.equal(g_idx.to(torch.int64), trivial):
            raise ValueError("desc_act/act-order checkpoints are not supported "
                             f"(g_idx is not i // group_size for group_size={group_size})")
    if checkpoint_format == "gptq":
        nib = _unpack_nibbles(qzeros, dim=1)
        if (nib == 15).any():
            raise ValueError("unpack_gptq: a GPTQ v1 zero nibble is 15 (zero point 16, or a zero of 0 packed as -1), "
                             "which a 4-bit zero point cannot hold")
        qzeros = _pack_nibbles(nib + 1, dim=1)
    return Int4Weight(qweight=qweight.contiguous(), qzeros=qzeros.contiguous(), scales=scales.contiguous(),
                      shape=(out_f, in_f), group_size=group_size)


# ---- Triton dequant-matmul -------------------------------------------------------------------
#
# Decode (M <= 16 rows): `_int4_gemv_kernel`, grid (cdiv(N, BLOCK_N), SPLIT_K). Program (n, s) streams
# the packed columns [n * BLOCK_N, +BLOCK_N) of qweight over its share of the K tiles, each int32
# loaded once as a [BLOCK_K // 8, BLOCK_N] tile and dequantized in registers: nibble j of each int32
# (shift by 4j, mask) minus the group's zero, times its scale (BLOCK_K divides the group, so one
# scale/zero row per tile), rounded to x's dtype. M = 1 differs: the 8 nibble planes stay in the layout
# the tile was loaded in (input rows 8r + j); per plane (q - z) exactly (magic-number trick below) times
# the matching stride-8 slice of x, fp32 FMAs into a per-tile [BLOCK_K // 8, BLOCK_N] sum that is
# multiplied by the group's scale once per tile and added to the accumulator, reduced once after the
# loop. That is 4 instructions a weight instead of 7 (no scale multiply, no rounding to x's dtype and
# back per weight): 20-30% faster on an H200 (bench/results/NVIDIA-H200-2026-11-26/gemv-sweep.md), and
# the dequantized weights are not rounded to x's dtype, so the result is nearer the exact product than
# `int4_linear_ref` is. 2 <= M <= 16: one 16-row tile (rows past M masked); the
# tile expanded to [BLOCK_K // 8, 8, BLOCK_N], reshaped to [BLOCK_K, BLOCK_N] and fed to tl.dot.
# With SPLIT_K > 1 each program writes fp32 partials [SPLIT_K, M, N] and `_int4_splitk_reduce_kernel`
# sums them in split order (deterministic) and rounds to x's dtype (with the experiment "int4_one_pass",
# the column block's last program does, `_sum_splits_if_last`); with SPLIT_K = 1 the program writes the
# output.
# Prefill (M > 16): `_int4_gemm_kernel`, [BLOCK_M, BLOCK_N] output tiles in grouped order (GROUP_M
# row tiles share the weight columns in L2), K loop of [BLOCK_M, BLOCK_K] x tiles and dequantized
# [BLOCK_K, BLOCK_N] weight tiles, tl.dot with fp32 accumulation.
# Dequantization: q - z exactly via the magic-number trick (q | 0x4B000000 read as fp32 is 2**23 + q;
# no int->float conversion instructions), times the fp32 scale, rounded to x's dtype: the values of
# `dequantize_int4(w, x.dtype)`. x times w is exact in fp32 (16-bit operands), accumulated in fp32.
# FP32_DOT: float32 x takes IEEE dots (tl.dot would use TF32). UPCAST_DOT (interpreter only): Triton
# 3.6's interpreter cannot multiply bf16 values, so bf16 dot operands go to fp32 (same exact products).

FLOAT_BIAS_BITS = 0x4B000000  # the fp32 2^23: OR-ed with a nibble q (< 2^23) it reads as 2^23 + q
_MAX_SPLIT_K = 16
_GEMV_MAX_M = 16
_REDUCE_BLOCK = 1024


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


# ---- launch heuristics -----------------------------------------------------------------------

@dataclass(frozen=True)
class Int4Launch:
    kind: str        # "gemv" (M <= 16), "gemv_mma" (M <= 16, weight as the A operand) or "gemm"
    block_m: int     # gemv: 1 (FMA path) or 16 (one tensor-core row tile); gemv_mma: 16 (x's columns)
    block_n: int
    block_k: int     # divides the group size: one scale/zero row per K tile
    split_k: int     # gemv: programs along K (fp32 partials and a reduce pass when > 1); gemm: 1
    num_warps: int
    num_stages: int


def _check_mma(M: int, dtype: torch.dtype, group_size: int, block_k: int, who: str) -> None:
    """ValueError unless `_int4_gemv_mma_kernel` can run this: M <= 16 rows of fp16/bf16 x, K tiles of
    128 inside a group."""
    if M > _GEMV_MAX_M or dtype not in MMA_FLOAT_BIAS or block_k != MMA_BLOCK_K or group_size % MMA_BLOCK_K:
        raise ValueError(f"{who}: gemv_mma runs M <= {_GEMV_MAX_M} rows of fp16/bf16 x in K tiles of "
                         f"{MMA_BLOCK_K} with groups of a multiple of it; got M={M}, {dtype}, "
                         f"BLOCK_K={block_k}, group_size={group_size}")


def split_count(tiles: int, N: int, block_n: int, on_cuda: bool = True, num_sms: int = H100_SMS,
                wanted: Optional[int] = None) -> int:
    """GEMV programs along K (tiles of BLOCK_K): enough for 4 programs per SM where K has the tiles (at most
    16), none empty; 3 at most in the interpreter. wanted: ask for that many instead (bench/gemv_sweep.py),
    still capped and made non-empty."""
    if wanted is None:
        wanted = cdiv(4 * num_sms, cdiv(N, block_n)) if on_cuda else 3
    split = max(1, min(wanted, tiles, _MAX_SPLIT_K))
    return cdiv(tiles, cdiv(tiles, split))  # no empty splits


def int4_launch(M: int, N: int, K: int, group_size: int, dtype: torch.dtype, on_cuda: bool = True,
                num_sms: int = H100_SMS, kind: Optional[str] = None, *,
                options: KernelOptions = DEFAULT_OPTIONS) -> Int4Launch:
    """The one place tile sizes and the split count are picked (the same on sm_80 and sm_90, and in the
    interpreter except for the split count, so the CPU tests run the GPU's tiling).

    BLOCK_K: the largest power of two up to 128 (gemv) / 64 (gemm) / 32 (fp32 dots) dividing the group.
    gemv M = 1: 256 columns a program, fp32 FMAs (4 warps, 3 stages): of 18 tiles swept on an H200 at
    the 7B shapes (bench/gemv_sweep.py) the fastest over all four linears.
    gemv 2 <= M <= 16: a 16-row tensor-core tile, 64 columns (4 warps, 3 stages). The split count makes
    cdiv(N, BLOCK_N) * SPLIT_K at least 4x the SM count where K has the tiles for it (at most 16
    splits): decode streams the weight, so it needs many loads in flight on every SM. The interpreter
    uses at most 3 splits (it pays per program, not per byte, but the tests should see split-K).
    gemm 16-bit: 128 x 128 tiles with 8 warps for M > 64, 64 x 128 with 4 warps otherwise, 3 stages.
    fp32 x (IEEE dots, no tensor cores; a debugging path): gemv 16 x 64 x 32 and gemm 64 x 64 x 32 with
    8 warps and 2 stages, tiles that do not spill on either architecture.
    kind="gemv_mma" asks for `_int4_gemv_mma_kernel` (M <= 16, 16-bit x, group a multiple of 128): 256
    columns, 4 warps, 3 stages, split as the gemv. Not the default until a GPU run measures it
    (bench/gemv_sweep.py); sm_90 SASS loop: 2.6 instructions a weight (fp16 3.0) against the FMA path's 4.8.
    With the experiment "int4_mma" in `options` (see kernels/options.py) it is what kind=None gives where
    it can run.
    """
    if kind is None and M <= _GEMV_MAX_M and options.has("int4_mma") and dtype in MMA_FLOAT_BIAS \
            and group_size % MMA_BLOCK_K == 0:
        kind = "gemv_mma"
    if kind == "gemv_mma":
        _check_mma(M, dtype, group_size, MMA_BLOCK_K, "int4_launch")
        block_n = 256
        tiles = K // MMA_BLOCK_K
        return Int4Launch("gemv_mma", 16, block_n, MMA_BLOCK_K, split_count(tiles, N, block_n, on_cuda, num_sms),
                          num_warps=4, num_stages=3)
    if kind not in (None, "gemv", "gemm"):
        raise ValueError(f"int4_launch: unknown kind {kind!r}; expected 'gemv', 'gemv_mma' or 'gemm'")
    pow2_of_group = group_size & -group_size
    fp32 = dtype == torch.float32
    if M <= _GEMV_MAX_M:
        block_m = 1 if M == 1 else 16
        block_k = min(32 if fp32 and block_m > 1 else 128, pow2_of_group)
        num_warps, num_stages = (8, 2) if fp32 and block_m > 1 else (4, 3)
        block_n = 256 if block_m == 1 else 64
        split = split_count(K // block_k, N, block_n, on_cuda, num_sms)
        return Int4Launch("gemv", block_m, block_n, block_k, split, num_warps, num_stages)
    if fp32:
        return Int4Launch("gemm", 64, 64, min(32, pow2_of_group), 1, num_warps=8, num_stages=2)
    if M > 64:
        return Int4Launch("gemm", 128, 128, min(64, pow2_of_group), 1, num_warps=8, num_stages=3)
    return Int4Launch("gemm", 64, 128, min(64, pow2_of_group), 1, num_warps=4, num_stages=3)


# ---- launcher --------------------------------------------------------------------------------

def _prepare(x: torch.Tensor, w: Int4Weight, on_cuda: Optional[bool] = None, num_sms: Optional[int] = None,
             cfg: Optional[Int4Launch] = None, one_pass: Optional[bool] = None,
             options: KernelOptions = DEFAULT_OPTIONS):
    """Check the arguments, allocate the output (and split-K scratch) and build the launches:
    (out, [(kernel, grid, args, constexprs, num_warps, num_stages), ...]) — empty when there is nothing
    to compute. Runs on meta tensors too (see `aot_configs`, which passes on_cuda and num_sms).
    one_pass (default: whether `options` has the experiment "int4_one_pass"): with split-K, the GEMV's last
    program per column block sums the partials (`_sum_splits_if_last`) instead of `_int4_splitk_reduce_kernel`."""
    if not isinstance(w, Int4Weight):
        raise TypeError(f"int4_linear: w must be an Int4Weight, got {type(w).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"int4_linear: x dtype {x.dtype} is not supported; expected float32, float16 or bfloat16")
    w.check("int4_linear")
    N, K = w.shape
    g = w.group_size
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"int4_linear: x must be [..., {K}] for a [{N}, {K}] weight, got {tuple(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"int4_linear: x on {x.device}, weight on {w.device}")
    if g % 32:
        raise ValueError(f"int4_linear: group_size={g} is not supported by the kernels (a multiple of 32)")
    for name, t in (("qweight", w.qweight), ("qzeros", w.qzeros), ("scales", w.scales)):
        if not t.is_contiguous():
            raise ValueError(f"int4_linear: {name} must be contiguous")
    x2 = as_rows(x, K, "int4_linear: x")
    M = x2.shape[0]
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    out2 = out.view(M, N)
    if M == 0:
        return out, []
    on_cuda = x.is_cuda if on_cuda is None else on_cuda
    cfg = cfg or int4_launch(M, N, K, g, x.dtype, on_cuda=on_cuda, num_sms=num_sms or sm_count(x.device),
                             options=options)
    if cfg.kind == "gemv_mma":
        _check_mma(M, x.dtype, g, cfg.block_k, "int4_linear")
    flags = dict(FP32_DOT=x.dtype == torch.float32, UPCAST_DOT=not on_cuda and x.dtype == torch.bfloat16)
    common = dict(GROUP_SIZE=g, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    if cfg.kind == "gemm":
        grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),)
        args = (x2, w.qweight, w.qzeros, w.scales, out2, M, N, K, x2.stride(0), out2.stride(0))
        return out, [(_int4_gemm_kernel, grid, args, dict(**common, GROUP_M=8, **flags), cfg.num_warps,
                      cfg.num_stages)]
    k_per_split = cdiv(K // cfg.block_k, cfg.split_k) * cfg.block_k
    part = (torch.empty(cfg.split_k, M, N, dtype=torch.float32, device=x.device) if cfg.split_k > 1 else out2)
    grid = (cdiv(N, cfg.block_n), cfg.split_k)
    one_pass = cfg.split_k > 1 and (options.has("int4_one_pass") if one_pass is None else one_pass)
    args = (x2, w.qweight, w.qzeros, w.scales, out2, part, tickets(x.device, grid[0]), M, N, K, x2.stride(0),
            out2.stride(0), k_per_split, FLOAT_BIAS_BITS)
    if cfg.kind == "gemv_mma":
        launches = [(_int4_gemv_mma_kernel, grid, args[:-1],
                     dict(GROUP_SIZE=g, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, WRITE_PARTIALS=cfg.split_k > 1,
                          BIAS=MMA_FLOAT_BIAS[x.dtype][1], ASM=on_cuda, ONE_PASS=one_pass),
                     cfg.num_warps, cfg.num_stages)]
    else:
        launches = [(_int4_gemv_kernel, grid, args,
                     dict(**common, WRITE_PARTIALS=cfg.split_k > 1, ONE_PASS=one_pass, **flags),
                     cfg.num_warps, cfg.num_stages)]
    if cfg.split_k > 1 and not one_pass:
        block = min(_REDUCE_BLOCK, next_power_of_2(N))
        launches.append((_int4_splitk_reduce_kernel, (M, cdiv(N, block)),
                         (part, out2, M, N, out2.stride(0), cfg.split_k), dict(BLOCK=block), 4, 1))
    return out, launches


def int4_linear(x: torch.Tensor, w: Int4Weight, cfg: Optional[Int4Launch] = None, *,
                options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Triton x @ dequant(w)^T; same contract as `int4_linear_ref` (differs by fp32 summation order, and
    for one row by the rounding of the dequantized weights, which that kernel skips).

    x: [..., in] fp32/fp16/bf16, unit stride in the last dim, leading dims that flatten to one row
    stride (no copy); w: an Int4Weight [out, in] on x's device, contiguous fields, group size a
    multiple of 32 (scales in any float dtype; they are read as fp32). Returns a new contiguous
    [..., out] tensor in x's dtype. Weights dequantize to x's dtype ((q - z) * s in fp32, rounded
    once; not rounded when M = 1), products and sums in fp32 (float32 x: IEEE dots, not TF32). M = rows of x: M <= 16 runs
    the decode GEMV (split-K with a deterministic reduce), M > 16 the tiled GEMM. CUDA tensors run the
    compiled kernels, CPU tensors Triton's interpreter. cfg: a launch other than `int4_launch`'s (benchmarks;
    a "gemv_mma" launch needs M <= 16, fp16/bf16 x and group 128, else ValueError). options: the kernel
    paths (PDL, the experiments "int4_mma" and "int4_one_pass").
    """
    out, launches = _prepare(x, w, cfg=cfg, options=options)
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device:  # Triton launches on the current CUDA device
        for kern, grid, args, constexprs, num_warps, num_stages in launches:
            kern.on(x, options)[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    return out


# ---- ahead-of-time specialisations -----------------------------------------------------------

_AOT_MODELS = (("CodeLlama-7b", "7B"), ("CodeLlama-34b", "34B"), ("CodeLlama-70b", "70B"))


def aot_configs(dtypes=(torch.bfloat16, torch.float16), group_size: int = 128, rows=(1, 8, 512),
                models=_AOT_MODELS) -> list[LaunchConfig]:
    """The CUDA launches of the 7B/34B/70B linears (wqkv, wo, w13, w2) in bf16 and fp16, group 128, for
    decode (M = 1 and 8; also through `_int4_gemv_mma_kernel`) and prefill (M = 512): `_prepare` run on
    meta tensors (H100's SM count), typed as the JIT would type them. Shapes that specialise alike share
    one entry, labelled with the first shape that needed it. The arguments let tests compile other
    specialisations (fp32, groups 32/64)."""
    from ..model.config import PRESETS

    configs = {}
    for dtype in dtypes:
        for preset, model in models:
            for name, (n_out, n_in) in PRESETS[preset].projection_shapes().items():
                groups = n_in // group_size
                w = Int4Weight(qweight=torch.empty(n_in // 8, n_out, dtype=torch.int32, device="meta"),
                               qzeros=torch.empty(groups, n_out // 8, dtype=torch.int32, device="meta"),
                               scales=torch.empty(groups, n_out, dtype=dtype, device="meta"),
                               shape=(n_out, n_in), group_size=group_size)
                for M in rows:
                    x = torch.empty(M, n_in, dtype=dtype, device="meta")
                    cfgs = [None]
                    if M <= _GEMV_MAX_M and dtype in MMA_FLOAT_BIAS and group_size % MMA_BLOCK_K == 0:
                        cfgs.append(int4_launch(M, n_out, n_in, group_size, dtype, num_sms=H100_SMS, kind="gemv_mma"))
                    launches = []  # split-K partials summed by a second kernel, or by the last program
                    for cfg, one_pass in itertools.product(cfgs, (False, True)):
                        launches += _prepare(x, w, on_cuda=True, num_sms=H100_SMS, cfg=cfg, one_pass=one_pass)[1]
                    for kern, _, args, constexprs, num_warps, num_stages in launches:
                        cfg = launch_config(kern, args, constexprs, num_warps=num_warps, num_stages=num_stages)
                        key = (kern.__name__, tuple(cfg.signature.items()), tuple(cfg.constexprs.items()),
                               cfg.divisible_by_16, num_warps, num_stages)
                        if key in configs:
                            continue
                        blocks = "x".join(str(constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
                                          if k in constexprs)
                        extra = " partials" if constexprs.get("WRITE_PARTIALS") else ""
                        extra += " one-pass" if constexprs.get("ONE_PASS") else ""
                        extra += " mma" if kern is _int4_gemv_mma_kernel else ""
                        group = f" g{group_size}" if group_size != 128 else ""
                        label = (f"{triton_dtype(dtype)}{group} M={M} {blocks}{extra} ({model} {name} "
                                 f"{n_out}x{n_in})")
                        configs[key] = dataclasses.replace(cfg, label=label)
    return list(configs.values())
