"""Causal grouped-query attention over a chunk of queries placed after cached tokens (prefill), and its
per-row variant for speculative decoding (verify: each sequence's chunk at its own start, read on the device)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton.language as tl

from ._triton import LaunchConfig, cdiv, kernel, launch_config, triton_dtype
from .shapes import head_layouts


def _expand_kv(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, H, S, D]; query head h reads kv head h // (H // Hkv)."""
    return kv.repeat_interleave(n_heads // kv.shape[1], dim=1)


def attention_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of a query chunk placed after `start` cached tokens.

    q: [B, H, T, D]; k, v: [B, Hkv, S, D] with S >= start + T (keys beyond start + T are ignored).
    Query i (absolute position start + i) sees keys 0 .. start + i.
    Scores, softmax and the weighted sum in fp32; returns [B, H, T, D] in q's dtype.
    """
    B, H, T, D = q.shape
    S = start + T
    k = _expand_kv(k[:, :, :S], H).float()
    v = _expand_kv(v[:, :, :S], H).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * (1.0 / math.sqrt(D))
    q_pos = torch.arange(start, S, device=q.device)[:, None]
    k_pos = torch.arange(S, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)


def attention_prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """`attention_prefill_ref` through torch's fused `scaled_dot_product_attention` (the "cpu" backend's: a
    flash kernel on the CPU, no [T, S] score tensor), fp32 inside as the reference; same shapes."""
    H, T = q.shape[1], q.shape[2]
    if T == 0:
        return q.new_empty(q.shape)
    S = start + T
    k, v = k[:, :, :S].float(), v[:, :, :S].float()
    gqa = H != k.shape[1]
    if start == 0:
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(start, S, device=q.device)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, enable_gqa=gqa)
    return out.to(q.dtype)


def _verify_masks(q: torch.Tensor, S: int, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible [B, 1, T, S]: query i of row b sees key j <= min(starts[b] + i, S - 1); readable [B, 1, S, 1]:
    key j < min(starts[b] + T, S)), built on the device from starts (no host sync)."""
    T = q.shape[2]
    k_pos = torch.arange(S, device=q.device)
    q_pos = (starts[:, None] + torch.arange(T, device=q.device)).clamp(max=S - 1)  # [B, T]
    visible = k_pos[None, None, :] <= q_pos[:, :, None]
    readable = k_pos[None, :] < (starts[:, None] + T).clamp(max=S)
    return visible[:, None], readable[:, None, :, None]


def _verify_kv(kv: torch.Tensor, readable: torch.Tensor) -> torch.Tensor:
    """kv in fp32 with the keys a row must not read zeroed: garbage there (NaN) would survive a zero weight."""
    return torch.where(readable, kv.float(), 0.0)


def attention_verify_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         starts: torch.Tensor) -> torch.Tensor:
    """Causal attention of T queries per sequence, each sequence's placed at its own start (speculative
    decoding's verify step); `attention_prefill_ref` is the case starts = [start] * B.

    q: [B, H, T, D]; k_cache, v_cache: [B, Hkv, S, D] (S: the whole cache); starts: int64 [B] on q's device,
    >= 0. Query i of row b (position starts[b] + i) sees keys 0 .. min(starts[b] + i, S - 1); keys at or past
    min(starts[b] + T, S) are never read. Scores, softmax and the weighted sum in fp32; returns [B, H, T, D]
    in q's dtype.
    """
    B, H, T, D = q.shape
    visible, readable = _verify_masks(q, k_cache.shape[2], starts)
    k = _expand_kv(_verify_kv(k_cache, readable), H)
    v = _expand_kv(_verify_kv(v_cache, readable), H)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * (1.0 / math.sqrt(D))
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)


def attention_verify_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          starts: torch.Tensor) -> torch.Tensor:
    """`attention_verify_ref` through torch's `scaled_dot_product_attention` with a bool mask (the "cpu"
    backend's), fp32 inside as the reference; same shapes."""
    H = q.shape[1]
    visible, readable = _verify_masks(q, k_cache.shape[2], starts)
    k, v = _verify_kv(k_cache, readable), _verify_kv(v_cache, readable)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=visible,
                                                           enable_gqa=H != k.shape[1])
    return out.to(q.dtype)


