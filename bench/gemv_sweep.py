"""Decode GEMV sweep (M = 1) at CodeLlama-7B shapes on a GPU: which kernel and tile reach the bandwidth.

    python bench/gemv_sweep.py --out DIR [--budget-s 200]

The first GPU report (bench/results/NVIDIA-H200-2026-11-26) showed batch-1 decode bound by its linears:
cuBLAS reaches 58-76% of copy bandwidth at M = 1, the int4/NF4 kernels a few percent. This measures,
per 7B linear (wqkv, wo, w13, w2), each candidate's time per call inside a CUDA graph (no Python launch
cost, as in decode) cycling through enough weight copies that none stays in L2:
  - dense bf16: cuBLAS (F.linear) and a Triton GEMV over a grid of tiles (`_dense_gemv_kernel` here);
  - int4 (GPTQ layout, group 128): the shipped kernel, its tile/split variants, a variant that converts
    nibbles with the 2**23 float trick and applies scale and zero once per tile (`_int4_gemv_v2_kernel`),
    and torch's tinygemm op (`_weight_int4pack_mm`) as what a CUDA library reaches;
  - nf4: the shipped kernel.
Writes sweep.json (every row) and prints one line per row as it goes. Candidates here are experiments:
the winners move into kernels/ with their tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from codellama_rt.kernels._triton import kernel
from codellama_rt.kernels import int4 as int4_mod
from codellama_rt.kernels.int4 import int4_linear, int4_linear_ref, quantize_int4
from codellama_rt.kernels.nf4 import nf4_linear, quantize_nf4

SHAPES_7B = {"wqkv": (3 * 4096, 4096), "wo": (4096, 4096), "w13": (2 * 11008, 4096), "w2": (4096, 11008)}
L2_FLUSH_BYTES = 512 << 20  # weight copies cycled per shape: several times any card's L2


@kernel
def _dense_gemv_kernel(X, W, Out, N, K, stride_wn,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """out[n] = sum_k W[n, k] * x[k] (fp32 sums); one program per BLOCK_N rows of W, walking K."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(X + k0 + offs_k)
        else:
            k_mask = k0 + offs_k < K
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(X + k0 + offs_k, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(Out + offs_n, tl.sum(acc, 1).to(Out.dtype.element_ty), mask=n_mask)


def dense_gemv(x, w, block_n, block_k, num_warps, num_stages=3):
    N, K = w.shape
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    _dense_gemv_kernel.on(x)[(triton.cdiv(N, block_n),)](
        x, w, out, N, K, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
        num_warps=num_warps, num_stages=num_stages)
    return out


@kernel(do_not_specialize=["k_per_split"])
def _int4_gemv_v2_kernel(X, QW, QZ, S, Out, Part, N, K, k_per_split,
                         GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         WRITE_PARTIALS: tl.constexpr):
    """M = 1 int4 GEMV: nibble q -> float(2**23 + q) by OR-ing into the exponent bits (no int->float
    conversion), minus (2**23 + zero) gives q - zero exactly; scale applied once per K tile."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_K // 8)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    qw_ptrs = QW + offs_r[:, None] * N + offs_n[None, :]
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        g = k0 // GROUP_SIZE
        qw = tl.load(qw_ptrs + (k0 // 8) * N, mask=n_mask[None, :], other=0, eviction_policy="evict_first")
        scale = tl.load(S + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zword = tl.load(QZ + g * (N // 8) + offs_n // 8, mask=n_mask, other=0)
        zmagic = (((zword >> ((offs_n % 8) * 4)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
        part = tl.zeros([BLOCK_K // 8, BLOCK_N], tl.float32)
        for j in tl.static_range(8):
            x = tl.load(X + k0 + offs_r * 8 + j).to(tl.float32)
            q = (((qw >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            part += (q - zmagic[None, :]) * x[:, None]
        acc += part * scale[None, :]
    y = tl.sum(acc, 0)
    if WRITE_PARTIALS:
        tl.store(Part + pid_k * N + offs_n, y, mask=n_mask)
    else:
        tl.store(Out + offs_n, y.to(Out.dtype.element_ty), mask=n_mask)


def int4_gemv_v2(x, w, block_n, block_k, split, num_warps, num_stages=3):
    N, K = w.shape
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    tiles = K // block_k
    k_per_split = triton.cdiv(tiles, split) * block_k
    split = triton.cdiv(K, k_per_split)
    part = torch.empty(split, 1, N, dtype=torch.float32, device=x.device) if split > 1 else out
    _int4_gemv_v2_kernel.on(x)[(triton.cdiv(N, block_n), split)](
        x, w.qweight, w.qzeros, w.scales, out, part, N, K, k_per_split, GROUP_SIZE=w.group_size,
        BLOCK_N=block_n, BLOCK_K=block_k, WRITE_PARTIALS=split > 1, num_warps=num_warps, num_stages=num_stages)
    if split > 1:
        block = min(1024, triton.next_power_of_2(N))
        int4_mod._int4_splitk_reduce_kernel.on(x)[(1, triton.cdiv(N, block))](
            part, out, 1, N, out.stride(0), split, BLOCK=block, num_warps=4)
    return out


def int4_shipped_variant(x, w, block_n, split, num_warps):
    """The shipped `_int4_gemv_kernel` (M = 1 path) with another tile width / split count."""
    N, K = w.shape
    block_k = min(128, w.group_size)
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    tiles = K // block_k
    k_per_split = triton.cdiv(tiles, split) * block_k
    split = triton.cdiv(K, k_per_split)
    part = torch.empty(split, 1, N, dtype=torch.float32, device=x.device) if split > 1 else out
    int4_mod._int4_gemv_kernel.on(x)[(triton.cdiv(N, block_n), split)](
        x, w.qweight, w.qzeros, w.scales, out, part, 1, N, K, x.stride(0), out.stride(0), k_per_split,
        GROUP_SIZE=w.group_size, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, WRITE_PARTIALS=split > 1,
        FP32_DOT=False, UPCAST_DOT=False, num_warps=num_warps, num_stages=3)
    if split > 1:
        block = min(1024, triton.next_power_of_2(N))
        int4_mod._int4_splitk_reduce_kernel.on(x)[(1, triton.cdiv(N, block))](
            part, out, 1, N, out.stride(0), split, BLOCK=block, num_warps=4)
    return out


def tinygemm_weight(w_int4, device):
    """torch's int4pack layout of an Int4Weight: (packed, scales_and_zeros); dequant there is
    (q - 8) * scale + zero, so zero = (8 - z) * scale reproduces (q - z) * scale."""
    q, z = w_int4.unpack()  # [N, K] uint8, [K/g, N]
    packed = (q[:, ::2].to(torch.int32) << 4 | q[:, 1::2].to(torch.int32)).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed.to(device), 8)
    s = w_int4.scales.float()
    zeros = (8 - z.float()) * s
    sz = torch.stack([s, zeros], dim=-1).to(torch.bfloat16).contiguous().to(device)  # [K/g, N, 2]
    return packed, sz


def _clone(w):
    """A copy of a quantized-weight dataclass with its own tensors (another place in memory)."""
    return dataclasses.replace(w, **{f.name: getattr(w, f.name).clone() for f in dataclasses.fields(w)
                                     if isinstance(getattr(w, f.name), torch.Tensor)})


def graph_time_us(calls: list, reps: int = 4) -> float:
    """Microseconds per call: all `calls` captured `reps` times in one CUDA graph, replayed 5 times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in calls:
                f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps * len(calls))


