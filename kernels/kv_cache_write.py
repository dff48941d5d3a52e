"""Decode's KV-cache write: each sequence's new key and value go to its own position, in one launch.

Replaces two advanced-indexing assignments (two index_put kernels of ~3.6 us each per layer on an H200,
bench/results/NVIDIA-H200-2026-11-26/profile-7B-bf16.log) with one small copy kernel per layer.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

from ._triton import LaunchConfig, kernel, launch_config, pdl_prologue, triton_dtype

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kv_cache_write_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       positions: torch.Tensor) -> None:
    """k_cache[b, :, positions[b]] = k[b] and the same for v, in place.

    k_cache, v_cache: [B, Hkv, S, D]; k, v: [B, Hkv, D] of the cache's dtype; positions: int64 [B] in [0, S)
    on the cache's device (a position outside raises, as torch's indexing does)."""
    rows = torch.arange(k.shape[0], device=k.device)
    k_cache[rows, :, positions] = k
    v_cache[rows, :, positions] = v


# ---- Triton ----------------------------------------------------------------------------------

@kernel
def _kv_write_kernel(K, V, KC, VC, Pos, S,  # k/v [B, Hkv, D]; caches [B, Hkv, S, D]; Pos int64 [B]
                     stride_kb, stride_kh, stride_vb, stride_vh,
                     stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     PDL: tl.constexpr = False):
    """One program per (sequence, kv head): copies its D-vector of k and of v into slot Pos[b]."""
    pdl_prologue(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    pos = tl.load(Pos + b)
    d = tl.arange(0, BLOCK_D)
    mask = (d < HEAD_DIM) & (pos >= 0) & (pos < S)
    k = tl.load(K + b * stride_kb + h * stride_kh + d, mask=mask)
    v = tl.load(V + b * stride_vb + h * stride_vh + d, mask=mask)
    tl.store(KC + b * stride_kcb + h * stride_kch + pos * stride_kcs + d, k, mask=mask)
    tl.store(VC + b * stride_vcb + h * stride_vch + pos * stride_vcs + d, v, mask=mask)


def _prepare(k_cache, v_cache, k, v, positions):
    """Check the arguments and build the launch (grid, args, constexprs), or None when B or Hkv is 0.
    Runs on meta tensors too (see `aot_configs`)."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"kv_cache_write: k_cache and v_cache must be [B, Hkv, S, D] of one shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, Hkv, S, D = k_cache.shape
    if k.shape != (B, Hkv, D) or v.shape != (B, Hkv, D):
        raise ValueError(f"kv_cache_write: k and v must be [{B}, {Hkv}, {D}] for a cache {tuple(k_cache.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dtype not in _DTYPES or any(t.dtype != k_cache.dtype for t in (v_cache, k, v)):
        raise TypeError(f"kv_cache_write: caches, k and v must share one dtype of float32/float16/bfloat16, got "
                        f"{[str(t.dtype) for t in (k_cache, v_cache, k, v)]}")
    if positions.shape != (B,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"kv_cache_write: positions must be an int64/int32 [{B}] tensor, got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    tensors = (k_cache, v_cache, k, v, positions)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"kv_cache_write: all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if D > 1 and any(t.stride(-1) != 1 for t in (k_cache, v_cache, k, v)):
        raise ValueError("kv_cache_write: caches, k and v must have unit stride along head_dim")
    if B == 0 or Hkv == 0 or D == 0:
        return None
    args = (k, v, k_cache, v_cache, positions, S, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    return (B, Hkv), args, dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D))


def kv_cache_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: torch.Tensor) -> None:
    """Triton version of `kv_cache_write_ref` (same arguments; any strides with unit stride along D), one
    launch for k and v. A position outside [0, S) writes nothing (the reference raises instead; the
    engine clamps positions into the cache). CUDA tensors run the compiled kernel, CPU tensors the
    interpreter."""
    launch = _prepare(k_cache, v_cache, k, v, positions)
    if launch is None:
        return
    grid, args, constexprs = launch
    with torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext():
        _kv_write_kernel.on(k)[grid](*args, **constexprs, num_warps=1)


# ---- ahead-of-time specialisations -----------------------------------------------------------

def aot_configs() -> list[LaunchConfig]:
    """The decode launches at head_dim 128 in bf16 and fp16: k and v the strided slices the model passes
    (one token of the rotated [B, Hkv, T, D] views of the fused qkv output), caches views of one KVCache."""
    configs = []
    for dtype in (torch.bfloat16, torch.float16):
        B, Hkv, S, D = 4, 8, 4096, 128
        data = torch.empty(2, B, Hkv, S, D, dtype=dtype, device="meta")
        qkv = torch.empty(B, 1, (64 + 2 * Hkv) * D, dtype=dtype, device="meta")
        k = qkv[..., 64 * D:(64 + Hkv) * D].view(B, 1, Hkv, D).transpose(1, 2)[:, :, 0]
        v = qkv[..., (64 + Hkv) * D:].view(B, 1, Hkv, D).transpose(1, 2)[:, :, 0]
        positions = torch.empty(B, dtype=torch.int64, device="meta")
        _, args, constexprs = _prepare(data[0], data[1], k, v, positions)
        cfg = launch_config(_kv_write_kernel, args, constexprs, num_warps=1, num_stages=1)
        configs.append(dataclasses.replace(cfg, label=f"{triton_dtype(dtype)} D={D}"))
    return configs