# ---- Triton flash-attention prefill ----------------------------------------------------------
#
# Grid (cdiv(T, BLOCK_M), H, B); program (m, h, b) takes BLOCK_M queries of head h of sequence b as
# one [BLOCK_M, D] tile and runs an online softmax over the keys they see, reading kv head
# h // group in place (q, k, v, out by their own strides). Scores are scaled by
# qk_scale = log2(e) / sqrt(D) so the softmax runs on exp2; the running max m, the running sum l
# and the [BLOCK_M, D] accumulator stay in fp32; P is rounded to V's dtype for the P @ V product
# (as in flash-attention). As in Triton's fused-attention tutorial the key blocks are visited in
# two stages: stage 0, blocks every query of the tile sees in full (no mask); stage 1, the blocks
# on the diagonal (causal mask; loads masked at start + T). Blocks past the diagonal are skipped.
# FP32_DOT: float32 inputs take IEEE dots (tl.dot would use TF32). UPCAST_DOT (interpreter only):
# bf16 operands go to the dots as fp32, since the interpreter cannot multiply bf16 directly; the
# products are the same (bf16 x bf16 is exact in fp32).
# PER_ROW_START (verify): sequence b's start is Starts[b], loaded on the device (a CUDA graph replays the
# launch with new starts), and S is the cache length: kv_len = min(start + T, S) and a query's position is
# clamped to kv_len - 1, so a row whose chunk runs past the cache (an idle row) attends to keys 0 .. S - 1
# and reads nothing out of bounds. The prefill path passes Starts, stride_starts and S as None (constexprs:
# its binary is the one it was without them).

_LOG2E = 1.4426950408889634


@kernel(do_not_specialize=["T", "start", "S"])  # one binary for every chunk length, offset and cache length
def _attention_prefill_kernel(
    Q, K, V, Out, Starts,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_starts,
    T, start, S, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, PER_ROW_START: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # tiles with the most keys start first
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)  # int64 offsets: a whole cache can pass 2**31 elements
    off_hkv = off_h // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if PER_ROW_START:
        start = tl.load(Starts + off_b * stride_starts).to(tl.int32)
        kv_len = tl.minimum(start + T, S)
        q_pos = tl.minimum(start + offs_m, kv_len - 1)
    else:
        q_pos = start + offs_m  # absolute position: query i sees keys 0 .. start + i
        kv_len = start + T      # keys at or past kv_len are never read

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Key block [n0, n0 + BLOCK_N) is seen in full by every query of the tile iff
    # n0 + BLOCK_N <= first_pos + 1, and then it also ends at or before kv_len (first_pos < kv_len).
    first_pos = start + pid_m * BLOCK_M
    if PER_ROW_START:
        first_pos = tl.minimum(first_pos, kv_len - 1)  # the tile's first q_pos (clamped as q_pos is)
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    diag_end = tl.minimum(first_pos + BLOCK_M, kv_len)  # one past the last key a real query sees
    # Key 0 is visible to every row and lies in the first block visited, so m_i is finite from then
    # on: a row fully masked in a later diagonal block gets p = 0 and alpha = 1, never NaN.
    for stage in tl.static_range(2):
        if stage == 0:
            lo = 0
            hi = full_end
        else:
            lo = full_end
            hi = diag_end
        for n0 in range(lo, hi, BLOCK_N):
            keys = n0 + offs_n
            if stage == 0:
                k = tl.load(k_ptrs + n0 * stride_ks)
            else:
                k = tl.load(k_ptrs + n0 * stride_ks, mask=keys[:, None] < kv_len, other=0.0)
            if UPCAST_DOT:
                k = k.to(tl.float32)
            if FP32_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            if stage == 1:
                s = tl.where(keys[None, :] <= q_pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if stage == 0:
                v = tl.load(v_ptrs + n0 * stride_vs)
            else:
                v = tl.load(v_ptrs + n0 * stride_vs, mask=keys[:, None] < kv_len, other=0.0)
            p_v = p.to(v.dtype)  # P @ V on the tensor cores in V's dtype, fp32 accumulate
            if UPCAST_DOT:
                p_v, v = p_v.to(tl.float32), v.to(tl.float32)
            if FP32_DOT:
                acc = tl.dot(p_v, v, acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p_v, v, acc * alpha[:, None])
            m_i = m_new

    out = acc / l_i[:, None]  # rows past T divide garbage by a positive l and are not stored
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < T)


