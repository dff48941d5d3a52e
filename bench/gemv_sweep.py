"""Decode GEMV sweep (M = 1) at CodeLlama-7B shapes on a GPU: which kernel and tile reach the bandwidth.

    python bench/gemv_sweep.py --out DIR [--budget-s 200] [--shapes wqkv,wo,w13,w2] [--kinds attention,int4,...]

Measures, kind by kind in the order of --kinds (a budget cut drops the last), each candidate's time per
call inside a CUDA graph (no Python launch cost, as in graphed decode), cycling through enough weight
copies that none stays in L2:
  - attention: decode attention at batch 1 (7B heads) for cache lengths 256 / 1024 / 4096 and each split
    count (one split writes the output directly), for the split heuristic of short caches;
  - int4 (GPTQ layout, group 128), per 7B linear (wqkv, wo, w13, w2): `int4_linear` as shipped, the Gluon
    GEMV on the fragment-order layout (`int4_frag`) over split counts (its GB/s count its own bytes), the
    tensor-core kernel (`_int4_gemv_mma_kernel`) over tile widths, splits and warps, torch's tinygemm op
    (`_weight_int4pack_mm`) as what a CUDA library reaches, then the FMA kernel's tile grid;
  - dense bf16: cuBLAS (F.linear) and the Triton GEMV (`kernels/gemv.py`) over a grid of tiles;
  - nf4: `nf4_linear` as shipped.
Writes sweep.json (every row, with each candidate's max abs error against the reference) and prints one
line per row as it goes. bench/results/NVIDIA-H200-2026-11-26/gemv-sweep.md is a run of it (with the
experimental kernels that have since become the shipped ones); the launch tables in kernels/ come from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from codellama_rt.bench.common import clone_weight, copies_for, copy_bandwidth, graph_time_us
from codellama_rt.kernels.gemv import GemvLaunch, gemv
from codellama_rt.kernels.int4 import Int4Launch, int4_linear, int4_linear_ref, quantize_int4, split_count
from codellama_rt.kernels.int4_frag import int4_frag_linear
from codellama_rt.kernels.int4_frag_format import FRAG_BLOCK_N, to_frag
from codellama_rt.kernels.nf4 import nf4_linear, quantize_nf4

KINDS = ("attention", "int4", "dense", "nf4")
SHAPES_7B = {"wqkv": (3 * 4096, 4096), "wo": (4096, 4096), "w13": (2 * 11008, 4096), "w2": (4096, 11008)}


def dense_gemv(x, w, block_n, block_k, num_warps, num_stages=3):
    """The shipped GEMV kernel with another tile."""
    return gemv(x, w, GemvLaunch(block_n, block_k, num_warps, num_stages))


def int4_variant(x, w, block_n, split, num_warps, block_m=1):
    """`int4_linear` with another tile width / split count; block_m=16 runs one row through the tensor-core
    path (a 16-row tile, rows past 1 masked) instead of the FMA path."""
    block_k = min(128 if block_m == 1 else 64, w.group_size)
    split = split_count(w.shape[1] // block_k, w.shape[0], block_n, wanted=split)  # capped, none empty
    return int4_linear(x, w, Int4Launch("gemv", block_m, block_n, block_k, split, num_warps, num_stages=3))


def int4_mma_variant(x, w, block_n, split, num_warps, num_stages=3):
    """`int4_linear` through `_int4_gemv_mma_kernel` with another tile width / split count / warps."""
    split = split_count(w.shape[1] // 128, w.shape[0], block_n, wanted=split)  # capped, none empty
    return int4_linear(x, w, Int4Launch("gemv_mma", 16, block_n, 128, split, num_warps, num_stages))


def int4_mma_configs(N, K):
    """(block_n, split, warps): int4_launch's split for each width and twice it."""
    out = []
    for bn, warps in ((256, 4), (128, 4), (256, 8), (128, 2)):
        split = split_count(K // 128, N, bn)
        out += [(bn, split, warps), (bn, split_count(K // 128, N, bn, wanted=2 * split), warps)]
    return list(dict.fromkeys(out))


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


def dense_configs():
    out = []
    for bn, bk, warps in ((2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4),
                          (8, 512, 8), (8, 1024, 8), (16, 256, 4), (16, 256, 8), (16, 512, 8), (32, 256, 8)):
        out.append((bn, bk, warps, 3))
    out += [(8, 512, 4, 1), (4, 1024, 4, 1)]
    return out


def int4_configs(N, K):
    out = []
    for bn in (64, 128, 256):
        for warps in (2, 4, 8):
            if bn * 16 // (32 * warps) > 64:
                continue
            for split in (1, split_count(K // 128, N, bn)):  # one split, and int4_launch's count
                out.append((bn, 128, split, warps))
    return sorted(set(out))


def attention_rows(record, dev) -> None:
    """Decode attention at batch 1 with 7B heads (32 q / 32 kv, D 128): each split count at each cache length,
    one split writing the output directly (no second pass). For the split heuristic of short caches."""
    from codellama_rt.kernels.attention_decode import _launch, decode_launch

    B, H, Hkv, D = 1, 32, 32, 128
    for S in (256, 1024, 4096):
        kv_bytes = 2 * B * Hkv * S * D * 2
        copies = copies_for(kv_bytes)
        caches = [torch.randn(2, B, Hkv, S, D, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
        lengths = torch.full((B,), S, dtype=torch.long, device=dev)
        base = decode_launch(B, Hkv, S, H // Hkv, D, 2, on_cuda=True)
        for splits in sorted({1, 2, 4, 8, 16, base.num_splits}):
            if splits > S // base.block_n:
                continue
            cfg = dataclasses.replace(base, num_splits=splits)

            def run(c, cfg=cfg):
                out = torch.empty(B, H, D, device=dev, dtype=torch.bfloat16)
                mids = (out, out, out) if cfg.num_splits == 1 else (
                    torch.empty(B, H, cfg.num_splits, D, device=dev), torch.empty(B, H, cfg.num_splits, device=dev),
                    torch.empty(B, H, cfg.num_splits, device=dev))
                return _launch(q, caches[c][0], caches[c][1], lengths, cfg, out, *mids)

            tag = " (heuristic)" if splits == base.num_splits else ""
            record("attention", f"7B S={S}", f"splits {splits}{' direct' if splits == 1 else ''}{tag}",
                   kv_bytes, run, copies)
        caches = None  # frees them as `del` would; `run` reads the name, so it stays bound


def dense_rows(record, rows, name, w0, x) -> None:
    """cuBLAS and the Triton GEMV over `dense_configs` for one weight."""
    dense_bytes = w0.numel() * 2
    copies = copies_for(dense_bytes)
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


def int4_rows(record, rows, name, w0, x) -> None:
    """One weight in int4 (group 128): as shipped, the tensor-core kernel's tiles, tinygemm, then the FMA
    kernel's tile grid and the 16-row tensor-core tile (both swept before; last, for the budget)."""
    N, K = w0.shape
    q0 = quantize_int4(w0, group_size=128)
    qbytes = sum(t.numel() * t.element_size() for t in (q0.qweight, q0.qzeros, q0.scales))
    copies = copies_for(qbytes)
    qs = [q0] + [clone_weight(q0) for _ in range(copies - 1)]
    ref4 = int4_linear_ref(x, q0).float()
    record("int4", name, "shipped", qbytes, lambda c: int4_linear(x, qs[c]), copies,
           (int4_linear(x, q0).float() - ref4).abs().max().item())
    fs = [to_frag(q) for q in qs]  # the Gluon GEMV on the fragment-order layout (experiment int4_frag)
    fbytes = fs[0].codes.nbytes + fs[0].scales.nbytes
    auto = split_count(K // 128, N, FRAG_BLOCK_N)
    for split in dict.fromkeys((auto, max(1, auto // 2), 2 * auto)):
        provider = f"gluon frag split{split} ({fbytes / qbytes:.3f}x the bytes)"
        try:  # (a kernel that never ran on this GPU may fail to build: a row, not the end of the sweep)
            err = (int4_frag_linear(x, fs[0], split=split).float() - ref4).abs().max().item()
        except Exception as e:  # noqa: BLE001
            rows.append(dict(kind="int4", shape=name, provider=provider,
                             status=f"failed: {type(e).__name__}: {str(e)[:200]}"))
            print(rows[-1], flush=True)
            continue
        record("int4", name, provider, fbytes, lambda c, split=split: int4_frag_linear(x, fs[c], split=split),
               copies, err)
    fs = None  # frees the copies (the lambdas read the name)
    for bn, split, warps in int4_mma_configs(N, K):
        record("int4", name, f"triton gemv_mma {bn} split{split} w{warps}", qbytes,
               lambda c, bn=bn, split=split, warps=warps: int4_mma_variant(x, qs[c], bn, split, warps), copies,
               (int4_mma_variant(x, q0, bn, split, warps).float() - ref4).abs().max().item())
    try:
        packed, sz = tinygemm_weight(q0, x.device)
        tg = [(packed.clone(), sz.clone()) for _ in range(copies)]
        err = (torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz).float() - ref4).abs().max().item()
        record("int4", name, "torch tinygemm (_weight_int4pack_mm)", qbytes,
               lambda c: torch.ops.aten._weight_int4pack_mm(x, tg[c][0], 128, tg[c][1]), copies, err)
        tg = None  # frees the copies as `del` would; the lambda reads the name, so it stays bound
    except Exception as e:  # noqa: BLE001
        rows.append(dict(kind="int4", shape=name, provider="torch tinygemm",
                         status=f"failed: {type(e).__name__}: {str(e)[:200]}"))
        print(rows[-1], flush=True)
    for bn, bk, split, warps in int4_configs(N, K):
        record("int4", name, f"triton {bn} split{split} w{warps}", qbytes,
               lambda c, bn=bn, split=split, warps=warps: int4_variant(x, qs[c], bn, split, warps), copies,
               (int4_variant(x, q0, bn, split, warps).float() - ref4).abs().max().item())
    for bn, split, warps in ((64, 4, 4), (128, 4, 4), (128, 8, 8)):  # tensor-core tile at one row
        record("int4", name, f"triton mma16 {bn} split{split} w{warps}", qbytes,
               lambda c, bn=bn, split=split, warps=warps: int4_variant(x, qs[c], bn, split, warps, 16), copies,
               (int4_variant(x, q0, bn, split, warps, 16).float() - ref4).abs().max().item())


def nf4_rows(record, rows, name, w0, x) -> None:
    """One weight in nf4, as shipped."""
    n0 = quantize_nf4(w0)
    nbytes = sum(t.numel() * t.element_size() for t in vars(n0).values() if isinstance(t, torch.Tensor))
    copies = copies_for(nbytes)
    ns = [n0] + [clone_weight(n0) for _ in range(copies - 1)]
    record("nf4", name, "shipped", nbytes, lambda c: nf4_linear(x, ns[c]), copies)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=200.0)
    p.add_argument("--shapes", default=",".join(SHAPES_7B))
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"what to sweep, in this order (default {','.join(KINDS)})")
    a = p.parse_args(argv)
    kinds = a.kinds.split(",")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"--kinds: unknown {sorted(unknown)}; expected some of {','.join(KINDS)}")
    if not torch.cuda.is_available():
        raise SystemExit("gemv_sweep.py needs CUDA (it times kernels inside CUDA graphs)")
    a.out.mkdir(parents=True, exist_ok=True)
    t_end = time.monotonic() + a.budget_s
    dev = "cuda"
    # not timed in a graph: a captured device-to-device copy may run on a copy engine (2.7 vs 4.2 TB/s seen)
    copy_gbps = copy_bandwidth(dev)
    rows = [dict(kind="copy", gbps=copy_gbps)]
    print(f"copy {copy_gbps:.0f} GB/s ({torch.cuda.get_device_name()}, triton {triton.__version__}, "
          f"torch {torch.__version__})", flush=True)

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

    for kind in kinds:  # kind by kind, so a budget cut loses the last kinds, not the last shapes of each
        if kind == "attention":
            attention_rows(record, dev)
            continue
        for name in a.shapes.split(","):
            N, K = SHAPES_7B[name]
            g = torch.Generator(device=dev).manual_seed(0)
            w0 = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g) / K ** 0.5
            x = torch.randn(1, K, device=dev, dtype=torch.bfloat16, generator=g)
            {"dense": dense_rows, "int4": int4_rows, "nf4": nf4_rows}[kind](record, rows, name, w0, x)
            del w0
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
