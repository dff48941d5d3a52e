"""The int4 dequant-matmul op: `int4_linear` (the launcher: checks, the launch choice of `int4_launch`, the
launches) and its PyTorch reference `int4_linear_ref`, for weights in `int4_format`'s GPTQ layout; the
kernels are `int4_gemv` (decode, M <= 16) and `int4_gemm` (prefill).

Numerics: dequantization computes (q - z) * s in fp32 and rounds once to x's dtype; the reference, the
quantizer and the Triton kernels for M > 1 produce the same dequantized values, so those differ from
`int4_linear_ref` only by fp32 summation order. The one-row decode kernel skips the rounding of each
weight (q - z exact, the scale applied per tile in fp32): its result is nearer the exact product than the
reference's. So does `_int4_gemv_mma_kernel` (up to 16 rows on tensor cores, the weight as the A operand;
a launch one asks for, `int4_launch(kind="gemv_mma")`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import (H100_SMS, LaunchConfig, as_rows, cdiv, launch_config, sm_count, tickets,
                      triton_dtype)
from .int4_format import (_FLOAT_DTYPES, CHECKPOINT_FORMATS, GROUP_SIZES, Int4Weight,  # noqa: F401 (re-exported)
                          _pack_nibbles, _unpack_nibbles, dequantize_int4, quantize_int4, unpack_gptq)
from .int4_dequant import check_weight, dequantize_int4_triton, meta_weight
from .int4_gemm import _int4_gemm_kernel
from .int4_gemv import (MMA_BLOCK_K, MMA_FLOAT_BIAS, _int4_gemv_kernel, _int4_gemv_mma_kernel,  # noqa: F401
                        _int4_splitk_reduce_kernel, nibble_pair_asm, splitk_reduce_launch)
from .int4_tiles import FLOAT_BIAS_BITS
from .options import DEFAULT_OPTIONS, KernelOptions

# The weight format's names (`int4_format`) and the kernels' constants stay importable from here.

_MAX_SPLIT_K = 16
_GEMV_MAX_M = 16


def int4_linear_ref(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype: F.linear(x, dequantize_int4(w, x.dtype))."""
    return F.linear(x, dequantize_int4(w, x.dtype))


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

def _check(x: torch.Tensor, w: Int4Weight) -> None:
    """TypeError / ValueError unless the kernels can run x @ dequant(w)^T."""
    check_weight(w, "int4_linear")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"int4_linear: x dtype {x.dtype} is not supported; expected float32, float16 or bfloat16")
    N, K = w.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"int4_linear: x must be [..., {K}] for a [{N}, {K}] weight, got {tuple(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"int4_linear: x on {x.device}, weight on {w.device}")


def _prepare(x: torch.Tensor, w: Int4Weight, on_cuda: Optional[bool] = None, num_sms: Optional[int] = None,
             cfg: Optional[Int4Launch] = None, one_pass: Optional[bool] = None,
             options: KernelOptions = DEFAULT_OPTIONS):
    """Check the arguments, allocate the output (and split-K scratch) and build the launches:
    (out, [(kernel, grid, args, constexprs, num_warps, num_stages), ...]) — empty when there is nothing
    to compute. Runs on meta tensors too (see `aot_configs`, which passes on_cuda and num_sms).
    one_pass (default: whether `options` has the experiment "int4_one_pass"): with split-K, the GEMV's last
    program per column block sums the partials (`_sum_splits_if_last`) instead of `_int4_splitk_reduce_kernel`."""
    _check(x, w)
    N, K = w.shape
    g = w.group_size
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
        launches.append(splitk_reduce_launch(part, out2, cfg.split_k) + (4, 1))
    return out, launches


def int4_linear(x: torch.Tensor, w: Int4Weight, cfg: Optional[Int4Launch] = None, *,
                options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Triton x @ dequant(w)^T; same contract as `int4_linear_ref` (differs by fp32 summation order, and
    for one row by the rounding of the dequantized weights, which that kernel skips).

    x: [..., in] fp32/fp16/bf16, unit stride in the last dim, leading dims that flatten to one row
    stride (no copy); w: an Int4Weight [out, in] on x's device, contiguous fields, group size a
    multiple of 32 (scales in any float dtype; they are read as fp32). Returns a new contiguous
    [..., out] tensor in x's dtype. Weights dequantize to x's dtype ((q - z) * s in fp32, rounded
    once; not rounded when M = 1), products and sums in fp32 (float32 x: IEEE dots, not TF32). M = rows of x: M <= 16
    runs the decode GEMV (split-K with a deterministic reduce), M > 16 the tiled GEMM. CUDA tensors run the
    compiled kernels, CPU tensors Triton's interpreter. cfg: a launch other than `int4_launch`'s (benchmarks;
    a "gemv_mma" launch needs M <= 16, fp16/bf16 x and group 128, else ValueError). options: the kernel
    paths (PDL, the experiments "int4_mma", "int4_one_pass" and "int4_dequant_gemm": more than 16 rows as
    `int4_linear_ref` computes them, the weight dequantized by `int4_dequant` then the dense GEMM).
    """
    if cfg is None and options.has("int4_dequant_gemm") and x.numel() // max(x.shape[-1], 1) > _GEMV_MAX_M:
        _check(x, w)  # prefill rows: the weight dequantized (bitwise dequantize_int4), then the dense GEMM
        return F.linear(x, dequantize_int4_triton(w, x.dtype))
    out, launches = _prepare(x, w, cfg=cfg, options=options)
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device:  # Triton launches on the current CUDA device
        for kern, grid, args, constexprs, num_warps, num_stages in launches:
            kern.on(x, options)[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    return out


# ---- ahead-of-time specialisations -----------------------------------------------------------

def aot_configs(models, dtypes=(torch.bfloat16, torch.float16), group_size: int = 128,
                rows=(1, 8, 512)) -> list[LaunchConfig]:
    """The CUDA launches of the linears (wqkv, wo, w13, w2) of `models` (ModelShapes, e.g. CodeLlama
    7B/34B/70B) in bf16 and fp16, group 128, for decode (M = 1 and 8; also through `_int4_gemv_mma_kernel`) and
    prefill (M = 512): `_prepare` run on meta tensors (H100's SM count), typed as the JIT would type them. Shapes
    that specialise alike share
    one entry, labelled with the first shape that needed it. The arguments let tests compile other
    specialisations (fp32, groups 32/64)."""
    configs = {}
    for dtype in dtypes:
        for shape in models:
            model = shape.label
            for name, (n_out, n_in) in shape.projection_shapes().items():
                w = meta_weight(n_out, n_in, group_size, dtype)
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