# ---- launch heuristics -----------------------------------------------------------------------

@dataclass(frozen=True)
class PrefillLaunch:
    block_m: int     # queries per program
    block_n: int     # keys per loop step
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads (GPU only)


def prefill_launch(dtype: torch.dtype, head_dim: int) -> PrefillLaunch:
    """The one place tile sizes are picked. The same on sm_80 and sm_90, and in the CPU interpreter,
    so the CPU tests run the tiling and masking the GPU runs (resources: `aot_configs`' test).

    16-bit, D = 128: 128 x 64 tiles, 8 warps, 3 stages, the fused-attention tutorial's choice on
    A100/H100 (no spills; 96 KiB shared on sm_80, 128 KiB on sm_90).
    16-bit, D <= 64: 64 x 64 tiles, 4 warps, 3 stages (128 x 64 with 4 warps spills on sm_80).
    fp32 (IEEE dots, no tensor cores; a debugging path): 32 x 64 tiles for D = 128, 64 x 32 for
    D <= 64, 8 warps, 2 stages, tiles that do not spill on either architecture.
    """
    if dtype == torch.float32:
        if head_dim > 64:
            return PrefillLaunch(block_m=32, block_n=64, num_warps=8, num_stages=2)
        return PrefillLaunch(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if head_dim > 64:
        return PrefillLaunch(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return PrefillLaunch(block_m=64, block_n=64, num_warps=4, num_stages=3)


def verify_launch(dtype: torch.dtype, head_dim: int) -> PrefillLaunch:
    """Tile sizes of `attention_verify` (T = draft tokens + 1, 2..17: one or two query tiles), picked like
    `prefill_launch`'s and independent of T, so one binary serves every draft length (resources from the
    AOT compiles; not yet timed on a GPU).

    All dtypes: 16 x 64 tiles, 8 warps. BLOCK_M = 16 is tl.dot's minimum (mma.sync on sm_80 and sm_90:
    wgmma needs 64 rows); with 16 rows the warps split the 64 keys (and the D columns of P @ V), and 8
    warps keep registers at 58-110 per thread where 4 warps reach 128 and spill on sm_90 at D = 128.
    16-bit: 3 stages (70 KiB shared at D = 128); fp32 (IEEE dots; a debugging path): 2 stages (76 KiB).
    """
    return PrefillLaunch(block_m=16, block_n=64, num_warps=8, num_stages=2 if dtype == torch.float32 else 3)


# ---- launcher --------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128)


def _check_qkv(op: str, q, k, v, names=("q", "k", "v")) -> tuple[int, int, int, int, int, int]:
    """The checks `attention_prefill` and `attention_verify` share; (B, H, T, D, Hkv, S) of valid arguments."""
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-d tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    qn, kn, vn = names
    B, H, T, D = q.shape
    if q.dtype not in _DTYPES:
        raise TypeError(f"{op}: dtype {q.dtype} is not supported; expected float16, bfloat16 or float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: {qn}, {kn}, {vn} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{op}: {qn}, {kn}, {vn} must be on one device, got {q.device}, {k.device}, {v.device}")
    if D not in _HEAD_DIMS:
        raise ValueError(f"{op}: head_dim {D} is not supported; expected one of {_HEAD_DIMS}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: {kn} {tuple(k.shape)} and {vn} {tuple(v.shape)} differ in shape")
    Bk, Hkv, S, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"{op}: {kn}/{vn} {tuple(k.shape)} do not match {qn} {tuple(q.shape)} "
                         f"in batch or head_dim")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{op}: n_heads {H} is not a multiple of n_kv_heads {Hkv}")
    return B, H, T, D, Hkv, S


def _constexprs(q: torch.Tensor, cfg: PrefillLaunch, on_cuda: bool, per_row_start: bool) -> dict:
    return dict(HEAD_DIM=q.shape[3], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                FP32_DOT=q.dtype == torch.float32,
                UPCAST_DOT=not on_cuda and q.dtype == torch.bfloat16,
                PER_ROW_START=per_row_start)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, on_cuda: bool = None):
    """Check the arguments, allocate the output and build the launch: (out, (grid, args, constexprs,
    PrefillLaunch) or None when the output is empty). on_cuda (default: q on CUDA) picks the compiled
    kernel's constexprs over the interpreter's; `aot_configs` runs it on meta tensors with on_cuda."""
    B, H, T, D, Hkv, S = _check_qkv("attention_prefill", q, k, v)
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError(f"attention_prefill: start must be an int, got {type(start).__name__}")
    if start < 0:
        raise ValueError(f"attention_prefill: start {start} is negative")
    if S < start + T:
        raise ValueError(f"attention_prefill: k/v hold {S} positions < start + T = {start} + {T}")

    out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out, None
    on_cuda = q.is_cuda if on_cuda is None else on_cuda
    cfg = prefill_launch(q.dtype, D)
    grid = (cdiv(T, cfg.block_m), H, B)
    args = (q, k, v, out, None, *q.stride(), *k.stride(), *v.stride(), *out.stride(), None,
            T, start, None, H // Hkv, _LOG2E / math.sqrt(D))
    return out, (grid, args, _constexprs(q, cfg, on_cuda, per_row_start=False), cfg)


def _prepare_verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, starts: torch.Tensor,
                    on_cuda: bool = None):
    """`_prepare` for `attention_verify`; starts' values are never read on the host."""
    op = "attention_verify"
    B, H, T, D, Hkv, S = _check_qkv(op, q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    if not isinstance(starts, torch.Tensor):
        raise TypeError(f"{op}: starts must be an int64 tensor, got {type(starts).__name__}")
    if starts.dtype != torch.int64:
        raise TypeError(f"{op}: starts must be int64, got {starts.dtype}")
    if starts.shape != (B,):
        raise ValueError(f"{op}: starts must have shape [B] = ({B},), got {tuple(starts.shape)}")
    if starts.device != q.device:
        raise ValueError(f"{op}: starts must be on q's device {q.device}, got {starts.device}")

    out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out, None
    if S < 1:
        raise ValueError(f"{op}: k_cache/v_cache hold no positions (S = 0)")
    on_cuda = q.is_cuda if on_cuda is None else on_cuda
    cfg = verify_launch(q.dtype, D)
    grid = (cdiv(T, cfg.block_m), H, B)
    args = (q, k_cache, v_cache, out, starts, *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
            starts.stride(0), T, 0, S, H // Hkv, _LOG2E / math.sqrt(D))
    return out, (grid, args, _constexprs(q, cfg, on_cuda, per_row_start=True), cfg)


def _launch(q: torch.Tensor, launch) -> None:
    grid, args, constexprs, cfg = launch
    device = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with device:  # Triton launches on the current CUDA device
        _attention_prefill_kernel.on(q)[grid](*args, **constexprs, num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages)


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Triton flash-attention prefill; same contract and result as `attention_prefill_ref`.

    q: [B, H, T, D]; k, v: [B, Hkv, S, D] with S >= start + T (keys at start + T and beyond are
    never read); H a multiple of Hkv (query head h reads kv head h // (H // Hkv)); D in
    (16, 32, 64, 128); start >= 0. Query i (absolute position start + i) sees keys 0 .. start + i.
    q, k, v: one dtype (float16, bfloat16, float32), any strides, read in place (e.g. q as
    `qkv.view(B, T, H, D).transpose(1, 2)`, k/v as cache slices `cache[:B, :, :start + T]`).
    Scores, softmax and the weighted sum in fp32 with O(T) extra memory (no T x S matrix); P is
    rounded to V's dtype for the P @ V product; float32 inputs use IEEE (not TF32) dots.
    Returns a new contiguous [B, H, T, D] tensor in q's dtype. CUDA tensors run the compiled
    kernel, CPU tensors Triton's interpreter.
    """
    out, launch = _prepare(q, k, v, start)
    if launch is not None:
        _launch(q, launch)
    return out


def attention_verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     starts: torch.Tensor) -> torch.Tensor:
    """Triton flash-attention of speculative decoding's verify step; same contract and result as
    `attention_verify_ref`, the numerics of `attention_prefill`.

    q: [B, H, T, D], any strides (e.g. `qkv.view(B, T, H, D).transpose(1, 2)`); k_cache, v_cache:
    [B, Hkv, S, D] cache slices `cache[:B, :, :S]`, S the whole cache length, holding row b's T new keys
    at starts[b] .. starts[b] + T - 1; starts: int64 [B] on q's device, values >= 0 (not checked: they are
    never read on the host, so the launch can be captured in a CUDA graph). Query i of row b sees keys
    0 .. min(starts[b] + i, S - 1); keys at or past min(starts[b] + T, S) are never read, so a row with
    starts[b] + T > S (an idle row) is finite and stays in bounds. Returns a new contiguous
    [B, H, T, D] tensor in q's dtype.
    """
    out, launch = _prepare_verify(q, k_cache, v_cache, starts)
    if launch is not None:
        _launch(q, launch)
    return out


# ---- ahead-of-time specialisations -----------------------------------------------------------

def _model_tensors(n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device="meta"):
    """q, k, v laid out as the model passes them: q a view of the fused qkv projection
    ([B, T, (H + 2 Hkv) D] -> [B, H, T, D]), k and v slices of [max_batch, Hkv, max_seq, D] caches."""
    B, T, start, max_batch, max_seq = 1, 96, 32, 4, 4096
    qkv = torch.empty(B, T, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[..., :n_heads * head_dim].view(B, T, n_heads, head_dim).transpose(1, 2)
    k_cache, v_cache = (torch.empty(max_batch, n_kv_heads, max_seq, head_dim, dtype=dtype, device=device)
                        for _ in range(2))
    return q, k_cache[:B, :, :start + T], v_cache[:B, :, :start + T], start


def _verify_model_tensors(n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device="meta"):
    """`attention_verify`'s arguments as the engine passes them: q as in `_model_tensors` for T = 5 (4 draft
    tokens), k and v the [:B, :, :S] slices of [max_batch, Hkv, S, D] caches (S the whole cache), starts a
    contiguous int64 [B]."""
    B, T, max_batch, max_seq = 3, 5, 4, 4096
    qkv = torch.empty(B, T, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[..., :n_heads * head_dim].view(B, T, n_heads, head_dim).transpose(1, 2)
    k_cache, v_cache = (torch.empty(max_batch, n_kv_heads, max_seq, head_dim, dtype=dtype, device=device)
                        for _ in range(2))
    starts = torch.empty(B, dtype=torch.int64, device=device)
    return q, k_cache[:B, :, :max_seq], v_cache[:B, :, :max_seq], starts


def aot_configs(models, dtypes=(torch.bfloat16, torch.float16)) -> list[LaunchConfig]:
    """The CUDA launches for `dtypes`, head_dim 128 (CodeLlama) and 64 (small models), with the head
    layouts of `models` (ModelShapes; CodeLlama 7B: 32 heads, 32 kv: group 1, a constexpr; 34B/70B: 64
    heads, 8 kv: group 8): `_prepare` run on meta tensors laid out as the model passes them, typed as the
    JIT would type them, then the same for `attention_verify` (`_prepare_verify`; labels "verify ...").
    T, start and S are never specialised, so one binary serves every chunk (every draft length)."""
    configs = {}
    layouts = {}  # (heads, kv heads) -> the models' joined labels ("34B/70B"); head_dim is looped below
    for names, h, hkv, _ in head_layouts(models):
        layouts.setdefault((h, hkv), names)
    for verify in (False, True):
        for dtype in dtypes:
            for head_dim in (128, 64):
                for (H, Hkv), names in layouts.items():
                    if verify:
                        _, (_, args, constexprs, cfg) = _prepare_verify(
                            *_verify_model_tensors(H, Hkv, head_dim, dtype), on_cuda=True)
                    else:
                        _, (_, args, constexprs, cfg) = _prepare(*_model_tensors(H, Hkv, head_dim, dtype),
                                                                 on_cuda=True)
                    label = (f"{'verify ' if verify else ''}{triton_dtype(dtype)} D={head_dim} H={H} Hkv={Hkv} "
                             f"({names}) {cfg.block_m}x{cfg.block_n}")
                    configs[label] = launch_config(_attention_prefill_kernel, args, constexprs,
                                                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, label=label)
    return list(configs.values())
