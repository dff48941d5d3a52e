"""int4 decode GEMV on the tensor cores from the fragment-order layout (`int4_frag_format`): the Gluon kernel
for CUDA, its Triton twin (what the interpreter runs, and the reference for the kernel's arithmetic), the
launcher `int4_frag_linear` and the PyTorch reference `int4_frag_linear_ref`. Behind the experiment
"int4_frag" until a GPU run measures it (kernels/options.py).

Why Gluon: in Triton the tensor-core GEMV (`int4_gemv._int4_gemv_mma_kernel`) spends 2.6 SASS instructions
a weight, mostly on things the language decides: the weight tile goes through shared memory to reach the MMA
layout, two k-rows of different int32 are merged (PRMT) before each conversion, x is staged through shared
memory for every 16-wide plane, and x's 1..16 rows are padded to the wgmma's 16 columns. Gluon states the
layouts: each lane loads its own A-fragment words (one 16-byte load per 32 weights) and its own 16
consecutive x values straight into registers (the B fragments; `convert_layout(..., assert_trivial=True)`
proves no data moves), the MMA is `mma.sync.m16n8k16` (8 columns of x, no shared memory, no barriers) on
sm_80 and sm_90 alike, and one LOP3 (after a shift, for three planes of four) turns two weights into bf16
128 + q: 7 instructions per 8 weights. A program's share of the weight is contiguous in the layout, so the loop
advances three pointers a trip and loads at constant offsets from them (no per-load address arithmetic), and the
weight loads carry no evict_first (its cache policy costs ~0.04 instructions a weight). sm_90 loop (`kernels.sass`,
7B shapes, group 128): 1.32 SASS instructions a weight at M = 1 and 1.41 at M = 8 (the Triton MMA kernel: 2.6),
no shared memory; groups of 32 (two groups a 64-column trip, so twice the scale work): 1.76 at M = 1.

Bytes: the fp32 (s, c) pairs cost 8 bytes a group and output column where GPTQ's bf16 scale and 4-bit zero cost
2.5: at group 128 the layout streams 0.5625 bytes a weight against GPTQ's 0.5195 (+8%).

Per trip (64 input columns) a program multiplies 4 nibble planes of each of its 16-row tiles by the trip's x
into a per-group fp32 sum (groups of 32: planes 0-1 and 2-3 into two), and a ones-MMA sums x (the same B
fragments); per group and output column,
acc += s * part + (-(128 + z) s) * sum(x) (two FMAs, `int4_frag_format`'s scales). Grid (padded N / 256,
SPLIT_K); with SPLIT_K > 1 fp32 partials [SPLIT_K, M, N] that `int4_gemv._int4_splitk_reduce_kernel` sums
in order. M <= 16 rows of bf16 x: MT = 8 columns of x (one n8 MMA tile) for up to 8 rows, 16 (two) above.

Numerics: the weights are not rounded ((q - z) s is applied in fp32 after the MMA), products exact, sums in
fp32: within fp32 rounding of `int4_frag_linear_ref` (fp32 dequantize-then-matmul), rounded once to bf16.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ._triton import LaunchConfig, cdiv, gluon_kernel, kernel
from .frag_gemv import SplitPlan, add_aot_config, check_rows, powers, run, split_plan, x_layout
from .int4_format import Int4Weight
from .int4_frag_format import FRAG_BLOCK_N, FRAG_K, FRAG_WARPS, Int4FragWeight, dequantize_frag, frag_supported, to_frag
from .options import DEFAULT_OPTIONS, KernelOptions
from .weight_cache import derived

FRAG_MAX_M = 16

# One packed pair of int16 (rows k, k + 1 of one output column; nibble c of each holds plane c) in $4 ->
# the four planes as bf16x2 128 + q in $0..$3: mask a nibble in each half and OR in 0x4300 (one LOP3,
# 0xea = (a & b) | c), after a shift for planes 1..3. 7 instructions for 8 weights.
FRAG_ASM = tl.constexpr("""{
.reg .b32 t;
lop3.b32 $0, $4, 0x000f000f, 0x43004300, 0xea;
shr.u32 t, $4, 4;
lop3.b32 $1, t, 0x000f000f, 0x43004300, 0xea;
shr.u32 t, $4, 8;
lop3.b32 $2, t, 0x000f000f, 0x43004300, 0xea;
shr.u32 t, $4, 12;
lop3.b32 $3, t, 0x000f000f, 0x43004300, 0xea;
}""")


def _scale_layout(num_warps: int, reps: int) -> gl.DistributedLinearLayout:
    """[w, g, r, e1, 2] fp32: the (s, c) pairs of a program's rows in the scales' stored order, each thread
    holding those of its accumulator rows (warp w, lane group g; lanes t = 0..3 share them): 16 consecutive
    floats, four 16-byte loads."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 1, 0]] + [[0, 0, r, 0, 0] for r in powers(reps)],
        lane_bases=[[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 4, 0, 0, 0]],
        warp_bases=[[w, 0, 0, 0, 0] for w in powers(num_warps)], block_bases=[], shape=[num_warps, 8, reps, 2, 2])


