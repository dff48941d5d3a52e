"""SwiGLU activation: silu(gate) * up."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.language as tl

from ._triton import LaunchConfig, as_rows, cdiv, kernel, launch_config, next_power_of_2, pdl_prologue, triton_dtype
from .options import DEFAULT_OPTIONS, KernelOptions


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., ffn_dim] in the model dtype -> [..., ffn_dim], same dtype (HF numerics)."""
    return F.silu(gate) * up


# ---- Triton ----------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@kernel
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr,  # gate/up [rows, F] row-strided; out [rows, F] contiguous
                   stride_gate, stride_up, n_cols,
                   BLOCK: tl.constexpr,
                   PDL: tl.constexpr = False):
    """Grid (rows, cdiv(F, BLOCK)): BLOCK columns of one row."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0)
    g32 = g.to(tl.float32)
    # F.silu in fp32, rounded to the io dtype, then the io-dtype multiply (fp32, rounded): PyTorch's steps
    act = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    tl.store(out_ptr + row * n_cols + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def swiglu_settings(ffn_dim: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 1024 columns a program (8 per thread with 4 warps: one 16-byte bf16 load each
    of gate and up), fewer for narrow rows."""
    block = min(1024, next_power_of_2(ffn_dim))
    return block, max(1, min(4, block // 256))


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Triton silu(gate) * up -> a new contiguous tensor of gate's shape and dtype; same values as `swiglu_ref`.

    gate, up: [..., F], the same shape and fp32/fp16/bf16 dtype, unit stride in the last dim, leading
    dims that flatten to rows with one stride: the column slices `w13_out.split([F, F], -1)` (row stride
    2F) are read where they lie, no copy. Numerics as PyTorch's: silu in fp32 (g / (1 + exp(-g))) rounded
    to the io dtype, then the product in fp32 rounded to the io dtype. options: the kernel paths (PDL).
    """
    out, launch = _prepare(gate, up)
    if launch is not None:
        grid, args, constexprs, num_warps = launch
        _swiglu_kernel.on(gate, options)[grid](*args, **constexprs, num_warps=num_warps)
    return out


def _prepare(gate, up):
    """Check the arguments, allocate the output and build the launch: (out, (grid, args, constexprs,
    num_warps) or None when it is empty). Runs on meta tensors too (see `aot_configs`)."""
    if gate.dtype not in _DTYPES:
        raise TypeError(f"swiglu: gate dtype {gate.dtype} is not supported; expected float32, float16 or bfloat16")
    if up.dtype != gate.dtype:
        raise TypeError(f"swiglu: up dtype {up.dtype} != gate dtype {gate.dtype}")
    if gate.shape != up.shape or gate.dim() < 1:
        raise ValueError(f"swiglu: gate and up must be [..., F] of one shape, got {tuple(gate.shape)} and "
                         f"{tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate and up must be on one device, got {gate.device} and {up.device}")
    ffn = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out, None
    g2, u2 = as_rows(gate, ffn, "swiglu: gate"), as_rows(up, ffn, "swiglu: up")
    block, num_warps = swiglu_settings(ffn)
    grid = (g2.shape[0], cdiv(ffn, block))
    if grid[1] > 65535:
        raise ValueError(f"swiglu: F={ffn} needs {grid[1]} column blocks > 65535 (CUDA grid y limit)")
    return out, (grid, (g2, u2, out, g2.stride(0), u2.stride(0), ffn), {"BLOCK": block}, num_warps)


def aot_configs(models) -> list[LaunchConfig]:
    """The launches of `models` (ModelShapes, e.g. CodeLlama 7B: ffn 11008, 34B: 22016, 70B: 28672) in bf16
    and fp16, gate and up being the two halves of the fused w13 linear output as in the model: `_prepare` run on meta
    tensors of those shapes, typed as the JIT would type them."""
    configs = {}
    for model in models:
        ffn = model.ffn_dim
        for dtype in (torch.bfloat16, torch.float16):
            w13_out = torch.empty(2, 16, 2 * ffn, dtype=dtype, device="meta")
            gate, up = w13_out.split([ffn, ffn], dim=-1)
            label = f"F={ffn} {triton_dtype(dtype)}"
            _, (_, args, constexprs, num_warps) = _prepare(gate, up)
            configs[label] = launch_config(_swiglu_kernel, args, constexprs, num_warps=num_warps, label=label)
    return list(configs.values())
