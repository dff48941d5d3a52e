"""NF4 decode GEMV on the tensor cores from the fragment-order layout (`nf4_frag_format`): the Gluon kernel for
CUDA, its Triton twin (what the interpreter runs, and the reference for the kernel's arithmetic), the launcher
`nf4_frag_linear` and the PyTorch reference `nf4_frag_linear_ref`. Behind the experiment "nf4_frag" until a GPU
run measures it (kernels/options.py).

The lookup. An NF4 byte (two codes) names one of 256 pairs of 16-bit values, which is exactly one 32-bit
register of the MMA's A fragment. The program keeps the 256 pairs in shared memory once per lane (entry b of
lane l at byte 256 b + 4 l: 32 KiB used of a 64 KiB allocation), so a lane always reads its own bank (no bank
conflicts whatever the codes), and the address is one PRMT away from the code word: byte c of the word into
bits 8..15, the lane's 4 l into bits 0..7. Per byte of codes (two weights): one PRMT and one LDS, so the loop
spends one instruction a weight on decoding where bitsandbytes-style code (shift, mask, table load, multiply
per value) spends several (`nf4._nf4_gemv_kernel`: 9 SASS instructions a weight in all). The table is filled at
the start of each program (16 16-byte stores a thread) from `pairs` (1 KiB, from L2); the asm finds it at
`global_smem`, the base of the program's shared memory, which the table is the only allocation of (the AOT
test checks that).

The rest is `int4_frag`'s kernel: each lane loads its A-fragment codes (16 bytes per 16 x 64 block) and its 16
consecutive x values straight into registers, `mma.sync.m16n8k16` with 8 (or 16) columns of x, no zero point
(NF4 has none): per 64-column chunk (one NF4 block) and output column, acc += absmax * sum_k values[q] x (one
FMA). A loop trip covers CHUNKS = 4 chunks where the input width allows (2 with 16 columns of x, for
registers): more loads in flight per SM, where shared memory allows 3 programs. A program's chunks are
contiguous in the layout, so the loop advances three pointers and every load of a trip is at a constant
offset from them. sm_90 loop at the 7B shapes: 1.35 SASS instructions a weight at M = 1, 1.39 at M = 8, 1.73 at
M = 16, 192 KiB of loads in flight per SM. Grid (padded N / 256, SPLIT_K); with SPLIT_K > 1, fp32 partials
that `int4_gemv._int4_splitk_reduce_kernel` sums in order.

Numerics: the weights are `values` (the codebook rounded to the model dtype) times the fp32 absmax applied after
the MMA, products exact, sums in fp32: within fp32 rounding of `nf4_frag_linear_ref`, rounded once. Against
bitsandbytes' weights (code * absmax rounded to the dtype) each weight differs by at most one rounding of the
dtype, as those do from the fp32 products.
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
from .nf4_format import NF4Weight
from .nf4_frag_format import (NF4_FRAG_BLOCK_N, NF4_FRAG_K, NF4_FRAG_WARPS, Nf4FragWeight, dequantize_nf4_frag,
                              nf4_frag_supported, to_nf4_frag)
from .options import DEFAULT_OPTIONS, KernelOptions
from .weight_cache import derived

NF4_FRAG_MAX_M = 16
TABLE_STRIDE = 256  # bytes between a lane's consecutive entries: entry b of lane l at TABLE_STRIDE b + 4 l
TRIP_CHUNKS = (4, 2, 1)  # NF4 blocks (64 input columns) a loop trip covers: the most that divide the input width

# A 32-bit code word in $4 (byte c: plane c's two codes) -> the four planes' registers in $0..$3, each the (bf16
# or fp16) pair the byte names, read from the lane's own table column: address 256 byte + 4 lane = one PRMT
# (selector 0x55c4: byte 0 of 4 lane, byte c of the word, two zero bytes of 4 lane), plus the table's base (ptxas
# folds the add into the LDS; the lane id and the base are read once a trip).
NF4_LOOKUP_ASM = tl.constexpr("""{
.reg .b32 a, base, lane;
mov.u32 base, global_smem;
mov.u32 lane, %laneid;
shl.b32 lane, lane, 2;
prmt.b32 a, $4, lane, 0x5504;
add.u32 a, a, base;
ld.shared.b32 $0, [a];
prmt.b32 a, $4, lane, 0x5514;
add.u32 a, a, base;
ld.shared.b32 $1, [a];
prmt.b32 a, $4, lane, 0x5524;
add.u32 a, a, base;
ld.shared.b32 $2, [a];
prmt.b32 a, $4, lane, 0x5534;
add.u32 a, a, base;
ld.shared.b32 $3, [a];
}""")


def _scale_layout(num_warps: int, reps: int) -> gl.DistributedLinearLayout:
    """[w, g, r, e1] fp32: the absmax of a program's rows in the scales' stored order, each thread holding
    those of its accumulator rows (warp w, lane group g; lanes t = 0..3 share them): 8 consecutive floats."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1]] + [[0, 0, r, 0] for r in powers(reps)],
        lane_bases=[[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]],
        warp_bases=[[w, 0, 0, 0] for w in powers(num_warps)], block_bases=[], shape=[num_warps, 8, reps, 2])


