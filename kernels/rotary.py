"""Rotary position embedding (RoPE) in the Hugging Face rotate-half layout."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import LaunchConfig, cdiv, kernel, launch_config, next_power_of_2, pdl_prologue, triton_dtype
from .options import DEFAULT_OPTIONS, KernelOptions


def rope_tables(head_dim: int, max_pos: int, theta: float, scale: float = 1.0,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each fp32 [max_pos, head_dim // 2].

    Angle(p, i) = (p / scale) * theta ** (-2i / head_dim); computed in fp64 and rounded once,
    so positions near 100k keep full fp32 accuracy. `scale` is the linear rope_scaling factor.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    pos = torch.arange(max_pos, dtype=torch.float64) / scale
    angles = torch.outer(pos, inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, D] and k [B, Hkv, T, D] by their positions [B, T] (int64).

    Layout: rotate-half (HF): dimension i pairs with i + D/2, not Meta's interleaved (2i, 2i+1);
    Meta checkpoints are permuted at load. cos/sin: fp32 tables [max_pos, D/2] from `rope_tables`.
    Math in fp32, result in the input dtype. Returns new (q, k).
    """
    c = cos[positions].unsqueeze(1)  # [B, 1, T, D/2]
    s = sin[positions].unsqueeze(1)
    return _rotate(q, c, s), _rotate(k, c, s)


# ---- Triton ----------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@triton.jit
def _rotate_heads(x_ptr, stride_h, dst_ptr, dst_stride_h, n_heads, h0, cos, sin, write,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate heads h0 .. h0 + BLOCK_H - 1 (< n_heads) of one token; x_ptr / dst_ptr: its head 0, dim 0 in
    the source and the destination (the same for in place). Nothing is stored unless `write`."""
    heads = h0 + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    offs = heads[:, None].to(tl.int64) * stride_h + dims[None, :]
    dst = heads[:, None].to(tl.int64) * dst_stride_h + dims[None, :]
    mask = (heads[:, None] < n_heads) & (dims[None, :] < HALF)
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(dst_ptr + dst, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask & write)
    tl.store(dst_ptr + dst + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask & write)


@triton.jit
def _copy_heads(x_ptr, stride_h, dst_ptr, dst_stride_h, n_heads, h0, write,
                D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Copy heads h0 .. h0 + BLOCK_H - 1 (< n_heads) of one token's D-vectors to dst, if `write`."""
    heads = h0 + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < n_heads) & (dims[None, :] < D) & write
    x = tl.load(x_ptr + heads[:, None].to(tl.int64) * stride_h + dims[None, :], mask=mask)
    tl.store(dst_ptr + heads[:, None].to(tl.int64) * dst_stride_h + dims[None, :], x, mask=mask)


@kernel
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr,  # q [B,H,T,D], k [B,Hkv,T,D] strided; cos/sin [P, HALF]
                   T, n_q_heads, n_k_heads, n_q_blocks,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_pb, stride_pt,
                   v_ptr, kc_ptr, vc_ptr, slot_ptr, S,  # TO_CACHE: v [B,Hkv,1,D]; caches [B,Hkv,S,D]; slots [B]
                   stride_vb, stride_vh, stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   TO_CACHE: tl.constexpr = False, PDL: tl.constexpr = False):
    """Grid (B * T, q head blocks + k head blocks): one token, BLOCK_H heads of q or of k. q is rotated in
    place; k in place, or (TO_CACHE, decode: T = 1) into the key cache at slot slots[b], with v's same
    heads copied into the value cache there (a slot outside [0, S) writes nothing)."""
    pdl_prologue(PDL)
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    b = token // T
    t = token - b * T
    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)[None, :]
    if block < n_q_blocks:
        q_tok = q_ptr + b * stride_qb + t * stride_qt
        _rotate_heads(q_tok, stride_qh, q_tok, stride_qh, n_q_heads, block * BLOCK_H, cos, sin, True,
                      HALF, BLOCK_H, BLOCK_HALF)
    else:
        h0 = (block - n_q_blocks) * BLOCK_H
        k_tok = k_ptr + b * stride_kb + t * stride_kt
        if TO_CACHE:
            slot = tl.load(slot_ptr + b).to(tl.int64)
            inside = (slot >= 0) & (slot < S)
            _rotate_heads(k_tok, stride_kh, kc_ptr + b * stride_kcb + slot * stride_kcs, stride_kch, n_k_heads, h0,
                          cos, sin, inside, HALF, BLOCK_H, BLOCK_HALF)
            _copy_heads(v_ptr + b * stride_vb, stride_vh, vc_ptr + b * stride_vcb + slot * stride_vcs, stride_vch,
                        n_k_heads, h0, inside, 2 * HALF, BLOCK_H, 2 * BLOCK_HALF)
        else:
            _rotate_heads(k_tok, stride_kh, k_tok, stride_kh, n_k_heads, h0, cos, sin, True,
                          HALF, BLOCK_H, BLOCK_HALF)