@gluon.jit
def _add_group(acc, part, xs, sc_ptrs, BLOCK_N: gl.constexpr, MMA: gl.constexpr):
    """acc + s * part + c * sum(x) for one group: part = sum (128 + q) x, xs's rows each sum(x), sc_ptrs its
    (s, c) pairs in the scales' stored order [w, g, r, e1, 2] (rows 64 r + 16 w + 8 e1 + g)."""
    col_sum = gl.convert_layout(gl.max(xs, 0), gl.SliceLayout(0, MMA))  # every row of xs is sum_k x
    s, c = gl.load(sc_ptrs).permute([2, 0, 3, 1, 4]).reshape([BLOCK_N, 2]).split()
    s = gl.convert_layout(s, gl.SliceLayout(1, MMA), assert_trivial=True)
    c = gl.convert_layout(c, gl.SliceLayout(1, MMA), assert_trivial=True)
    acc = gl.fma(part, s[:, None], acc)
    return gl.fma(c[:, None], col_sum[None, :], acc)


@gluon_kernel(do_not_specialize=["units_per_split"])
def _int4_frag_gemv_kernel(X, Codes, Scales, Out, Part, M, N, n_pad, K, stride_xm, stride_om, units_per_split,
                           GROUP_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr,
                           WRITE_PARTIALS: gl.constexpr, SCALE_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
                           MT: gl.constexpr = 8):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    TILES: gl.constexpr = BLOCK_N // 16
    # codes: [TILES, 32 lanes, 8] int16 a trip, 16 bytes a lane; x: lane (g, t) holds row g, 16 values at 16 t
    w_l: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 32, 1], [NUM_WARPS, 1, 1], [2, 1, 0])
    x_l: gl.constexpr = X_LAYOUT
    UNIT: gl.constexpr = 64 if GROUP_SIZE == 32 else GROUP_SIZE  # input columns a loop trip: 1 or 2 groups
    pid_n = gl.program_id(0)
    u_start = gl.program_id(1) * units_per_split
    u_end = gl.minimum(u_start + units_per_split, K // UNIT)

    tile = gl.arange(0, TILES, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_l)))
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_l)))
    elem = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_l)))
    w_ptrs = Codes + pid_n * (K * 64) + tile[:, None, None] * 256 + lane[None, :, None] * 8 + elem[None, None, :]
    xm = gl.arange(0, MT, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_l)))
    xt = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_l)))
    xe = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_l)))
    if GROUP_SIZE == 32:  # lane t: x[8 t .. + 7] (planes 0-1) and x[32 + 8 t .. + 7] (planes 2-3)
        x_ptrs = (X + xm[:, None, None].to(gl.int64) * stride_xm + xt[None, :, None] * 8
                  + (xe[None, None, :] // 8) * 32 + xe[None, None, :] % 8)
    else:
        x_ptrs = X + xm[:, None, None].to(gl.int64) * stride_xm + xt[None, :, None] * 16 + xe[None, None, :]
    x_mask = (xm[:, None, None] < M) & (xt[None, :, None] < 4) & (xe[None, None, :] < 16)
    REPS: gl.constexpr = BLOCK_N // (16 * NUM_WARPS)
    s_l: gl.constexpr = SCALE_LAYOUT
    sw = gl.arange(0, NUM_WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, s_l)))))
    sg = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, s_l)))))
    sr = gl.arange(0, REPS, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, s_l)))))
    se = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, s_l)))))
    sp = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, s_l)))))
    s_ptrs = (Scales + pid_n * (K // GROUP_SIZE * BLOCK_N * 2) + sw[:, None, None, None, None] * (32 * REPS)
              + sg[None, :, None, None, None] * (REPS * 4) + sr[None, None, :, None, None] * 4
              + se[None, None, None, :, None] * 2 + sp[None, None, None, None, :])

    ones = gl.full([16, 16], 1.0, gl.bfloat16, layout=a_l)
    acc = gl.zeros([BLOCK_N, MT], gl.float32, layout=mma)
    w_ptrs += u_start * (UNIT // 64 * TILES * 256)  # advanced a trip at a time: its loads at constant offsets
    x_ptrs += u_start * UNIT
    s_ptrs += u_start * (UNIT // GROUP_SIZE * BLOCK_N * 2)
    for u in range(u_start, u_end):
        part = gl.zeros([BLOCK_N, MT], gl.float32, layout=mma)
        xs = gl.zeros([16, MT], gl.float32, layout=mma)
        if GROUP_SIZE == 32:  # the chunk's second group: planes 2-3
            part_b = gl.zeros([BLOCK_N, MT], gl.float32, layout=mma)
            xs_b = gl.zeros([16, MT], gl.float32, layout=mma)
        for trip in gl.static_range(UNIT // 64):
            wq = gl.load(w_ptrs + trip * (TILES * 256))  # no evict_first: its cache policy costs ~0.04 SASS a weight
            wq = wq.reshape([TILES, 8, 4, 2, 2, 2]).permute([0, 4, 1, 3, 2, 5]).reshape([BLOCK_N, 16])
            wq = gl.convert_layout(wq, a_l, assert_trivial=True)
            p0, p1, p2, p3 = gl.inline_asm_elementwise(FRAG_ASM, "=r,=r,=r,=r,r", [wq],
                                                       dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
                                                       is_pure=True, pack=2)
            xv = gl.load(x_ptrs + trip * 64, mask=x_mask, other=0.0)  # [MT (m), 4 (t), 16 (c, e2, e0)]
            xv = xv.reshape([MT, 4, 4, 2, 2]).permute([3, 1, 4, 0, 2]).reshape([16, MT, 4])  # [j, m, c]
            xa, xb = xv.reshape([16, MT, 2, 2]).split()
            x0, x2 = xa.split()
            x1, x3 = xb.split()
            x0 = gl.convert_layout(x0, b_l, assert_trivial=True)
            x1 = gl.convert_layout(x1, b_l, assert_trivial=True)
            x2 = gl.convert_layout(x2, b_l, assert_trivial=True)
            x3 = gl.convert_layout(x3, b_l, assert_trivial=True)
            part = mma_v2(p0, x0, part)
            part = mma_v2(p1, x1, part)
            xs = mma_v2(ones, x0, xs)
            xs = mma_v2(ones, x1, xs)
            if GROUP_SIZE == 32:
                part_b = mma_v2(p2, x2, part_b)
                part_b = mma_v2(p3, x3, part_b)
                xs_b = mma_v2(ones, x2, xs_b)
                xs_b = mma_v2(ones, x3, xs_b)
            else:
                part = mma_v2(p2, x2, part)
                part = mma_v2(p3, x3, part)
                xs = mma_v2(ones, x2, xs)
                xs = mma_v2(ones, x3, xs)
        acc = _add_group(acc, part, xs, s_ptrs, BLOCK_N, mma)
        if GROUP_SIZE == 32:
            acc = _add_group(acc, part_b, xs_b, s_ptrs + BLOCK_N * 2, BLOCK_N, mma)
        w_ptrs += UNIT // 64 * TILES * 256
        x_ptrs += UNIT
        s_ptrs += UNIT // GROUP_SIZE * BLOCK_N * 2

    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    offs_m = gl.arange(0, MT, layout=gl.SliceLayout(0, mma))
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if WRITE_PARTIALS:
        rows = (gl.program_id(1) * M + offs_m).to(gl.int64)
        gl.store(Part + rows[None, :] * N + offs_n[:, None], acc, mask=mask)
    else:
        gl.store(Out + offs_m[None, :].to(gl.int64) * stride_om + offs_n[:, None], acc.to(gl.bfloat16), mask=mask)


@triton.jit
def _twin_planes(wq, xv, MT: tl.constexpr):
    """The four planes' sums of one trip in fp32, [4 (c), BLOCK_N, MT] as (128 + q) x, and x's [4, MT] sums."""
    xv = xv.reshape(MT, 4, 4, 2, 2).permute(3, 1, 4, 0, 2).reshape(16, MT, 4)  # [j, m, c]
    xa, xb = xv.reshape(16, MT, 2, 2).split()
    x0, x2 = xa.split()
    x1, x3 = xb.split()
    p0 = tl.sum(((wq & 15).to(tl.float32) + 128.0)[:, :, None] * x0[None, :, :], axis=1)
    p1 = tl.sum((((wq >> 4) & 15).to(tl.float32) + 128.0)[:, :, None] * x1[None, :, :], axis=1)
    p2 = tl.sum((((wq >> 8) & 15).to(tl.float32) + 128.0)[:, :, None] * x2[None, :, :], axis=1)
    p3 = tl.sum((((wq >> 12) & 15).to(tl.float32) + 128.0)[:, :, None] * x3[None, :, :], axis=1)
    return p0, p1, p2, p3, tl.sum(x0, axis=0), tl.sum(x1, axis=0), tl.sum(x2, axis=0), tl.sum(x3, axis=0)


@kernel(do_not_specialize=["units_per_split"])
def _int4_frag_gemv_twin(X, Codes, Scales, Out, Part, M, N, n_pad, K, stride_xm, stride_om, units_per_split,
                         GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_WARPS: tl.constexpr,
                         WRITE_PARTIALS: tl.constexpr, MT: tl.constexpr = 8):
    """`_int4_frag_gemv_kernel` in plain Triton: the same loads, reshapes and sums, the planes unpacked by
    arithmetic ((code >> 4c) & 15, + 128) and multiplied in fp32. The interpreter runs it on CPU tensors."""
    TILES: tl.constexpr = BLOCK_N // 16
    UNIT: tl.constexpr = 64 if GROUP_SIZE == 32 else GROUP_SIZE
    pid_n = tl.program_id(0)
    u_start = tl.program_id(1) * units_per_split
    u_end = tl.minimum(u_start + units_per_split, K // UNIT)
    tile = tl.arange(0, TILES)
    lane = tl.arange(0, 32)
    elem = tl.arange(0, 8)
    w_ptrs = Codes + pid_n * (K * 64) + tile[:, None, None] * 256 + lane[None, :, None] * 8 + elem[None, None, :]
    xm = tl.arange(0, MT)
    xt = tl.arange(0, 4)
    xe = tl.arange(0, 16)
    if GROUP_SIZE == 32:
        x_ptrs = (X + xm[:, None, None].to(tl.int64) * stride_xm + xt[None, :, None] * 8
                  + (xe[None, None, :] // 8) * 32 + xe[None, None, :] % 8)
    else:
        x_ptrs = X + xm[:, None, None].to(tl.int64) * stride_xm + xt[None, :, None] * 16 + xe[None, None, :]
    x_mask = (xm[:, None, None] < M) & (xt[None, :, None] < 4) & (xe[None, None, :] < 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.arange(0, BLOCK_N)  # 64 r + 16 w + 8 e1 + g, stored at [w, g, r, e1]
    REPS: tl.constexpr = BLOCK_N // (16 * NUM_WARPS)
    s_ptrs = (Scales + pid_n * (K // GROUP_SIZE * BLOCK_N * 2) + ((row % 64) // 16) * (32 * REPS)
              + (row % 8) * (REPS * 4) + (row // 64) * 4 + ((row % 16) // 8) * 2)

    acc = tl.zeros([BLOCK_N, MT], tl.float32)
    for u in range(u_start, u_end):
        part_a = tl.zeros([BLOCK_N, MT], tl.float32)  # planes 0-1 (and 2-3 unless groups of 32)
        part_b = tl.zeros([BLOCK_N, MT], tl.float32)  # planes 2-3 with groups of 32: the chunk's second group
        sum_a = tl.zeros([MT], tl.float32)
        sum_b = tl.zeros([MT], tl.float32)
        for trip in tl.static_range(UNIT // 64):
            k0 = u * UNIT + trip * 64
            wq = tl.load(w_ptrs + (k0 // 64) * (TILES * 256)).to(tl.int32)
            wq = wq.reshape(TILES, 8, 4, 2, 2, 2).permute(0, 4, 1, 3, 2, 5).reshape(BLOCK_N, 16)
            xv = tl.load(x_ptrs + k0, mask=x_mask, other=0.0).to(tl.float32)
            p0, p1, p2, p3, s0, s1, s2, s3 = _twin_planes(wq, xv, MT)
            part_a += p0 + p1
            sum_a += s0 + s1
            part_b += p2 + p3
            sum_b += s2 + s3
        g = u * UNIT // GROUP_SIZE
        if GROUP_SIZE != 32:
            part_a += part_b
            sum_a += sum_b
        s = tl.load(s_ptrs + g * BLOCK_N * 2)
        c = tl.load(s_ptrs + g * BLOCK_N * 2 + 1)
        acc = tl.fma(part_a, s[:, None], acc)
        acc = tl.fma(c[:, None], sum_a[None, :], acc)
        if GROUP_SIZE == 32:
            s = tl.load(s_ptrs + (g + 1) * BLOCK_N * 2)
            c = tl.load(s_ptrs + (g + 1) * BLOCK_N * 2 + 1)
            acc = tl.fma(part_b, s[:, None], acc)
            acc = tl.fma(c[:, None], sum_b[None, :], acc)

    offs_m = tl.arange(0, MT)
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if WRITE_PARTIALS:
        rows = (tl.program_id(1) * M + offs_m).to(tl.int64)
        tl.store(Part + rows[None, :] * N + offs_n[:, None], acc, mask=mask)
    else:
        tl.store(Out + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc.to(Out.dtype.element_ty),
                 mask=mask)


def int4_frag_linear_ref(x: torch.Tensor, fw: Int4FragWeight) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype: x times the fp32-dequantized weight, in fp32, rounded once."""
    return F.linear(x.float(), dequantize_frag(fw, torch.float32)).to(x.dtype)


_FRAG_CACHE = "_int4_frag"  # the attribute of an Int4Weight holding its fragment-order copy


def frag_of(w: Int4Weight) -> Int4FragWeight:
    """`to_frag(w)`, made on first use and kept on `w` (the repack costs a pass over the weight)."""
    return derived(w, _FRAG_CACHE, lambda: to_frag(w))


def frag_eligible(x: torch.Tensor, w: Int4Weight) -> bool:
    """Whether `int4_frag_linear` serves x @ w^T: bf16 x of at most FRAG_MAX_M rows, a group size it lays out."""
    rows = x.numel() // max(x.shape[-1], 1)
    return x.dtype == torch.bfloat16 and 1 <= rows <= FRAG_MAX_M and frag_supported(w)


def _prepare(x: torch.Tensor, fw: Int4FragWeight, on_cuda: Optional[bool] = None, num_sms: Optional[int] = None,
             split: Optional[int] = None):
    """Check the arguments and build the launches: (out, [(kernel, grid, args, constexprs, num_warps), ...]).
    split: programs along K asked for instead of `int4.split_count`'s (benchmarks; still capped, none empty)."""
    if not isinstance(fw, Int4FragWeight):
        raise TypeError(f"int4_frag_linear: w must be an Int4FragWeight, got {type(fw).__name__}")
    x2, out, out2 = check_rows(x, fw, "int4_frag_linear", FRAG_MAX_M)
    (M, N), K = out2.shape, fw.shape[1]
    if M == 0:
        return out, []
    on_cuda = x.is_cuda if on_cuda is None else on_cuda
    units = K // max(fw.group_size, FRAG_K)  # a loop trip's input columns: a group, or a chunk of two groups of 32
    plan: SplitPlan = split_plan(units, out2, FRAG_BLOCK_N, on_cuda, num_sms, split)
    grid = (fw.padded_out // FRAG_BLOCK_N, plan.split)
    args = (x2, fw.codes, fw.scales, out2, plan.part, M, N, fw.padded_out, K, x2.stride(0), out2.stride(0),
            plan.per_split)
    constexprs = dict(GROUP_SIZE=fw.group_size, BLOCK_N=FRAG_BLOCK_N, NUM_WARPS=FRAG_WARPS,
                      WRITE_PARTIALS=plan.split > 1, MT=8 if M <= 8 else 16)
    if on_cuda:
        layouts = dict(SCALE_LAYOUT=_scale_layout(FRAG_WARPS, FRAG_BLOCK_N // (16 * FRAG_WARPS)),
                       X_LAYOUT=x_layout(constexprs["MT"], FRAG_WARPS))
        launches = [(_int4_frag_gemv_kernel, grid, args, dict(constexprs, **layouts), FRAG_WARPS)]
    else:
        launches = [(_int4_frag_gemv_twin, grid, args, constexprs, FRAG_WARPS)]
    return out, launches + plan.reduce_launches(out2)


def int4_frag_linear(x: torch.Tensor, fw: Int4FragWeight, *, options: KernelOptions = DEFAULT_OPTIONS,
                     split: Optional[int] = None) -> torch.Tensor:
    """x @ w^T from the fragment-order weight; contract of `int4_frag_linear_ref`, within fp32 rounding.

    x: [..., in] bfloat16, at most 16 rows (decode), unit stride in the last dim; fw: an Int4FragWeight on x's
    device (`to_frag` / `frag_of`). Returns a new [..., out] bf16 tensor. CUDA tensors run the Gluon kernel,
    CPU tensors its Triton twin in the interpreter. options: PDL of the split-K reduce. split: programs along K
    instead of the heuristic's (bench/gemv_sweep.py).
    """
    out, launches = _prepare(x, fw, split=split)
    run(x, launches, options)
    return out


# ---- ahead-of-time specialisations -----------------------------------------------------------

def aot_configs(models, group_size: int = 128, rows=(1, 8, 16)) -> list[LaunchConfig]:
    """The Gluon GEMV's launches for the linears of `models` (ModelShapes) in bf16, as the launcher makes
    them on CUDA (H100's SM count), typed as the JIT would type them; shapes that specialise alike share
    one entry, labelled with the first shape that needed it."""
    configs = {}
    for shape in models:
        for name, (n_out, n_in) in shape.projection_shapes().items():
            n_pad = cdiv(n_out, FRAG_BLOCK_N) * FRAG_BLOCK_N
            blocks = n_pad // FRAG_BLOCK_N
            fw = Int4FragWeight(codes=torch.empty(blocks, n_in // FRAG_K, FRAG_BLOCK_N // 16, 32, 8, dtype=torch.int16,
                                                  device="meta"),
                                scales=torch.empty(blocks, n_in // group_size, FRAG_WARPS, 8,
                                                   FRAG_BLOCK_N // (16 * FRAG_WARPS), 2, 2, device="meta"),
                                shape=(n_out, n_in), group_size=group_size)
            for M in rows:
                x = torch.empty(M, n_in, dtype=torch.bfloat16, device="meta")
                add_aot_config(configs, _prepare, x, fw, lambda c: (  # called at once: the loop's values
                    f"bf16 M={M} {FRAG_BLOCK_N}x{group_size}{' partials' if c['WRITE_PARTIALS'] else ''} frag "
                    f"({shape.label} {name} {n_out}x{n_in})"))
    return list(configs.values())
