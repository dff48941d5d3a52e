"""RMSNorm, optionally fused with the residual add."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton import LaunchConfig, as_rows, kernel, launch_config, next_power_of_2, pdl_prologue, triton_dtype
from .options import DEFAULT_OPTIONS, KernelOptions


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = normalize(x + residual) * weight.

    x, residual: [..., dim] in the model dtype; weight: [dim].
    Returns (y, h) where h = x + residual (or x) is the new residual stream, both in x's dtype.
    Numerics follow Meta/HF: the sum is taken in the io dtype, the mean of squares and the
    normalisation in fp32, the result is cast back to the io dtype before the weight multiply.
    """
    h = x if residual is None else x + residual
    h32 = h.float()
    y = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight, h


# ---- Triton ----------------------------------------------------------------------------------

MAX_DIM = 16384
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def inv_rms(sum_sq, n, eps):
    """1 / sqrt(sum_sq / n + eps), the per-row scalar, in IEEE fp32 (div_rn / sqrt_rn: plain `/` and
    tl.rsqrt are approximate on the GPU)."""
    return tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sum_sq, tl.cast(n, tl.float32)) + eps))


@kernel
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr,  # x/res [rows, N] row-strided; w [N]; y/h [rows, N]
                     stride_x, stride_res, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                     PDL: tl.constexpr = False):
    """One program per row; the whole row (N <= BLOCK_N) is held in registers."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # the residual sum is rounded to the io dtype once, as `x + residual` in PyTorch
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * N + cols, h, mask=mask)
    else:
        h = x
    h32 = h.to(tl.float32)
    rstd = inv_rms(tl.sum(h32 * h32, axis=0), N, eps)
    # normalise in fp32, round to the io dtype, then the weight multiply rounded again (as the ref)
    normed = (h32 * rstd).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype)
    tl.store(y_ptr + row * N + cols, y, mask=mask)


def rms_norm_settings(dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a row of `dim` elements: the whole row in one block, the warps growing
    with it so each thread holds at most 32 fp32 values of the row (16 up to dim 4096)."""
    block = next_power_of_2(dim)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, num_warps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None, *,
             options: KernelOptions = DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm fused with the residual add; same contract and rounding steps as `rms_norm_ref`.

    x, residual: [..., dim], 1 <= dim <= 16384, fp32/fp16/bf16 (the same dtype); unit stride in the last
    dim, leading dims that flatten to rows with one stride (any row stride, no copy is made).
    weight: [dim] contiguous, x's dtype. Returns (y, h) of x's shape and dtype: y a new contiguous tensor;
    h = x + residual a new contiguous tensor, or x itself when residual is None.
    Numerics: h = x + residual is added in fp32 and rounded to the io dtype (as PyTorch's io-dtype add);
    the mean of squares and the normalisation run in fp32 on that rounded h, the result is rounded to the
    io dtype, then multiplied by weight in fp32 and rounded again (PyTorch's io-dtype multiply).
    One program per row (rows = product of the leading dims), the whole row in registers.
    options: the kernel paths (PDL).
    """
    y, h, launch = _prepare(x, weight, eps, residual)
    if launch is not None:
        grid, args, constexprs, num_warps = launch
        _rms_norm_kernel.on(x, options)[grid](*args, **constexprs, num_warps=num_warps)
    return y, h


def _prepare(x, weight, eps, residual):
    """Check the arguments, allocate the outputs and build the launch: (y, h, (grid, args, constexprs,
    num_warps) or None when there are no rows). Runs on meta tensors too (see `aot_configs`)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"rms_norm: x dtype {x.dtype} is not supported; expected float32, float16 or bfloat16")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"rms_norm: x must be [..., dim] with dim >= 1, got shape {tuple(x.shape)}")
    dim = x.shape[-1]
    if dim > MAX_DIM:
        raise ValueError(f"rms_norm: dim={dim} > {MAX_DIM} is not supported (one row per program)")
    if weight.shape != (dim,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"rms_norm: weight must be a contiguous [{dim}] {x.dtype} tensor, got "
                         f"{tuple(weight.shape)} {weight.dtype} strides {weight.stride()}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual must match x ({tuple(x.shape)} {x.dtype}), got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    tensors = [x, weight] + ([residual] if residual is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"rms_norm: all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    x2 = as_rows(x, dim, "rms_norm: x")
    r2 = as_rows(residual, dim, "rms_norm: residual") if residual is not None else x2
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else x
    rows = x2.shape[0]
    if rows == 0:
        return y, h, None
    block, num_warps = rms_norm_settings(dim)
    args = (x2, r2, weight, y, h, x2.stride(0), r2.stride(0), dim, float(eps))
    return y, h, ((rows,), args, {"HAS_RESIDUAL": residual is not None, "BLOCK_N": block}, num_warps)


def aot_configs(models) -> list[LaunchConfig]:
    """The launches of `models` (ModelShapes, e.g. CodeLlama 7B: dim 4096, 34B/70B: 8192) in bf16 and fp16,
    with and without the residual (the first layer's norm has none), on contiguous activations: `_prepare` run on meta
    tensors of those shapes, typed as the JIT would type them."""
    configs = {}
    for model in models:
        dim = model.dim
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.empty(2, 16, dim, dtype=dtype, device="meta")
            w = torch.empty(dim, dtype=dtype, device="meta")
            for residual in (None, torch.empty_like(x)):
                label = f"dim={dim} {triton_dtype(dtype)}{'' if residual is None else ' +residual'}"
                _, _, (_, args, constexprs, num_warps) = _prepare(x, w, 1e-5, residual)
                configs[label] = launch_config(_rms_norm_kernel, args, constexprs, num_warps=num_warps, label=label)
    return list(configs.values())