def rotary_settings(n_heads: int, n_kv_heads: int, head_dim: int, on_cuda: bool = True) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): a program rotates BLOCK_H heads x BLOCK_HALF (>= D/2) pairs of one
    token. BLOCK_H is the smaller head count (rounded up to a power of two), so for GQA the q and k blocks
    are both full, capped at 2048 pairs per program; one warp per 256 pairs (at most 4) gives each thread
    8-16 contiguous pairs (16-byte bf16 loads) once the tile has 256 or more. Off CUDA (Triton's
    interpreter, which pays per program, not per byte) BLOCK_H is the larger head count, under the same cap:
    one program for q and one for k where they fit (the k block then masked for GQA)."""
    block_half = next_power_of_2(head_dim // 2)
    heads = min(n_heads, n_kv_heads) if on_cuda else max(n_heads, n_kv_heads)
    block_h = min(next_power_of_2(heads), max(1, 2048 // block_half))
    num_warps = max(1, min(4, block_h * block_half // 256))
    return block_h, block_half, num_warps


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor, *,
           options: KernelOptions = DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RoPE, IN PLACE on q and k; returns (q, k) themselves. Same values as `rotary_ref`.

    Layout: Hugging Face rotate-half: dimension i pairs with i + D/2 (out_i = x_i cos - x_{i+D/2} sin,
    out_{i+D/2} = x_{i+D/2} cos + x_i sin), not Meta's interleaved (2i, 2i+1).
    q: [B, H, T, D], k: [B, Hkv, T, D], same fp32/fp16/bf16 dtype, D even and <= 256; any strides with a
    unit stride in the last dim, so the `.view(B, T, H, D).transpose(1, 2)` views of the fused qkv output
    are rotated where they lie (no copy). positions: int64 [B, T] on the device (any strides, e.g. an
    expanded arange), read by the kernel (no host sync, graph-safe).
    cos, sin: the cached fp32 tables [max_pos, D/2] from `rope_tables` (contiguous): angles come from the
    table lookup (computed in fp64 once, rounded to fp32), not recomputed; the rotation is done in fp32 and
    rounded once to the io dtype. Every position must be < max_pos: that cannot be checked without a host
    sync, so it is the caller's contract (the model's table covers max_seq_len). options: the kernel
    paths (PDL).
    """
    _launch(q, _prepare(q, k, cos, sin, positions), options)
    return q, k


def rotary_to_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: torch.Tensor, *, options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Decode's rotary and KV-cache write in one launch: same values as `rotary_to_cache_ref`.

    q [B, H, 1, D] is rotated IN PLACE and returned; k [B, Hkv, 1, D] is rotated into k_cache[b, :, slots[b]]
    (k itself is left as it was) and v [B, Hkv, 1, D] copied into v_cache[b, :, slots[b]]. Caches
    [B, Hkv, S, D] of q's dtype with unit stride along D; slots int64/int32 [B] on the device: a slot outside
    [0, S) writes nothing (the engine clamps slots into its cache). Other arguments as `rotary` (T = 1).
    """
    _launch(q, _prepare(q, k, cos, sin, positions, (v, k_cache, v_cache, slots)), options)
    return q


def check_rotary_to_cache(q, k, v, cos, sin, positions, k_cache, v_cache, slots) -> None:
    """`rotary_to_cache`'s argument checks (a ValueError / TypeError naming the problem) without a launch."""
    _prepare(q, k, cos, sin, positions, (v, k_cache, v_cache, slots))


def rotary_to_cache_ref(q, k, v, cos, sin, positions, k_cache, v_cache, slots) -> torch.Tensor:
    """`rotary_ref` of q and k; the rotated k and v written in place into k_cache / v_cache [B, Hkv, S, D]
    at slots [B] (k_cache[b, :, slots[b]] = k[b, :, 0]); returns the rotated q (a new tensor). A slot outside
    [0, S) raises, as torch's indexing does."""
    q, k = rotary_ref(q, k, cos, sin, positions)
    rows = torch.arange(k.shape[0], device=k.device)
    k_cache[rows, :, slots] = k[:, :, 0]
    v_cache[rows, :, slots] = v[:, :, 0]
    return q


def _launch(q, launch, options: KernelOptions) -> None:
    if launch is not None:
        grid, args, constexprs, num_warps = launch
        _rotary_kernel.on(q, options)[grid](*args, **constexprs, num_warps=num_warps)