def dense_configs():
    out = []
    for bn, bk, warps in ((2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4),
                          (8, 512, 8), (8, 1024, 8), (16, 256, 4), (16, 256, 8), (16, 512, 8), (32, 256, 8)):
        out.append((bn, bk, warps, 3))
    out += [(8, 512, 4, 1), (4, 1024, 4, 1)]
    return out


def int4_v2_configs(N, K):
    out = []
    for bn in (64, 128, 256):
        for warps in (2, 4, 8):
            if bn * 16 // (32 * warps) > 64:
                continue
            for split in (1, max(1, min(16, math.ceil(4 * 132 / math.ceil(N / bn))))):
                out.append((bn, 128, split, warps))
    return sorted(set(out))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=200.0)
    p.add_argument("--shapes", default=",".join(SHAPES_7B))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t_end = time.monotonic() + a.budget_s
    dev = "cuda"
    bw_src = torch.empty(2 ** 28, dtype=torch.float32, device=dev)
    bw_dst = torch.empty_like(bw_src)
    copy_us = graph_time_us([lambda: bw_dst.copy_(bw_src)], reps=8)
    copy_gbps = 2 * bw_src.numel() * 4 / copy_us / 1e3
    rows = [dict(kind="copy", gbps=copy_gbps)]
    print(f"copy {copy_gbps:.0f} GB/s ({torch.cuda.get_device_name()}, triton {triton.__version__}, "
          f"torch {torch.__version__})", flush=True)
    del bw_src, bw_dst

    def record(kind, shape, provider, nbytes, fn_of_copy, copies, err=None):
        if time.monotonic() > t_end:
            rows.append(dict(kind=kind, shape=shape, provider=provider, status="skipped: budget"))
            return
        try:
            us = graph_time_us([(lambda c=c: fn_of_copy(c)) for c in range(copies)])
            row = dict(kind=kind, shape=shape, provider=provider, us=us, gbps=nbytes / us / 1e3,
                       frac_copy=nbytes / us / 1e3 / copy_gbps, max_abs_err=err, status="ok")
        except Exception as e:  # noqa: BLE001 - one candidate failing must not stop the sweep
            row = dict(kind=kind, shape=shape, provider=provider, status=f"failed: {type(e).__name__}: "
                                                                         f"{' '.join(str(e).split())[:200]}")
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        (a.out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")

    for name in a.shapes.split(","):
        N, K = SHAPES_7B[name]
        g = torch.Generator(device=dev).manual_seed(0)
        w0 = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g) / K ** 0.5
        x = torch.randn(1, K, device=dev, dtype=torch.bfloat16, generator=g)
        # dense
        dense_bytes = w0.numel() * 2
        copies = max(2, math.ceil(L2_FLUSH_BYTES / dense_bytes))
        ws = [w0] + [w0.clone() for _ in range(copies - 1)]
        ref = F.linear(x, w0).float()
        record("dense", name, "cublas", dense_bytes, lambda c: F.linear(x, ws[c]), copies)
        for bn, bk, warps, stages in dense_configs():
            try:
                err = (dense_gemv(x, w0, bn, bk, warps, stages).float() - ref).abs().max().item()
            except Exception as e:  # noqa: BLE001
                rows.append(dict(kind="dense", shape=name, provider=f"triton {bn}x{bk} w{warps} s{stages}",
                                 status=f"failed: {type(e).__name__}: {str(e)[:200]}"))
                continue
            record("dense", name, f"triton {bn}x{bk} w{warps} s{stages}", dense_bytes,
                   lambda c, bn=bn, bk=bk, warps=warps, stages=stages: dense_gemv(x, ws[c], bn, bk, warps, stages),
                   copies, err)
        del ws
        # int4
        q0 = quantize_int4(w0, group_size=128)
        qbytes = sum(t.numel() * t.element_size() for t in (q0.qweight, q0.qzeros, q0.scales))
        copies = max(2, math.ceil(L2_FLUSH_BYTES / qbytes))
        qs = [q0] + [_clone(q0) for _ in range(copies - 1)]
        ref4 = int4_linear_ref(x, q0).float()
        record("int4", name, "shipped", qbytes, lambda c: int4_linear(x, qs[c]), copies,
               (int4_linear(x, q0).float() - ref4).abs().max().item())
        for bn, split, warps in ((64, 1, 4), (128, 1, 4), (128, 4, 4), (32, 1, 2), (64, 8, 4)):
            record("int4", name, f"shipped-kernel {bn} split{split} w{warps}", qbytes,
                   lambda c, bn=bn, split=split, warps=warps: int4_shipped_variant(x, qs[c], bn, split, warps), copies,
                   (int4_shipped_variant(x, q0, bn, split, warps).float() - ref4).abs().max().item())
        for bn, bk, split, warps in int4_v2_configs(N, K):
            try:
                err = (int4_gemv_v2(x, q0, bn, bk, split, warps).float() - ref4).abs().max().item()
            except Exception as e:  # noqa: BLE001
                rows.append(dict(kind="int4", shape=name, provider=f"v2 {bn} split{split} w{warps}",
                                 status=f"failed: {type(e).__name__}: {str(e)[:200]}"))
                continue
            record("int4", name, f"v2 {bn} split{split} w{warps}", qbytes,
                   lambda c, bn=bn, bk=bk, split=split, warps=warps: int4_gemv_v2(x, qs[c], bn, bk, split, warps),
                   copies, err)
        try:
            packed, sz = tinygemm_weight(q0, dev)
            tg = [(packed.clone(), sz.clone()) for _ in range(copies)]
            err = (torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz).float() - ref4).abs().max().item()
            record("int4", name, "torch tinygemm (_weight_int4pack_mm)", qbytes,
                   lambda c: torch.ops.aten._weight_int4pack_mm(x, tg[c][0], 128, tg[c][1]), copies, err)
            del tg
        except Exception as e:  # noqa: BLE001
            rows.append(dict(kind="int4", shape=name, provider="torch tinygemm",
                             status=f"failed: {type(e).__name__}: {str(e)[:200]}"))
            print(rows[-1], flush=True)
        del qs
        # nf4 (shipped)
        n0 = quantize_nf4(w0)
        nbytes = sum(t.numel() * t.element_size() for t in vars(n0).values() if isinstance(t, torch.Tensor))
        copies = max(2, math.ceil(L2_FLUSH_BYTES / nbytes))
        ns = [n0] + [_clone(n0) for _ in range(copies - 1)]
        record("nf4", name, "shipped", nbytes, lambda c: nf4_linear(x, ns[c]), copies)
        del ns, w0
        torch.cuda.empty_cache()
    (a.out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    best = {}
    for r in rows:
        if r.get("status") == "ok" and "shape" in r:
            k = (r["kind"], r["shape"])
            if k not in best or r["us"] < best[k]["us"]:
                best[k] = r
    for (kind, shape), r in sorted(best.items()):
        print(f"best {kind} {shape}: {r['provider']} {r['us']:.1f} us, {r['frac_copy']:.0%} of copy", flush=True)


if __name__ == "__main__":
    main()
