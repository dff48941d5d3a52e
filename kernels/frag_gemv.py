"""What the two fragment-order GEMVs share (`int4_frag`, `nf4_frag`): x's register layout (each lane's 16
consecutive values of a 64-column trip, its B fragments), the launcher's checks and allocations, the split-K
plan and its reduce, the launch loop, and the AOT case list's entries."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from triton.experimental.gluon import language as gl

from ._triton import H100_SMS, LaunchConfig, add_config, as_rows, cdiv, launch_config, sm_count
from .int4 import split_count
from .int4_gemv import splitk_reduce_launch
from .options import KernelOptions


def powers(n: int) -> list[int]:
    """1, 2, 4, ... below n (a power of two)."""
    return [1 << i for i in range(n.bit_length() - 1)]


def x_layout(mt: int, num_warps: int) -> gl.DistributedLinearLayout:
    """[mt, 4, 16] x: lane (g, t) holds rows g (and g + 8 when mt = 16) at 16 t .. 16 t + 15 of a trip, the 16
    values in consecutive registers (two 16-byte loads a row); every warp holds all of it (its B fragments)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8]] + ([[8, 0, 0]] if mt == 16 else []),
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[0, 0, 0] for _ in powers(num_warps)], block_bases=[], shape=[mt, 4, 16])


def check_rows(x: torch.Tensor, fw, who: str, max_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check x against the fragment-order weight `fw` (its own check, x in fw.dtype, [..., in], on fw's device,
    at most max_m rows; the kernels' int32 code offsets) and allocate the output: (x2 [M, in], out [..., out],
    out2 = out as [M, out])."""
    fw.check(who)
    N, K = fw.shape
    if x.dtype != fw.dtype:
        raise TypeError(f"{who}: x must be {fw.dtype} (the weight's dtype), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{who}: x must be [..., {K}] for a [{N}, {K}] weight, got {tuple(x.shape)}")
    if x.device != fw.device:
        raise ValueError(f"{who}: x on {x.device}, weight on {fw.device}")
    if fw.codes.numel() >= 2 ** 31:
        raise ValueError(f"{who}: a [{N}, {K}] weight has {fw.codes.numel()} codes, past the kernel's int32 "
                         f"offsets (< 2**31)")
    x2 = as_rows(x, K, f"{who}: x")
    M = x2.shape[0]
    if M > max_m:
        raise ValueError(f"{who}: at most {max_m} rows of x (decode), got {M}")
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    return x2, out, out.view(M, N)


@dataclasses.dataclass
class SplitPlan:
    split: int              # programs along K
    per_split: int          # loop trips of each
    part: torch.Tensor      # fp32 partials [split, M, N] (out2 itself without split-K)

    def reduce_launches(self, out2: torch.Tensor) -> list:
        """The reduce launch (kernel, grid, args, constexprs, num_warps) summing the partials, if any."""
        return [splitk_reduce_launch(self.part, out2, self.split) + (4,)] if self.split > 1 else []


def split_plan(units: int, out2: torch.Tensor, block_n: int, on_cuda: bool, num_sms: Optional[int],
               split: Optional[int]) -> SplitPlan:
    """`int4.split_count` over `units` loop trips (`split`: asked for instead, benchmarks) and the partials."""
    M, N = out2.shape
    split = split_count(units, N, block_n, on_cuda, num_sms or sm_count(out2.device), wanted=split)
    part = torch.empty(split, M, N, dtype=torch.float32, device=out2.device) if split > 1 else out2
    return SplitPlan(split, cdiv(units, split), part)


def run(x: torch.Tensor, launches: list, options: KernelOptions) -> None:
    """Launch (kernel, grid, args, constexprs, num_warps) tuples in order on x's device (one stage each)."""
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device:
        for kern, grid, args, constexprs, num_warps in launches:
            kern.on(x, options)[grid](*args, **constexprs, num_warps=num_warps, num_stages=1)


def add_aot_config(configs: dict, prepare, x: torch.Tensor, fw, label) -> None:
    """`prepare(x, fw, on_cuda=True, num_sms=H100_SMS)`'s GEMV launch (meta tensors) into `configs` via
    `_triton.add_config`; label(constexprs): its label."""
    _, launches = prepare(x, fw, on_cuda=True, num_sms=H100_SMS)
    kern, _, args, constexprs, num_warps = launches[0]
    cfg: LaunchConfig = launch_config(kern, args, constexprs, num_warps=num_warps, num_stages=1)
    add_config(configs, cfg, label(constexprs))
