"""Rotary position embedding (RoPE) in the Hugging Face rotate-half layout."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import LaunchConfig, kernel, launch_config, pdl_prologue, triton_dtype


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
def _rotate_heads(x_ptr, stride_h, n_heads, h0, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate heads h0 .. h0 + BLOCK_H - 1 (< n_heads) of one token in place; x_ptr is its head 0, dim 0."""
    heads = h0 + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    offs = heads[:, None].to(tl.int64) * stride_h + dims[None, :]
    mask = (heads[:, None] < n_heads) & (dims[None, :] < HALF)
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(x_ptr + offs, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(x_ptr + offs + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@kernel
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr,  # q [B,H,T,D], k [B,Hkv,T,D] strided; cos/sin [P, HALF]
                   T, n_q_heads, n_k_heads, n_q_blocks,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_pb, stride_pt,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   PDL: tl.constexpr = False):
    """Grid (B * T, q head blocks + k head blocks): one token, BLOCK_H heads of q or of k."""
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
        _rotate_heads(q_ptr + b * stride_qb + t * stride_qt, stride_qh, n_q_heads, block * BLOCK_H, cos, sin,
                      HALF, BLOCK_H, BLOCK_HALF)
    else:
        _rotate_heads(k_ptr + b * stride_kb + t * stride_kt, stride_kh, n_k_heads, (block - n_q_blocks) * BLOCK_H,
                      cos, sin, HALF, BLOCK_H, BLOCK_HALF)


def rotary_settings(n_heads: int, n_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): a program rotates BLOCK_H heads x BLOCK_HALF (>= D/2) pairs of one
    token. BLOCK_H is the smaller head count (rounded up to a power of two), so for GQA the q and k blocks
    are both full, capped at 2048 pairs per program; one warp per 256 pairs (at most 4) gives each thread
    8-16 contiguous pairs (16-byte bf16 loads) once the tile has 256 or more."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(min(n_heads, n_kv_heads)), max(1, 2048 // block_half))
    num_warps = max(1, min(4, block_h * block_half // 256))
    return block_h, block_half, num_warps


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    sync, so it is the caller's contract (the model's table covers max_seq_len).
    """
    launch = _prepare(q, k, cos, sin, positions)
    if launch is not None:
        grid, args, constexprs, num_warps = launch
        _rotary_kernel.on(q)[grid](*args, **constexprs, num_warps=num_warps)
    return q, k


def _prepare(q, k, cos, sin, positions):
    """Check the arguments and build the launch (grid, args, constexprs, num_warps), or None when there
    is nothing to rotate. Runs on meta tensors too (see `aot_configs`)."""
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
    if B * T == 0 or H + Hkv == 0:
        return None
    block_h, block_half, num_warps = rotary_settings(H, Hkv, D)
    n_q_blocks = triton.cdiv(H, block_h)
    grid = (B * T, n_q_blocks + triton.cdiv(Hkv, block_h))
    args = (q, k, cos, sin, positions, T, H, Hkv, n_q_blocks,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            positions.stride(0), positions.stride(1))
    return grid, args, {"HALF": D // 2, "BLOCK_H": block_h, "BLOCK_HALF": block_half}, num_warps


def aot_configs() -> list[LaunchConfig]:
    """The launches of CodeLlama 7B (32 heads, 32 kv heads) and 34B/70B (64 heads, 8 kv heads), head_dim 128,
    in bf16 and fp16, for prefill (T tokens, positions an expanded arange) and decode (T = 1, positions
    `[B] -> [B, 1]`), q/k being the transposed views of the fused qkv linear output as in the model:
    `_prepare` run on meta tensors of those shapes, typed as the JIT would type them."""
    from ..config import PRESETS

    configs = {}
    for preset in ("CodeLlama-7b", "CodeLlama-34b", "CodeLlama-70b"):
        a = PRESETS[preset]
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
                grid, args, constexprs, num_warps = _prepare(q, k, cos, cos, positions)
                configs[label] = launch_config(_rotary_kernel, args, constexprs, num_warps=num_warps, label=label)
    return list(configs.values())