@gluon.jit
def _fill_table(Pairs, NUM_WARPS: gl.constexpr):
    """The program's lookup table: entry b of lane l (pairs[b]) at byte 256 b + 4 l of its only shared
    allocation (the asm reads it at `global_smem`)."""
    tbl_l: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [NUM_WARPS, 1], [1, 0])
    table = gl.allocate_shared_memory(gl.int32, [256, 64], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    b = gl.arange(0, 256, layout=gl.SliceLayout(1, tbl_l))
    words = gl.load(Pairs + b)
    lanes = gl.zeros([256, 32], gl.int32, layout=tbl_l)
    table.slice(0, 32, dim=1).store(words[:, None] + lanes)
    gl.thread_barrier()


@gluon_kernel(do_not_specialize=["units_per_split"])
def _nf4_frag_gemv_kernel(X, Codes, Scales, Pairs, Out, Part, M, N, n_pad, K, stride_xm, stride_om, units_per_split,
                          BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr, CHUNKS: gl.constexpr,
                          WRITE_PARTIALS: gl.constexpr, SCALE_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
                          MT: gl.constexpr = 8):
    dt = X.dtype.element_ty  # bf16 or fp16: the MMA's operands and the output
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    TILES: gl.constexpr = BLOCK_N // 16
    w_l: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 32, 1], [NUM_WARPS, 1, 1], [2, 1, 0])
    x_l: gl.constexpr = X_LAYOUT
    pid_n = gl.program_id(0)
    u_start = gl.program_id(1) * units_per_split
    u_end = gl.minimum(u_start + units_per_split, K // (64 * CHUNKS))

    _fill_table(Pairs, NUM_WARPS)

    tile = gl.arange(0, TILES, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_l)))
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_l)))
    elem = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_l)))
    w_ptrs = Codes + pid_n * (K * 64) + tile[:, None, None] * 256 + lane[None, :, None] * 8 + elem[None, None, :]
    xm = gl.arange(0, MT, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_l)))
    xt = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_l)))
    xe = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_l)))
    x_ptrs = X + xm[:, None, None].to(gl.int64) * stride_xm + xt[None, :, None] * 16 + xe[None, None, :]
    x_mask = (xm[:, None, None] < M) & (xt[None, :, None] < 4) & (xe[None, None, :] < 16)
    REPS: gl.constexpr = BLOCK_N // (16 * NUM_WARPS)
    s_l: gl.constexpr = SCALE_LAYOUT
    sw = gl.arange(0, NUM_WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, s_l))))
    sg = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, s_l))))
    sr = gl.arange(0, REPS, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, s_l))))
    se = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, s_l))))
    s_ptrs = (Scales + pid_n * (K // 64 * BLOCK_N) + sw[:, None, None, None] * (16 * REPS)
              + sg[None, :, None, None] * (REPS * 2) + sr[None, None, :, None] * 2 + se[None, None, None, :])

    w_ptrs += u_start * (CHUNKS * TILES * 256)
    x_ptrs += u_start * (CHUNKS * 64)
    s_ptrs += u_start * (CHUNKS * BLOCK_N)
    acc = gl.zeros([BLOCK_N, MT], gl.float32, layout=mma)
    for u in range(u_start, u_end):
        for ch in gl.static_range(CHUNKS):
            wq = gl.load(w_ptrs + ch * (TILES * 256))
            wq = wq.reshape([TILES, 8, 4, 2, 2, 2]).permute([0, 4, 1, 3, 2, 5]).reshape([BLOCK_N, 16])
            wq = gl.convert_layout(wq, a_l, assert_trivial=True)
            p0, p1, p2, p3 = gl.inline_asm_elementwise(NF4_LOOKUP_ASM, "=r,=r,=r,=r,r", [wq],
                                                       dtype=(dt, dt, dt, dt), is_pure=False, pack=2)
            xv = gl.load(x_ptrs + ch * 64, mask=x_mask, other=0.0)  # [MT (m), 4 (t), 16 (c, e2, e0)]
            xv = xv.reshape([MT, 4, 4, 2, 2]).permute([3, 1, 4, 0, 2]).reshape([16, MT, 4])  # [j, m, c]
            xa, xb = xv.reshape([16, MT, 2, 2]).split()
            x0, x2 = xa.split()
            x1, x3 = xb.split()
            part = gl.zeros([BLOCK_N, MT], gl.float32, layout=mma)
            part = mma_v2(p0, gl.convert_layout(x0, b_l, assert_trivial=True), part)
            part = mma_v2(p1, gl.convert_layout(x1, b_l, assert_trivial=True), part)
            part = mma_v2(p2, gl.convert_layout(x2, b_l, assert_trivial=True), part)
            part = mma_v2(p3, gl.convert_layout(x3, b_l, assert_trivial=True), part)
            s = gl.load(s_ptrs + ch * BLOCK_N).permute([2, 0, 3, 1]).reshape([BLOCK_N])
            s = gl.convert_layout(s, gl.SliceLayout(1, mma), assert_trivial=True)
            acc = gl.fma(part, s[:, None], acc)
        w_ptrs += CHUNKS * TILES * 256
        x_ptrs += CHUNKS * 64
        s_ptrs += CHUNKS * BLOCK_N

    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    offs_m = gl.arange(0, MT, layout=gl.SliceLayout(0, mma))
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if WRITE_PARTIALS:
        prow = (gl.program_id(1) * M + offs_m).to(gl.int64)
        gl.store(Part + prow[None, :] * N + offs_n[:, None], acc, mask=mask)
    else:
        gl.store(Out + offs_m[None, :].to(gl.int64) * stride_om + offs_n[:, None], acc.to(dt), mask=mask)


@triton.jit
def _twin_plane(reg, c: tl.constexpr, Values, BLOCK_N: tl.constexpr):
    """Plane c's weights [BLOCK_N, 16] (fp32 `values`) from the fragment registers [BLOCK_N, 8]: byte c of each
    is the pair (column 2 i: high nibble, 2 i + 1: low nibble)."""
    byte = (reg >> (8 * c)) & 0xFF
    even = tl.load(Values + (byte >> 4))
    odd = tl.load(Values + (byte & 15))
    return tl.join(even, odd).reshape(BLOCK_N, 16)


@kernel(do_not_specialize=["units_per_split"])
def _nf4_frag_gemv_twin(X, Codes, Scales, Values, Out, Part, M, N, n_pad, K, stride_xm, stride_om, units_per_split,
                        BLOCK_N: tl.constexpr, NUM_WARPS: tl.constexpr, CHUNKS: tl.constexpr,
                        WRITE_PARTIALS: tl.constexpr, MT: tl.constexpr = 8):
    """`_nf4_frag_gemv_kernel` in plain Triton: the same loads and reshapes, each byte's pair looked up in the
    16 fp32 `values` by arithmetic instead of the shared table, products and sums in fp32. The interpreter runs
    it on CPU tensors."""
    TILES: tl.constexpr = BLOCK_N // 16
    pid_n = tl.program_id(0)
    u_start = tl.program_id(1) * units_per_split
    u_end = tl.minimum(u_start + units_per_split, K // (64 * CHUNKS))
    tile = tl.arange(0, TILES)
    lane = tl.arange(0, 32)
    elem = tl.arange(0, 8)
    w_ptrs = Codes + pid_n * (K * 64) + tile[:, None, None] * 256 + lane[None, :, None] * 8 + elem[None, None, :]
    xm = tl.arange(0, MT)
    xt = tl.arange(0, 4)
    xe = tl.arange(0, 16)
    x_ptrs = X + xm[:, None, None].to(tl.int64) * stride_xm + xt[None, :, None] * 16 + xe[None, None, :]
    x_mask = (xm[:, None, None] < M) & (xt[None, :, None] < 4) & (xe[None, None, :] < 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.arange(0, BLOCK_N)  # 64 r + 16 w + 8 e1 + g, stored at [w, g, r, e1]
    REPS: tl.constexpr = BLOCK_N // (16 * NUM_WARPS)
    s_ptrs = (Scales + pid_n * (K // 64 * BLOCK_N) + ((row % 64) // 16) * (16 * REPS) + (row % 8) * (REPS * 2)
              + (row // 64) * 2 + (row % 16) // 8)

    acc = tl.zeros([BLOCK_N, MT], tl.float32)
    for u in range(u_start, u_end):
        for ch in tl.static_range(CHUNKS):
            chunk = u * CHUNKS + ch
            wq = tl.load(w_ptrs + chunk * (TILES * 256)).to(tl.int32) & 0xFFFF
            wq = wq.reshape(TILES, 8, 4, 2, 2, 2).permute(0, 4, 1, 3, 2, 5).reshape(BLOCK_N, 8, 2)
            lo, hi = wq.split()
            reg = lo | (hi << 16)  # [BLOCK_N, 8]: the A fragment's 32-bit registers, column pairs (2 i, 2 i + 1)
            xv = tl.load(x_ptrs + chunk * 64, mask=x_mask, other=0.0).to(tl.float32)
            xv = xv.reshape(MT, 4, 4, 2, 2).permute(3, 1, 4, 0, 2).reshape(16, MT, 4)  # [j, m, c]
            xa, xb = xv.reshape(16, MT, 2, 2).split()
            x0, x2 = xa.split()
            x1, x3 = xb.split()
            part = tl.sum(_twin_plane(reg, 0, Values, BLOCK_N)[:, :, None] * x0[None, :, :], axis=1)
            part += tl.sum(_twin_plane(reg, 1, Values, BLOCK_N)[:, :, None] * x1[None, :, :], axis=1)
            part += tl.sum(_twin_plane(reg, 2, Values, BLOCK_N)[:, :, None] * x2[None, :, :], axis=1)
            part += tl.sum(_twin_plane(reg, 3, Values, BLOCK_N)[:, :, None] * x3[None, :, :], axis=1)
            s = tl.load(s_ptrs + chunk * BLOCK_N)
            acc = tl.fma(part, s[:, None], acc)

    offs_m = tl.arange(0, MT)
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if WRITE_PARTIALS:
        prow = (tl.program_id(1) * M + offs_m).to(tl.int64)
        tl.store(Part + prow[None, :] * N + offs_n[:, None], acc, mask=mask)
    else:
        tl.store(Out + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc.to(Out.dtype.element_ty),
                 mask=mask)


def nf4_frag_linear_ref(x: torch.Tensor, fw: Nf4FragWeight) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype: x times the kernel's fp32 weight (values[q] * absmax), in fp32,
    rounded once."""
    return F.linear(x.float(), dequantize_nf4_frag(fw, torch.float32)).to(x.dtype)


_FRAG_CACHE = "_nf4_frag"  # the attribute of an NF4Weight holding its fragment-order copy


def nf4_frag_of(w: NF4Weight) -> Nf4FragWeight:
    """`to_nf4_frag(w)`, made on first use and kept on `w` (the repack costs a pass over the weight)."""
    return derived(w, _FRAG_CACHE, lambda: to_nf4_frag(w))


def nf4_frag_eligible(x: torch.Tensor, w: NF4Weight) -> bool:
    """Whether `nf4_frag_linear` serves x @ w^T: x in the weight's dtype (bf16 or fp16), at most NF4_FRAG_MAX_M
    rows, a weight it lays out (blocksize 64, input width a multiple of 64)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return x.dtype == w.dtype and 1 <= rows <= NF4_FRAG_MAX_M and nf4_frag_supported(w)


def _prepare(x: torch.Tensor, fw: Nf4FragWeight, on_cuda: Optional[bool] = None, num_sms: Optional[int] = None,
             split: Optional[int] = None):
    """Check the arguments and build the launches: (out, [(kernel, grid, args, constexprs, num_warps), ...]).
    split: programs along K asked for instead of `int4.split_count`'s (benchmarks; still capped, none empty)."""
    if not isinstance(fw, Nf4FragWeight):
        raise TypeError(f"nf4_frag_linear: w must be an Nf4FragWeight, got {type(fw).__name__}")
    x2, out, out2 = check_rows(x, fw, "nf4_frag_linear", NF4_FRAG_MAX_M)
    (M, N), K = out2.shape, fw.shape[1]
    if M == 0:
        return out, []
    on_cuda = x.is_cuda if on_cuda is None else on_cuda
    mt = 8 if M <= 8 else 16
    # NF4 blocks a loop trip: the most that divide the input width (two with 16 columns of x: registers)
    chunks = next(c for c in TRIP_CHUNKS if (K // NF4_FRAG_K) % c == 0 and c * mt <= 32)
    plan: SplitPlan = split_plan(K // (NF4_FRAG_K * chunks), out2, NF4_FRAG_BLOCK_N, on_cuda, num_sms, split)
    grid = (fw.padded_out // NF4_FRAG_BLOCK_N, plan.split)
    constexprs = dict(BLOCK_N=NF4_FRAG_BLOCK_N, NUM_WARPS=NF4_FRAG_WARPS, CHUNKS=chunks,
                      WRITE_PARTIALS=plan.split > 1, MT=mt)
    rest = (out2, plan.part, M, N, fw.padded_out, K, x2.stride(0), out2.stride(0), plan.per_split)
    if on_cuda:  # the kernel fills its table from the pairs, the twin looks codes up in the values
        layouts = dict(SCALE_LAYOUT=_scale_layout(NF4_FRAG_WARPS, NF4_FRAG_BLOCK_N // (16 * NF4_FRAG_WARPS)),
                       X_LAYOUT=x_layout(mt, NF4_FRAG_WARPS))
        launches = [(_nf4_frag_gemv_kernel, grid, (x2, fw.codes, fw.scales, fw.pairs) + rest,
                     dict(constexprs, **layouts), NF4_FRAG_WARPS)]
    else:
        launches = [(_nf4_frag_gemv_twin, grid, (x2, fw.codes, fw.scales, fw.values) + rest, constexprs,
                     NF4_FRAG_WARPS)]
    return out, launches + plan.reduce_launches(out2)


def nf4_frag_linear(x: torch.Tensor, fw: Nf4FragWeight, *, options: KernelOptions = DEFAULT_OPTIONS,
                    split: Optional[int] = None) -> torch.Tensor:
    """x @ w^T from the fragment-order NF4 weight; contract of `nf4_frag_linear_ref`, within fp32 rounding.

    x: [..., in] in fw.dtype (bf16 or fp16), at most 16 rows (decode), unit stride in the last dim; fw: an
    Nf4FragWeight on x's device (`to_nf4_frag` / `nf4_frag_of`). Returns a new [..., out] tensor in x's dtype.
    CUDA tensors run the Gluon kernel, CPU tensors its Triton twin in the interpreter. options: PDL of the split-K
    reduce. split: programs along K instead of the heuristic's (benchmarks).
    """
    out, launches = _prepare(x, fw, split=split)
    run(x, launches, options)
    return out


# ---- ahead-of-time specialisations -----------------------------------------------------------

def aot_configs(models, dtypes=(torch.bfloat16,), rows=(1, 8, 16)) -> list[LaunchConfig]:
    """The Gluon GEMV's launches for the linears of `models` (ModelShapes), as the launcher makes them on CUDA
    (H100's SM count), typed as the JIT would type them; shapes that specialise alike share one entry,
    labelled with the first shape that needed it."""
    configs = {}
    for shape in models:
        for name, (n_out, n_in) in shape.projection_shapes().items():
            n_pad = cdiv(n_out, NF4_FRAG_BLOCK_N) * NF4_FRAG_BLOCK_N
            for dtype in dtypes:
                meta = dict(device="meta")
                blocks = n_pad // NF4_FRAG_BLOCK_N
                fw = Nf4FragWeight(codes=torch.empty(blocks, n_in // NF4_FRAG_K, NF4_FRAG_BLOCK_N // 16, 32, 8,
                                                     dtype=torch.int16, **meta),
                                   scales=torch.empty(blocks, n_in // NF4_FRAG_K, NF4_FRAG_WARPS, 8,
                                                      NF4_FRAG_BLOCK_N // (16 * NF4_FRAG_WARPS), 2, **meta),
                                   code=torch.empty(16, **meta), values=torch.empty(16, **meta),
                                   pairs=torch.empty(256, dtype=torch.int32, **meta), shape=(n_out, n_in), dtype=dtype)
                for M in rows:
                    x = torch.empty(M, n_in, dtype=dtype, **meta)
                    add_aot_config(configs, _prepare, x, fw, lambda c: (  # called at once: the loop's values
                        f"{'bf16' if dtype == torch.bfloat16 else 'fp16'} M={M} {NF4_FRAG_BLOCK_N}x"
                        f"{64 * c['CHUNKS']}{' partials' if c['WRITE_PARTIALS'] else ''} frag "
                        f"({shape.label} {name} {n_out}x{n_in})"))
    return list(configs.values())
