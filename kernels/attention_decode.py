"""Grouped-query attention of one query token per sequence against its KV cache (decode)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton import (H100_SMS, LaunchConfig, cdiv, kernel, last_to_finish, next_power_of_2,
                      pdl_prologue, placeholder, sm_count, ticket_reset, tickets, triton_dtype)
from .options import DEFAULT_OPTIONS, KernelOptions
from .shapes import head_layouts
from .rotary import check_rotary_to_cache, rotary_to_cache, rotary_to_cache_ref


def attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         lengths: torch.Tensor) -> torch.Tensor:
    """One query per sequence against its cached keys.

    q: [B, H, D]; k_cache, v_cache: [B, Hkv, S, D]; lengths: int64 [B], 1 <= lengths[b] <= S,
    sequence b attends to cache positions 0 .. lengths[b] - 1. fp32 math; returns [B, H, D].
    """
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    # query head h reads kv head h // G (G = H // Hkv): kv head g's G query heads in one matmul, no copy of
    # the cache per query head
    qg = q.float().reshape(B, Hkv, H // Hkv, D)
    k, v = k_cache.float(), v_cache.float()  # (no copy for an fp32 cache)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (1.0 / math.sqrt(D))  # [B, Hkv, G, S]
    valid = torch.arange(S, device=q.device)[None, :] < lengths[:, None]  # [B, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, Hkv, G, D]
    return out.reshape(B, H, D).to(q.dtype)


# ---- Triton flash-decoding -------------------------------------------------------------------
#
# Pass 1 (`_decode_split_kernel`), grid (B, Hkv, num_splits): program (b, g, s) takes the GROUP query
# heads of kv head g as one [BLOCK_G, D] tile (padded to >= 16 rows for tl.dot), so each K/V block is
# loaded once for the whole group. Sequence b's keys 0 .. lengths[b]-1 are cut on the device into
# num_splits chunks of whole BLOCK_N blocks; the program runs an online softmax over its chunk and
# writes the fp32 partials (running max m in log2 units, sum l, unnormalised sum of p * V).
# A chunk past the end of the sequence writes the neutral partial (m = -inf, l = 0, acc = 0).
# Pass 2 (`_decode_reduce_kernel`), grid (B, H): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s
# with M = max_s m_s (neutral partials weigh exactly 0), cast to q's dtype. With the experiment
# "attn_one_pass" pass 1's last program per (sequence, kv head) does that (`_combine_splits`, the same
# arithmetic) and pass 2 is not launched.
#
# KV_ALIGNED: the launcher found the K/V base addresses and batch/head/position strides 16-byte aligned
# (always so for slices of a contiguous cache) and the kernel states it with tl.multiple_of. The JIT
# would infer it from the argument values; an AOT compile sees no values, and without the hint its K/V
# loads are neither vectorised nor pipelined (255 registers and spills instead of 128 and none).
# UPCAST_DOT (CPU only): Triton 3.6's interpreter multiplies the raw uint16 bits of bf16 operands in
# tl.dot, so the interpreter path casts them to fp32 first (exact; the products are the same).

_LOG2E = 1.4426950408889634


@kernel(do_not_specialize=["seq_len", "num_splits"])  # one binary for every cache length and split count
def _decode_split_kernel(
    Q, K, V, Lengths, MidO, MidM, MidL, Out, Tickets,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh,
    seq_len, num_splits, qk_scale,
    # ROPE only: the new token's k, v [B, Hkv, D] (row-strided), rotary tables [P, D/2], positions, slots [B]
    KNew, VNew, stride_knb, stride_knh, stride_vnb, stride_vnh, Cos, Sin, Pos, stride_pb, Slots,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST_DOT: tl.constexpr, KV_ALIGNED: tl.constexpr, DIRECT: tl.constexpr = False,
    ONE_PASS: tl.constexpr = False, BLOCK_S: tl.constexpr = 16, ROPE: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """Pass 1: one (sequence, kv head, split) per program; its partial softmax state goes to MidO/MidM/MidL.
    DIRECT (one split): the program normalises and writes Out itself, as pass 2 would (no second pass).
    ONE_PASS: the last program of a (sequence, kv head) to finish (a ticket from Tickets, int32 [B * Hkv],
    zero before the launch and reset to zero by that program) combines the splits as pass 2 would.
    ROPE (decode's rotary and cache write, `_rotary_kernel`'s arithmetic): Q is not yet rotated; each
    program rotates its query heads at Pos[b]. The program whose keys hold slot Slots[b] (program 0 when
    no split does) rotates the new key into K[b, g, slot] and copies the new value into V, before its own
    loop reads them; the slot must be the last attended key (lengths[b] - 1) or beyond the attended ones,
    which is what decode passes. A slot outside [0, seq_len) writes nothing."""
    pdl_prologue(PDL)
    pid_b = tl.program_id(0)
    pid_g = tl.program_id(1)  # kv head
    pid_s = tl.program_id(2)
    n_heads = tl.num_programs(1) * GROUP

    # This split's keys [start, end): whole blocks of the sequence's own length (no host sync).
    length = tl.minimum(tl.load(Lengths + pid_b), seq_len).to(tl.int32)  # never read past the cache
    blocks_per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), num_splits)
    start = pid_s * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = pid_g * GROUP + offs_g  # query heads of this kv head

    b64 = pid_b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        partner = (offs_d + HALF) % HEAD_DIM  # rotate-half: dimension d pairs with d +- D/2
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        pos = tl.load(Pos + b64 * stride_pb).to(tl.int64)
        cos = tl.load(Cos + pos * HALF + offs_d % HALF)
        sin = tl.load(Sin + pos * HALF + offs_d % HALF)
        q_p = tl.load(q_ptrs + partner[None, :], mask=g_mask[:, None], other=0.0)
        q = _rotated(q, q_p, cos, sin, sign)
        slot = tl.load(Slots + b64).to(tl.int32)
        writes = (slot >= start) & (slot < end) | (pid_s == 0) & (slot >= length)
        if writes & (slot >= 0) & (slot < seq_len):
            kv_g = pid_g.to(tl.int64)
            k_new = KNew + b64 * stride_knb + kv_g * stride_knh
            k_rot = _rotated(tl.load(k_new + offs_d), tl.load(k_new + partner), cos, sin, sign)
            tl.store(K + b64 * stride_kb + kv_g * stride_kh + slot * stride_ks + offs_d, k_rot)
            v_new = tl.load(VNew + b64 * stride_vnb + kv_g * stride_vnh + offs_d)
            tl.store(V + b64 * stride_vb + kv_g * stride_vh + slot * stride_vs + offs_d, v_new)
        tl.debug_barrier()  # the new key and value are in the cache before any thread's loop reads them
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_ptrs = K + b64 * stride_kb + pid_g.to(tl.int64) * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + pid_g.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        kv_mask = (n0 + offs_n) < end
        k_tile = k_ptrs + n0 * stride_ks
        if KV_ALIGNED:  # 16-byte aligned rows (what the JIT infers from aligned arguments; AOT gets it here)
            k_tile = tl.multiple_of(k_tile, [16, 16])
        k = tl.load(k_tile, mask=kv_mask[:, None], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(kv_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the block holds >= 1 valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_tile = v_ptrs + n0 * stride_vs
        if KV_ALIGNED:
            v_tile = tl.multiple_of(v_tile, [16, 16])
        v = tl.load(v_tile, mask=kv_mask[:, None], other=0.0)
        p_v = p.to(v.dtype)  # P @ V on the tensor cores in V's dtype, fp32 accumulate
        if UPCAST_DOT:
            p_v, v = p_v.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision="ieee")
        m_i = m_new

    if DIRECT:  # pass 2's arithmetic for one split: weight 2^0 = 1, acc / l (l = 0: empty, output 0)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=g_mask[:, None])
    else:
        row = (b64 * n_heads + heads) * num_splits + pid_s  # [BLOCK_G] index into [B, H, num_splits]
        tl.store(MidM + row, m_i, mask=g_mask)
        tl.store(MidL + row, l_i, mask=g_mask)
        tl.store(MidO + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])
        if ONE_PASS:
            ticket_ptr = Tickets + b64 * tl.num_programs(1) + pid_g
            if last_to_finish(ticket_ptr, num_splits):
                for gi in tl.static_range(GROUP):
                    head = pid_g * GROUP + gi
                    _combine_splits(MidO, MidM, MidL, (b64 * n_heads + head) * num_splits, num_splits,
                                    Out + b64 * stride_ob + head * stride_oh, BLOCK_S, HEAD_DIM)
                ticket_reset(ticket_ptr)


@triton.jit
def _rotated(x, x_partner, cos, sin, sign):
    """Rotate-half RoPE of x (any shape, last dim D) given each element's partner (d +- D/2), the tables
    spread over D and sign -1 / +1 for the first / second half: in fp32, rounded to x's dtype, as
    `_rotary_kernel` computes x1 cos - x2 sin and x2 cos + x1 sin."""
    xf, pf = x.to(tl.float32), x_partner.to(tl.float32)
    return (xf * cos + sign * (pf * sin)).to(x.dtype)


@triton.jit
def _combine_splits(MidO, MidM, MidL, row0, num_splits, out_ptr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pass 2's arithmetic for one (sequence, head): its num_splits partials from row row0 on ->
    out_ptr[0 .. HEAD_DIM). Loads skip L1 (.cg): in one-pass mode other SMs wrote the partials."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    m_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        m = tl.load(MidM + row0 + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf"),
                    cache_modifier=".cg")
        m_max = tl.maximum(m_max, m)
    big_m = tl.max(m_max, 0)
    big_m = tl.where(big_m == float("-inf"), 0.0, big_m)  # every split empty (length 0): no NaN

    l_sum = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, HEAD_DIM], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_mask = s0 + offs_s < num_splits
        m = tl.load(MidM + row0 + s0 + offs_s, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(m - big_m)  # neutral partial: 2^-inf = 0
        l_sum += w * tl.load(MidL + row0 + s0 + offs_s, mask=s_mask, other=0.0, cache_modifier=".cg")
        o = tl.load(MidO + (row0 + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None],
                    other=0.0, cache_modifier=".cg")
        acc += w[:, None] * o
    denom = tl.sum(l_sum, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    out = tl.sum(acc, 0) / denom
    tl.store(out_ptr + offs_d, out.to(out_ptr.dtype.element_ty))


@kernel(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    MidO, MidM, MidL, Out,
    stride_ob, stride_oh,
    num_splits,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    row0 = (pid_b.to(tl.int64) * tl.num_programs(1) + pid_h) * num_splits
    _combine_splits(MidO, MidM, MidL, row0, num_splits, Out + pid_b.to(tl.int64) * stride_ob + pid_h * stride_oh,
                    BLOCK_S, HEAD_DIM)


# ---- launch heuristics -----------------------------------------------------------------------

_MAX_SPLITS = 128
_REDUCE_BLOCK_S = 16


@dataclass(frozen=True)
class DecodeLaunch:
    """Everything the launcher decides from the shapes; never from `lengths` (graph-safe)."""

    num_splits: int   # pass-1 programs per (sequence, kv head); each cuts its own length into this many chunks
    block_n: int      # keys per K/V tile
    block_g: int      # query-head rows per tile: GROUP padded to a power of two >= 16 (tl.dot minimum)
    num_warps: int
    num_stages: int
    reduce_block_s: int  # splits per step of the reduction loop
    reduce_num_warps: int
    reduce_num_stages: int


def decode_launch(B: int, n_kv_heads: int, S: int, group: int, head_dim: int, elem_size: int,
                  on_cuda: bool = True, num_sms: int = H100_SMS) -> DecodeLaunch:
    """The one place that picks split count and tile sizes, from (B, Hkv, S) and the head shape.

    CUDA: K/V tiles of 16 KiB (BLOCK_N = 64 keys at D=128 in 16-bit; three-stage cp.async pipeline,
    70 KiB shared), and enough splits that B * Hkv * num_splits is at least twice the SM count (at
    least two pass-1 programs are resident per SM), but no more splits than the cache has tiles.
    Each sequence then divides its own length among the splits on the device, so short sequences in
    a long cache (a graph captured at the full cache length) still spread over all splits.
    CPU (Triton's interpreter, tests only): the same tiles but at most 4 splits, since the interpreter
    pays per program, not per byte.
    """
    block_n = max(16, min(128, 16384 // (head_dim * elem_size)))
    block_g = max(16, next_power_of_2(group))
    n_blocks = cdiv(S, block_n)
    wanted = cdiv(2 * num_sms, B * n_kv_heads) if on_cuda else 4
    num_splits = max(1, min(wanted, n_blocks, _MAX_SPLITS))
    return DecodeLaunch(num_splits=num_splits, block_n=block_n, block_g=block_g, num_warps=4, num_stages=3,
                        reduce_block_s=_REDUCE_BLOCK_S, reduce_num_warps=4, reduce_num_stages=1)


def _split_constexprs(cfg: DecodeLaunch, group: int, head_dim: int, dtype: torch.dtype, on_cuda: bool,
                      kv_aligned: bool) -> dict:
    """Pass 1's constexprs, shared by the launcher and `aot_configs` so the two cannot drift apart."""
    return dict(GROUP=group, BLOCK_G=cfg.block_g, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim,
                UPCAST_DOT=not on_cuda and dtype == torch.bfloat16, KV_ALIGNED=kv_aligned,
                BLOCK_S=cfg.reduce_block_s)


def _reduce_constexprs(cfg: DecodeLaunch, head_dim: int) -> dict:
    return dict(BLOCK_S=cfg.reduce_block_s, HEAD_DIM=head_dim)


@dataclass(frozen=True)
class NewToken:
    """Decode's new token for the ROPE variant: k, v [B, Hkv, D] (unit stride along D) not yet rotated nor
    cached, rotary tables cos / sin fp32 [P, D/2], positions int64 [B, 1], cache slots int64 [B]."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor


def _launch(q, k_cache, v_cache, lengths, cfg: DecodeLaunch, out, mid_o, mid_m, mid_l,
            direct: Optional[bool] = None, one_pass: bool = False, new: Optional[NewToken] = None,
            options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Run the passes with the given decisions and buffers (inputs already checked; q with unit stride
    along D; out [B, H, D] with unit stride along D; contiguous fp32 scratch mid_o [B, H, num_splits, D],
    mid_m and mid_l [B, H, num_splits], unused when direct). direct (default: one split): pass 1 writes
    out and pass 2 is skipped. one_pass: pass 1's last program per (sequence, kv head) combines the splits
    (no pass-2 launch). new: q is not yet rotated and pass 1 also rotates and caches the new token (ROPE).
    options: PDL (one_pass is the caller's). Tests call it with poisoned buffers, and with direct=False for
    one split."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    direct = cfg.num_splits == 1 if direct is None else direct
    if direct and cfg.num_splits != 1:
        raise ValueError("attention_decode: direct output needs one split")
    if direct and one_pass:
        raise ValueError("attention_decode: one_pass needs several splits (one split writes the output directly)")
    kv_aligned = _aligned16(k_cache) and _aligned16(v_cache)
    if new is None:  # unused pointers of the ROPE variant
        f32 = placeholder(q.device, torch.float32)
        rope_args = (q, q, 0, 0, 0, 0, f32, f32, lengths, 0, lengths)
    else:
        rope_args = (new.k, new.v, new.k.stride(0), new.k.stride(1), new.v.stride(0), new.v.stride(1),
                     new.cos, new.sin, new.positions, new.positions.stride(0), new.slots)
    _decode_split_kernel.on(q, options)[(B, Hkv, cfg.num_splits)](
        q, k_cache, v_cache, lengths, mid_o, mid_m, mid_l, out, tickets(q.device, B * Hkv),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        S, cfg.num_splits, _LOG2E / math.sqrt(D), *rope_args,
        **_split_constexprs(cfg, H // Hkv, D, q.dtype, q.is_cuda, kv_aligned), DIRECT=direct,
        ONE_PASS=one_pass, ROPE=new is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not direct and not one_pass:
        _decode_reduce_kernel.on(q, options)[(B, H)](
            mid_o, mid_m, mid_l, out,
            out.stride(0), out.stride(1),
            cfg.num_splits,
            **_reduce_constexprs(cfg, D),
            num_warps=cfg.reduce_num_warps, num_stages=cfg.reduce_num_stages,
        )
    return out


def _aligned16(t: torch.Tensor) -> bool:
    """Base address and the batch/head/position strides are multiples of 16 bytes."""
    return all(x * t.element_size() % 16 == 0 for x in t.stride()[:3]) and t.data_ptr() % 16 == 0


def _check(q, k_cache, v_cache, lengths) -> None:
    who = "attention_decode"
    if not all(isinstance(t, torch.Tensor) for t in (q, k_cache, v_cache, lengths)):
        raise TypeError(f"{who}: q, k_cache, v_cache and lengths must be tensors")
    if q.dim() != 3:
        raise ValueError(f"{who}: q must be [B, H, D], got shape {tuple(q.shape)}")
    B, H, D = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{who}: q dtype {q.dtype} is not supported; expected float16, bfloat16 or float32")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{who}: {name} must be [B, Hkv, S, D], got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{who}: {name} dtype {t.dtype} != q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{who}: {name} on {t.device}, q on {q.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{who}: {name} must be contiguous along head_dim (stride {t.stride(-1)})")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{who}: k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}")
    Bk, Hkv, S, Dk = k_cache.shape
    if Bk != B or Dk != D:
        raise ValueError(f"{who}: cache shape {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if not (16 <= D <= 256 and D & (D - 1) == 0):
        raise ValueError(f"{who}: head_dim {D} must be a power of two in [16, 256]")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{who}: n_heads {H} is not a multiple of n_kv_heads {Hkv}")
    if S < 1:
        raise ValueError(f"{who}: empty KV cache")
    if lengths.dtype != torch.int64:
        raise TypeError(f"{who}: lengths must be int64, got {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"{who}: lengths must have shape ({B},), got {tuple(lengths.shape)}")
    if lengths.device != q.device:
        raise ValueError(f"{who}: lengths on {lengths.device}, q on {q.device}")


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, *, options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Triton flash-decoding; same contract and result as `attention_decode_ref`.

    q: [B, H, D] (any strides); k_cache, v_cache: [B, Hkv, S, D], unit stride along D (e.g. slices
    `cache[:B, :, :kv_len]` of a contiguous buffer, used in place); lengths: int64 [B] on q's device,
    1 <= lengths[b] <= S (not checked: reading it would sync). D a power of two in [16, 256].
    Scores, softmax and the weighted sum accumulate in fp32 (P is rounded to the V dtype for the
    P @ V product, as in flash-attention); returns a new contiguous [B, H, D] in q's dtype.
    Graph-capturable: launch decisions depend on shapes and `options` only (PDL, the experiment
    "attn_one_pass"); scratch comes from torch.empty.
    """
    _check(q, k_cache, v_cache, lengths)
    return _attention(q, k_cache, v_cache, lengths, options=options)


def _attention(q, k_cache, v_cache, lengths, new: Optional[NewToken] = None, *,
               options: KernelOptions) -> torch.Tensor:
    """`attention_decode` once its arguments are checked (with `new`: the ROPE variant)."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()  # [B, H, D] is tiny; the kernel then needs no head_dim stride
    cfg = decode_launch(B, Hkv, S, H // Hkv, D, q.element_size(), on_cuda=q.is_cuda,
                        num_sms=sm_count(q.device))
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if cfg.num_splits == 1:  # one pass writes out; no scratch
        return _launch(q, k_cache, v_cache, lengths, cfg, out, out, out, out, new=new, options=options)
    mid_o = torch.empty(B, H, cfg.num_splits, D, dtype=torch.float32, device=q.device)
    mid_m = torch.empty(B, H, cfg.num_splits, dtype=torch.float32, device=q.device)
    mid_l = torch.empty(B, H, cfg.num_splits, dtype=torch.float32, device=q.device)
    return _launch(q, k_cache, v_cache, lengths, cfg, out, mid_o, mid_m, mid_l,
                   one_pass=options.has("attn_one_pass"), new=new, options=options)


def rotary_attention_decode_ref(q, k, v, cos, sin, positions, k_cache, v_cache, slots, lengths) -> torch.Tensor:
    """Decode's attention step: `rotary_to_cache_ref` (q, k rotated at positions [B, 1]; k and v written
    into k_cache / v_cache [B, Hkv, S, D] at slots [B]), then `attention_decode_ref` of the rotated q
    [B, H, D] over the caches up to lengths [B]. q [B, H, 1, D], k, v [B, Hkv, 1, D]. -> [B, H, D]."""
    q = rotary_to_cache_ref(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    return attention_decode_ref(q[:, :, 0], k_cache, v_cache, lengths)


def rotary_attention_decode(q, k, v, cos, sin, positions, k_cache, v_cache, slots, lengths, *,
                            options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """The Triton backend's decode attention step, `rotary_attention_decode_ref`'s contract (slots[b] must
    be lengths[b] - 1, as decode passes them; q may be rotated in place). `rotary_to_cache` then
    `attention_decode`; with the experiment "attn_rope" in `options`, one launch: the attention kernel
    rotates q itself and its program holding the slot rotates and caches the new key and value first."""
    if not options.has("attn_rope"):
        q = rotary_to_cache(q, k, v, cos, sin, positions, k_cache, v_cache, slots, options=options)
        return attention_decode(q[:, :, 0], k_cache, v_cache, lengths, options=options)
    check_rotary_to_cache(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    _check(q[:, :, 0], k_cache, v_cache, lengths)
    new = NewToken(k[:, :, 0], v[:, :, 0], cos, sin, positions, slots)
    return _attention(q[:, :, 0], k_cache, v_cache, lengths, new, options=options)


# ---- ahead-of-time specialisations -----------------------------------------------------------

def aot_configs(models) -> list[LaunchConfig]:
    """The CUDA specialisations of both passes: bf16 and fp16, the head layouts (GQA group, head_dim) of
    `models` (ModelShapes, e.g. CodeLlama 7B: group 1, 34B/70B: group 8, head_dim 128).

    Block sizes come from `decode_launch`, as on the GPU; the split count and strides are runtime
    arguments, so one binary per (dtype, group) serves every batch size and cache length.
    """
    configs, seen_reduce = [], set()
    for dtype in (torch.bfloat16, torch.float16):
        ty = "*" + triton_dtype(dtype)
        for label, n_heads, n_kv, head_dim in head_layouts(models):
            group = n_heads // n_kv
            cfg = decode_launch(1, n_kv, 4096, group, head_dim, dtype.itemsize)
            # several splits (and a second pass, or one pass), or one split writing the output itself; each
            # also rotating and caching the new token (ROPE)
            for (direct, one_pass), rope in itertools.product(((False, False), (False, True), (True, False)),
                                                              (False, True)):
                split_sig = {"Q": ty, "K": ty, "V": ty, "Lengths": "*i64",
                             "MidO": ty if direct else "*fp32", "MidM": ty if direct else "*fp32",
                             "MidL": ty if direct else "*fp32", "Out": ty, "Tickets": "*i32",
                             **{name: "i32" for name in ("stride_qb", "stride_qh", "stride_kb", "stride_kh",
                                                         "stride_ks", "stride_vb", "stride_vh", "stride_vs",
                                                         "stride_ob", "stride_oh", "seq_len", "num_splits")},
                             "qk_scale": "fp32", "KNew": ty, "VNew": ty,
                             **{name: "i32" for name in ("stride_knb", "stride_knh", "stride_vnb", "stride_vnh")},
                             "Cos": "*fp32", "Sin": "*fp32", "Pos": "*i64", "stride_pb": "i32", "Slots": "*i64",
                             **{name: "constexpr" for name in ("GROUP", "BLOCK_G", "BLOCK_N", "HEAD_DIM",
                                                               "UPCAST_DOT", "KV_ALIGNED", "DIRECT", "ONE_PASS",
                                                               "BLOCK_S", "ROPE")}}
                constexprs = _split_constexprs(cfg, group, head_dim, dtype, on_cuda=True, kv_aligned=True)
                kind = (" direct" if direct else " one-pass" if one_pass else "") + (" rope" if rope else "")
                configs.append(LaunchConfig(
                    kernel=_decode_split_kernel, signature=split_sig,
                    constexprs={**constexprs, "DIRECT": direct, "ONE_PASS": one_pass, "ROPE": rope},
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    label=f"decode split{kind} {triton_dtype(dtype)} D{head_dim} group {group} ({label})"))
            if (dtype, head_dim) not in seen_reduce:  # the reduction does not depend on the group
                seen_reduce.add((dtype, head_dim))
                reduce_sig = {"MidO": "*fp32", "MidM": "*fp32", "MidL": "*fp32", "Out": ty,
                              "stride_ob": "i32", "stride_oh": "i32", "num_splits": "i32",
                              "BLOCK_S": "constexpr", "HEAD_DIM": "constexpr"}
                configs.append(LaunchConfig(
                    kernel=_decode_reduce_kernel, signature=reduce_sig,
                    constexprs=_reduce_constexprs(cfg, head_dim),
                    num_warps=cfg.reduce_num_warps, num_stages=cfg.reduce_num_stages,
                    label=f"decode reduce {triton_dtype(dtype)} D{head_dim}"))
    return configs
