"""Dense matrix-vector product for batch-1 decode: y = W x with W [N, K] in the model dtype.

At one row per step decode only streams weights, and the cuBLAS kernels torch picks for M = 1 reach
76-87% of the copy bandwidth on an H200 where this kernel reaches 94-96% (bench/gemv_sweep.py, results
in bench/results/NVIDIA-H200-2026-11-26/gemv-sweep.md). `linear` is the Triton backend's dense
projection: one-row inputs on CUDA take this kernel, every other call `F.linear`.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._triton import LaunchConfig, add_config, as_rows, cdiv, kernel, launch_config, pdl_prologue, triton_dtype
from .options import DEFAULT_OPTIONS, KernelOptions
from .rms_norm import inv_rms, rms_norm, rms_norm_ref
from .swiglu import swiglu, swiglu_ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] with one row in all, w [N, K] -> [..., N] in x's dtype: F.linear(x, w)."""
    return F.linear(x, w)


def linear_swiglu_ref(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """x [..., K], w13 [2F, K] = [gate; up] rows -> silu(gate) * up [..., F] in x's dtype (the projection
    rounded to x's dtype, then `swiglu_ref`'s steps)."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return swiglu_ref(gate, up)


# ---- Triton ----------------------------------------------------------------------------------

@triton.jit
def _prefetch_l2(ptrs):
    """prefetch.global.L2 of every address in `ptrs` (GPU only: inline PTX)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@kernel
def _gemv_kernel(X, W, Out, N, K, stride_wn,  # x [K] contiguous; W [N, K] row-strided; out [N]
                 R, NW, H, eps,  # NORM only: residual [K] (HAS_RESIDUAL), norm weight [K], new residual [K]
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 SWIGLU: tl.constexpr = False, NORM: tl.constexpr = False, HAS_RESIDUAL: tl.constexpr = False,
                 PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False):
    """out[n] = sum_k W[n, k] x[k], products and sums in fp32, rounded once to the output dtype.
    One program per BLOCK_N rows of W, walking K in BLOCK_K columns; partial sums stay elementwise
    in registers and are reduced once at the end.
    SWIGLU: W is [2N, K] = [gate; up]; the program also walks the up rows n + N and writes
    silu(gate) * up with the steps of the unfused path (each projection rounded, then `_swiglu_kernel`'s).
    NORM: the operand is RMSNorm(x + residual) * NW (RMSNorm of x alone without HAS_RESIDUAL) in one pass:
    h = x + residual rounded to the io dtype (program 0 stores it to H, the new residual stream), the
    products take h * NW in fp32, and the sums of squares of h, gathered on the way, give the per-row
    1 / rms that scales the fp32 sums at the end (no rounding of the normalised operand).
    PREFETCH (with PDL): between letting the next kernel launch and waiting for the previous one, the
    program asks for its weight rows into L2 (weights never change during decode), so their fetch
    overlaps the previous kernel's end instead of starting after it."""
    pid = tl.program_id(0)
    DTYPE: tl.constexpr = Out.dtype.element_ty
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    up_ptrs = w_ptrs + N.to(tl.int64) * stride_wn
    if PDL and PREFETCH:
        gdc_launch_dependents()
        LINE: tl.constexpr = 1024 // W.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
        rows = W + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn
        lines = tl.arange(0, BLOCK_K // LINE) * LINE
        for k0 in range(0, K, BLOCK_K):
            cols = tl.minimum(k0 + lines, K - 1)
            _prefetch_l2(rows[:, None] + cols[None, :])
            if SWIGLU:
                _prefetch_l2(rows[:, None] + N.to(tl.int64) * stride_wn + cols[None, :])
        gdc_wait()
    else:
        pdl_prologue(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        if EVEN_K:
            w_mask = n_mask[:, None]
            x = tl.load(X + k0 + offs_k)
        else:
            w_mask = n_mask[:, None] & k_mask[None, :]
            x = tl.load(X + k0 + offs_k, mask=k_mask, other=0.0)
        w = tl.load(w_ptrs + k0, mask=w_mask, other=0.0, eviction_policy="evict_first")
        x32 = x.to(tl.float32)
        if NORM:
            if HAS_RESIDUAL:
                r = tl.load(R + k0 + offs_k, mask=k_mask, other=0.0)
                h = (x32 + r.to(tl.float32)).to(DTYPE)  # rounded once, as PyTorch's io-dtype add
                tl.store(H + k0 + offs_k, h, mask=k_mask & (pid == 0))
                x32 = h.to(tl.float32)
            squares += x32 * x32
            x32 = x32 * tl.load(NW + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x32[None, :]
        if SWIGLU:
            w_up = tl.load(up_ptrs + k0, mask=w_mask, other=0.0, eviction_policy="evict_first")
            acc_up += w_up.to(tl.float32) * x32[None, :]
    y = tl.sum(acc, 1)
    y_up = tl.sum(acc_up, 1)
    if NORM:
        rstd = inv_rms(tl.sum(squares, 0), K, eps)
        y = y * rstd
        y_up = y_up * rstd
    if SWIGLU:
        gate = y.to(DTYPE).to(tl.float32)
        up = y_up.to(DTYPE).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(DTYPE)
        y = act.to(tl.float32) * up
    tl.store(Out + offs_n, y.to(DTYPE), mask=n_mask)


@dataclass(frozen=True)
class GemvLaunch:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Measured on an H200 (bench/gemv_sweep.py, 14 tiles at the four 7B shapes): 2 x 1024 with 4 warps was
# within 3% of the best tile at every shape; the best per shape differed by shape.
CUDA_LAUNCH = GemvLaunch(block_n=2, block_k=1024, num_warps=4, num_stages=3)
# With the SwiGLU epilogue a program reads the same two weight rows, one gate and one up row.
SWIGLU_CUDA_LAUNCH = GemvLaunch(block_n=1, block_k=1024, num_warps=4, num_stages=3)
# With the RMSNorm prologue every program also reads the residual and the norm weight and squares h, work
# spread here over twice the weight rows of the plain tiles (four rows a program; not yet measured).
NORM_CUDA_LAUNCH = GemvLaunch(block_n=4, block_k=1024, num_warps=4, num_stages=3)
NORM_SWIGLU_CUDA_LAUNCH = GemvLaunch(block_n=2, block_k=1024, num_warps=4, num_stages=3)
# The interpreter pays per program, not per byte: wide row blocks keep the CPU tests fast.
INTERPRETER_LAUNCH = GemvLaunch(block_n=64, block_k=512, num_warps=4, num_stages=1)


def gemv_launch(on_cuda: bool, swiglu: bool = False, norm: bool = False) -> GemvLaunch:
    """The one place the tile is picked: on a GPU CUDA_LAUNCH, SWIGLU_CUDA_LAUNCH with the SwiGLU epilogue,
    NORM_*_CUDA_LAUNCH with the RMSNorm prologue; INTERPRETER_LAUNCH in the interpreter."""
    if not on_cuda:
        return INTERPRETER_LAUNCH
    if norm:
        return NORM_SWIGLU_CUDA_LAUNCH if swiglu else NORM_CUDA_LAUNCH
    return SWIGLU_CUDA_LAUNCH if swiglu else CUDA_LAUNCH


@dataclass(frozen=True)
class NormInput:
    """The RMSNorm in front of a projection: the operand is rms_norm(x + residual) * weight."""

    residual: torch.Tensor | None  # [..., K] like x, or None (the first layer's norm)
    weight: torch.Tensor           # [K] in x's dtype
    eps: float


def _prepare(x: torch.Tensor, w: torch.Tensor, cfg: GemvLaunch | None = None, on_cuda: bool | None = None,
             swiglu: bool = False, norm: NormInput | None = None, prefetch: bool | None = None,
             options: KernelOptions = DEFAULT_OPTIONS):
    """Check the arguments, allocate the outputs and build the launch: (out, h, (grid, args, constexprs,
    num_warps, num_stages)), or (out, h, None) when there is nothing to launch. h is the new residual
    stream with `norm` (x itself without a residual), else None. Runs on meta tensors too (see
    `aot_configs`). swiglu: w is [2F, K] = [gate; up] and out [..., F]. prefetch: the kernel's PREFETCH
    (default: whether `options` has the experiment "gemv_prefetch"; it acts only where the launch has PDL)."""
    who = ("norm_" if norm else "") + ("gemv_swiglu" if swiglu else "gemv")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{who}: w must be a 2-d [N, K] tensor, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if x.dtype not in _DTYPES or w.dtype != x.dtype:
        raise TypeError(f"{who}: x and w must share one dtype of float32/float16/bfloat16, got x {x.dtype}, "
                        f"w {w.dtype}")
    rows, K = w.shape
    if swiglu and rows % 2:
        raise ValueError(f"{who}: w must stack gate and up rows ([2F, K]), got an odd row count {rows}")
    N = rows // 2 if swiglu else rows
    if x.dim() < 1 or x.shape[-1] != K or x.numel() != K:
        raise ValueError(f"{who}: x must be [..., {K}] holding one row for a [{rows}, {K}] weight, "
                         f"got {tuple(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"{who}: x on {x.device}, w on {w.device}")
    if K > 0 and w.stride(1) != 1:
        raise ValueError(f"{who}: w must have unit stride along K, got strides {w.stride()}")
    h = None
    if norm is not None:
        nw, res = norm.weight, norm.residual
        if nw.shape != (K,) or nw.dtype != x.dtype or not nw.is_contiguous() or nw.device != x.device:
            raise ValueError(f"{who}: norm weight must be a contiguous [{K}] {x.dtype} tensor on {x.device}, got "
                             f"{tuple(nw.shape)} {nw.dtype} on {nw.device}")
        if res is not None and (res.shape != x.shape or res.dtype != x.dtype or res.device != x.device):
            raise ValueError(f"{who}: residual must match x ({tuple(x.shape)} {x.dtype} on {x.device}), got "
                             f"{tuple(res.shape)} {res.dtype} on {res.device}")
        if not norm.eps > 0:
            raise ValueError(f"{who}: eps must be > 0, got {norm.eps}")
        if K == 0:
            raise ValueError(f"{who}: RMSNorm of an empty row (K = 0) is undefined")
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if res is not None else x
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    if N == 0:
        if h is not None and h is not x:  # nothing to project, but the residual stream is owed
            h.copy_(x + norm.residual)
        return out, h, None
    if K == 0:  # the projection is 0; silu(0) * 0 = 0 too
        return out.zero_(), h, None
    x1 = as_rows(x, K, f"{who}: x")
    norm_args = (x1, x1, x1, 0.0)  # unused pointers without NORM
    if norm is not None:
        res = as_rows(norm.residual, K, f"{who}: residual") if norm.residual is not None else x1
        norm_args = (res, norm.weight, h.view(K), float(norm.eps))
    on_cuda = x.is_cuda if on_cuda is None else on_cuda
    cfg = cfg or gemv_launch(on_cuda, swiglu, norm is not None)
    grid = (cdiv(N, cfg.block_n),)
    args = (x1, w, out, N, K, w.stride(0)) + norm_args
    constexprs = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0, SWIGLU=swiglu,
                      NORM=norm is not None, HAS_RESIDUAL=norm is not None and norm.residual is not None,
                      PREFETCH=prefetch if prefetch is not None else options.has("gemv_prefetch"))
    return out, h, (grid, args, constexprs, cfg.num_warps, cfg.num_stages)


def gemv(x: torch.Tensor, w: torch.Tensor, cfg: GemvLaunch | None = None, *,
         options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Triton W x; same contract as `gemv_ref` (differs by fp32 summation order).

    x: [..., K] with exactly one row (numel == K), fp32/fp16/bf16, unit stride along K;
    w: [N, K] of x's dtype on x's device, unit stride along K (any row stride).
    Returns a new contiguous [..., N] tensor in x's dtype. cfg: a tile other than `gemv_launch`'s (tests).
    options: the kernel paths (PDL, the experiment "gemv_prefetch").
    CUDA tensors run the compiled kernel, CPU tensors Triton's interpreter.
    """
    return _run(x, *_prepare(x, w, cfg, options=options), options)[0]


def gemv_swiglu(x: torch.Tensor, w13: torch.Tensor, cfg: GemvLaunch | None = None, *,
                options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Triton silu(gate) * up of the projection W13 x, W13 = [gate; up] ([2F, K]), in one kernel: the same
    values as `swiglu` applied to `gemv`'s output with the same tile (each projection rounded to x's dtype,
    then silu in fp32 rounded, times up rounded). Arguments as `gemv`; returns a new [..., F] tensor."""
    return _run(x, *_prepare(x, w13, cfg, swiglu=True, options=options), options)[0]


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              w: torch.Tensor, swiglu: bool = False, cfg: GemvLaunch | None = None, *,
              options: KernelOptions = DEFAULT_OPTIONS):
    """Triton W rms_norm(x + residual) * norm_weight (`gemv`, or `gemv_swiglu` with swiglu) in one kernel,
    -> (y, h): y as `gemv` / `gemv_swiglu`; h = x + residual rounded to x's dtype (a new tensor), or x
    itself without a residual. x, residual: one row [..., K]; norm_weight: [K] contiguous; all x's dtype.
    Numerics: `norm_linear_ref`'s, except that the normalised operand is not rounded to x's dtype (the
    1 / rms scales the fp32 sums instead), so the result is nearer the exact one."""
    norm = NormInput(residual, norm_weight, eps)
    return _run(x, *_prepare(x, w, cfg, swiglu=swiglu, norm=norm, options=options), options)


def _run(x: torch.Tensor, out: torch.Tensor, h, launch, options: KernelOptions):
    if launch is not None:
        grid, args, constexprs, num_warps, num_stages = launch
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _gemv_kernel.on(x, options)[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    return out, h


def linear(x: torch.Tensor, w: torch.Tensor, *, options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """The dense projection of the Triton backend: x [..., K] @ w[N, K]^T -> [..., N] in x's dtype.
    On CUDA, one row in all (batch-1 decode) with a unit-stride weight of x's dtype: `gemv`; otherwise
    F.linear. CPU tensors always take F.linear: Triton's interpreter spends ~35 ns per weight, which made
    the Triton backend's CPU tests (the golden decodes) 2.5x slower; the kernel's own interpreter tests
    (tests/kernel_tests/test_gemv.py) check it instead."""
    if _one_row_on_cuda(x, w):
        return gemv(x, w, options=options)
    return F.linear(x, w)


def linear_swiglu(x: torch.Tensor, w13: torch.Tensor, *, options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """The Triton backend's gated projection: silu(gate) * up of x @ w13^T, w13 = [gate; up] [2F, K] ->
    [..., F]. Where `linear` takes the GEMV, `gemv_swiglu` (one kernel instead of two); otherwise F.linear
    then the `swiglu` kernel on its two halves. Same values as `linear_swiglu_ref` up to summation order."""
    if _one_row_on_cuda(x, w13) and w13.shape[0] % 2 == 0:
        return gemv_swiglu(x, w13, options=options)
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return swiglu(gate, up, options=options)


def norm_linear_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    w: torch.Tensor, swiglu: bool = False):
    """A pre-norm projection: (linear or linear_swiglu of rms_norm(x + residual) * norm_weight, h), h the
    new residual stream (`rms_norm_ref`'s). x, residual [..., K]; norm_weight [K]; w [N, K] ([2F, K])."""
    normed, h = rms_norm_ref(x, norm_weight, eps, residual)
    return (linear_swiglu_ref(normed, w) if swiglu else F.linear(normed, w)), h


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                w: torch.Tensor, swiglu: bool = False, *, options: KernelOptions = DEFAULT_OPTIONS):
    """The Triton backend's pre-norm projection, `norm_linear_ref`'s contract: the `rms_norm` kernel, then
    `linear` / `linear_swiglu`; with the experiment "norm_gemv" in `options`, where those take the GEMV,
    one `norm_gemv` kernel instead of two."""
    if _one_row_on_cuda(x, w) and (not swiglu or w.shape[0] % 2 == 0) and options.has("norm_gemv"):
        return norm_gemv(x, residual, norm_weight, eps, w, swiglu, options=options)
    normed, h = rms_norm(x, norm_weight, eps, residual, options=options)
    return (linear_swiglu(normed, w, options=options) if swiglu else linear(normed, w, options=options)), h


def _one_row_on_cuda(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.is_cuda and x.numel() == x.shape[-1] and w.dim() == 2 and w.dtype == x.dtype and w.stride(-1) == 1


# ---- ahead-of-time specialisations -----------------------------------------------------------

def aot_configs(models) -> list[LaunchConfig]:
    """The CUDA launches of the projections of `models` (ModelShapes, e.g. CodeLlama 7B/34B/70B) at one row
    (wqkv, wo, w13, w2 and the lm_head; wqkv and w13 with the RMSNorm prologue too; each with and without the L2
    prefetch), in bf16 and fp16: `_prepare` on meta tensors. Shapes that specialise alike share one entry."""
    configs = {}
    for dtype in (torch.bfloat16, torch.float16):
        for a in models:
            label = a.label
            shapes = {**a.projection_shapes(), "output": (a.vocab_size, a.dim)}
            for name, (n, k) in shapes.items():
                x = torch.empty(1, k, dtype=dtype, device="meta")
                w = torch.empty(n, k, dtype=dtype, device="meta")
                nw = torch.empty(k, dtype=dtype, device="meta")
                norms = [None]  # the pre-norm projections also with the RMSNorm prologue (the first layer's
                if name in ("wqkv", "w13"):  # norm has no residual)
                    norms += [NormInput(None, nw, 1e-5), NormInput(torch.empty_like(x), nw, 1e-5)]
                for fused, norm, prefetch in itertools.product((False, True) if name == "w13" else (False,),
                                                                norms, (False, True)):
                    _, _, (_, args, constexprs, num_warps, num_stages) = _prepare(
                        x, w, on_cuda=True, swiglu=fused, norm=norm, prefetch=prefetch)
                    cfg = launch_config(_gemv_kernel, args, constexprs, num_warps=num_warps, num_stages=num_stages)
                    tile = f"{constexprs['BLOCK_N']}x{constexprs['BLOCK_K']}"
                    extra = (" swiglu" if fused else "") + (" prefetch" if prefetch else "")
                    if norm is not None:
                        extra += " norm" + ("+residual" if norm.residual is not None else "")
                    add_config(configs, cfg, f"{triton_dtype(dtype)} {tile}{extra}"
                                             f"{'' if constexprs['EVEN_K'] else ' masked K'} ({label} {name} {n}x{k})")
    return list(configs.values())