def _check_cache(q, k, cache) -> tuple:
    """The TO_CACHE kernel arguments for cache = (v, k_cache, v_cache, slots), after checking them."""
    v, k_cache, v_cache, slots = cache
    B, _, T, D = q.shape
    Hkv = k.shape[1]
    if T != 1:
        raise ValueError(f"rotary_to_cache: decode only (one token per sequence), got T={T}")
    if v.shape != k.shape or v.dtype != q.dtype:
        raise ValueError(f"rotary_to_cache: v must be {q.dtype} {tuple(k.shape)} like k, "
                         f"got {v.dtype} {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[:2] != (B, Hkv) or k_cache.shape[3] != D:
        raise ValueError(f"rotary_to_cache: k_cache and v_cache must be [{B}, {Hkv}, S, {D}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"rotary_to_cache: caches must be {q.dtype}, got {k_cache.dtype} and {v_cache.dtype}")
    if any(t.stride(-1) != 1 for t in (v, k_cache, v_cache)):
        raise ValueError("rotary_to_cache: v and the caches need unit stride along head_dim")
    if slots.shape != (B,) or slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rotary_to_cache: slots must be an int64/int32 [{B}] tensor, got {slots.dtype} "
                         f"{tuple(slots.shape)}")
    if any(t.device != q.device for t in cache):
        raise ValueError(f"rotary_to_cache: all tensors must be on one device, got "
                         f"{[str(t.device) for t in (q, *cache)]}")
    return (v, k_cache, v_cache, slots, k_cache.shape[2], v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2))


def _prepare(q, k, cos, sin, positions, cache=None, on_cuda=None):
    """Check the arguments and build the launch (grid, args, constexprs, num_warps), or None when there
    is nothing to rotate. cache: (v, k_cache, v_cache, slots) for `rotary_to_cache`. on_cuda: the tiling's
    target (None: q's device). Runs on meta tensors too (see `aot_configs`)."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"rotary: q dtype {q.dtype} is not supported; expected float32, float16 or bfloat16")
    if k.dtype != q.dtype:
        raise TypeError(f"rotary: k dtype {k.dtype} != q dtype {q.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rotary: q and k must be [B, H, T, D] and [B, Hkv, T, D], got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"rotary: k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, T or D")
    if D % 2 or not 2 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"rotary: head dim D={D} must be even and in 2..{MAX_HEAD_DIM}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"rotary: q and k need unit stride in the last dim, got strides {q.stride()} and {k.stride()}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError(f"rotary: cos/sin must be fp32 tables from rope_tables, got {cos.dtype} and {sin.dtype}")
    if cos.dim() != 2 or cos.shape[1] != D // 2 or sin.shape != cos.shape:
        raise ValueError(f"rotary: cos/sin must be [max_pos, {D // 2}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("rotary: cos/sin tables must be contiguous")
    if positions.dtype != torch.int64 or positions.shape != (B, T):
        raise ValueError(f"rotary: positions must be int64 [B, T] = [{B}, {T}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    tensors = (q, k, cos, sin, positions)
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"rotary: all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    # without a cache the cache arguments are placeholders the kernel never reads
    cache_args = _check_cache(q, k, cache) if cache is not None else (q, q, q, positions) + (0,) * 9
    if B * T == 0 or H + Hkv == 0:
        return None
    block_h, block_half, num_warps = rotary_settings(H, Hkv, D, q.is_cuda if on_cuda is None else on_cuda)
    n_q_blocks = cdiv(H, block_h)
    grid = (B * T, n_q_blocks + cdiv(Hkv, block_h))
    args = (q, k, cos, sin, positions, T, H, Hkv, n_q_blocks,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            positions.stride(0), positions.stride(1), *cache_args)
    constexprs = {"HALF": D // 2, "BLOCK_H": block_h, "BLOCK_HALF": block_half, "TO_CACHE": cache is not None}
    return grid, args, constexprs, num_warps


def aot_configs(models) -> list[LaunchConfig]:
    """The launches of `models` (ModelShapes, e.g. CodeLlama 7B: 32 heads, 32 kv heads; 34B/70B: 64 heads, 8 kv
    heads; head_dim 128) in bf16 and fp16, for prefill (T tokens, positions an expanded arange) and decode (T = 1,
    positions `[B] -> [B, 1]`), q/k being the transposed views of the fused qkv linear output as in the model:
    `_prepare` run on meta tensors of those shapes, typed as the JIT would type them."""
    configs = {}
    for a in models:
        H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
        for dtype in (torch.bfloat16, torch.float16):
            for phase, B, T in (("prefill", 1, 512), ("decode", 4, 1)):
                qkv = torch.empty(B, T, (H + 2 * Hkv) * D, dtype=dtype, device="meta")
                q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
                q, k = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2)
                cos = torch.empty(a.max_seq_len, D // 2, device="meta")
                positions = (torch.empty(B, dtype=torch.int64, device="meta")[:, None] if phase == "decode"
                             else torch.empty(T, dtype=torch.int64, device="meta").expand(B, T))
                label = f"H={H} Hkv={Hkv} D={D} {triton_dtype(dtype)} {phase}"
                cache = None
                if phase == "decode":  # decode writes k and v into the cache (rotary_to_cache)
                    data = torch.empty(2, B, Hkv, 4096, D, dtype=dtype, device="meta")
                    v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D).transpose(1, 2)
                    cache = (v, data[0], data[1], torch.empty(B, dtype=torch.int64, device="meta"))
                    label += " to cache"
                grid, args, constexprs, num_warps = _prepare(q, k, cos, cos, positions, cache, on_cuda=True)
                configs[label] = launch_config(_rotary_kernel, args, constexprs, num_warps=num_warps, label=label)
    return list(configs.values())
