"""Kernel benchmarks: Triton vs the PyTorch reference (and torch.compile of it) at CodeLlama shapes.

    python bench/kernel_rows.py --out bench/results/<card>-<date>     # on a GPU
    python bench/kernel_rows.py --out /tmp/k                          # without CUDA: resource table only
    (the full report, `python bench/report.py --report DIR`, includes these rows)

Reports GB/s (RMSNorm, rotary, decode attention, 4-bit GEMV counting packed bytes) as a fraction of the measured
device-to-device copy bandwidth, and TFLOP/s (prefill attention). Timings: triton.testing.do_bench medians with
20/80% quantiles; the decode GEMV rows are timed inside CUDA graphs (see `run_quant_gemv`). Always
writes the AOT resource table (registers, shared memory, spills).
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch

from ..kernels import aot, sass
from ..kernels.attention_decode import attention_decode, attention_decode_ref
from ..kernels.attention_prefill import attention_prefill, attention_prefill_ref
from ..kernels.gemv import gemv
from ..kernels.int4 import int4_launch, int4_linear, int4_linear_ref, quantize_int4
from ..kernels.int4_frag import int4_frag_linear
from ..kernels.int4_frag_format import to_frag
from ..kernels.nf4 import nf4_linear, nf4_linear_ref, quantize_nf4
from ..kernels.nf4_frag import nf4_frag_linear
from ..kernels.nf4_frag_format import to_nf4_frag
from ..kernels.ops import linear_nf4
from ..kernels.options import DEFAULT_OPTIONS, KernelOptions
from ..kernels.rms_norm import rms_norm, rms_norm_ref
from ..kernels.rotary import rope_tables, rotary, rotary_ref
from .common import aot_models, bench, clone_weight, copies_for, copy_bandwidth, environment, graph_time_us

SHAPES = {"7B": dict(dim=4096, heads=32, kv=32), "70B": dict(dim=8192, heads=64, kv=8)}


def providers(triton_fn, ref_fn):
    out = {"triton": triton_fn, "reference": ref_fn}
    try:
        out["torch.compile"] = torch.compile(ref_fn)
    except Exception:  # pragma: no cover - depends on the install
        pass
    return out


def run_gpu(dtype=torch.bfloat16, bw: float | None = None, options: KernelOptions = DEFAULT_OPTIONS) -> list[dict]:
    """Every kernel row; `bw`: the copy bandwidth (GB/s) when already measured; `options`: the Triton
    launchers' kernel options."""
    bw = bw or copy_bandwidth()
    rows = [dict(kernel="copy", shape="1 GiB", provider="torch", gbps=bw)]
    dev = "cuda"
    for name, s in SHAPES.items():
        tokens, dim = 16384, s["dim"]
        x = torch.randn(tokens, dim, dtype=dtype, device=dev)
        r = torch.randn_like(x)
        w = torch.randn(dim, dtype=dtype, device=dev)
        nbytes = 4 * x.numel() * x.element_size()  # read x, residual; write y, h
        for prov, fn in providers(partial(rms_norm, options=options), rms_norm_ref).items():
            ms = bench(lambda: fn(x, w, 1e-5, r))
            rows.append(dict(kernel="rms_norm", shape=f"{name} {tokens}x{dim}", provider=prov, ms=ms,
                             gbps=nbytes / ms[0] / 1e6, frac_copy=nbytes / ms[0] / 1e6 / bw))
        B, T, D = 1, 16384, 128
        q = torch.randn(B, s["heads"], T, D, dtype=dtype, device=dev)
        k = torch.randn(B, s["kv"], T, D, dtype=dtype, device=dev)
        cos, sin = rope_tables(D, T, 1e6, device=dev)
        pos = torch.arange(T, device=dev).expand(B, T)
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
        for prov, fn in providers(partial(rotary, options=options), rotary_ref).items():
            ms = bench(lambda: fn(q, k, cos, sin, pos))
            rows.append(dict(kernel="rotary", shape=f"{name} T={T}", provider=prov, ms=ms,
                             gbps=nbytes / ms[0] / 1e6, frac_copy=nbytes / ms[0] / 1e6 / bw))
        for T in (4096, 8192, 16384):
            q = torch.randn(1, s["heads"], T, D, dtype=dtype, device=dev)
            k = torch.randn(1, s["kv"], T, D, dtype=dtype, device=dev)
            v = torch.randn_like(k)
            flops = 4 * s["heads"] * T * T * D / 2  # causal
            provs = {"triton": attention_prefill}
            if T <= 4096:
                provs["reference"] = attention_prefill_ref
            for prov, fn in provs.items():
                ms = bench(lambda: fn(q, k, v, 0))
                rows.append(dict(kernel="attention_prefill", shape=f"{name} T={T}", provider=prov, ms=ms,
                                 tflops=flops / ms[0] / 1e9))
        for S in (16384, 65536, 100000):
            B = 1
            q = torch.randn(B, s["heads"], D, dtype=dtype, device=dev)
            kc = torch.randn(B, s["kv"], S, D, dtype=dtype, device=dev)
            vc = torch.randn_like(kc)
            lengths = torch.full((B,), S, dtype=torch.long, device=dev)
            nbytes = 2 * kc.numel() * kc.element_size()
            for prov, fn in providers(partial(attention_decode, options=options), attention_decode_ref).items():
                ms = bench(lambda: fn(q, kc, vc, lengths))
                rows.append(dict(kernel="attention_decode", shape=f"{name} S={S}", provider=prov, ms=ms,
                                 gbps=nbytes / ms[0] / 1e6, frac_copy=nbytes / ms[0] / 1e6 / bw))
    rows += run_quant_gemv(bw, dtype, options)
    rows += run_quant_gemm(dtype, options=options)
    return rows


def run_quant_gemv(bw: float, dtype, options: KernelOptions = DEFAULT_OPTIONS) -> list[dict]:
    """Decode GEMVs (M = 1) at 7B shapes: dense (cuBLAS vs our GEMV) and 4-bit (ours vs the reference).
    GB/s counts the weight bytes read (4-bit: packed weights and their scales/zeros). Timed inside CUDA
    graphs cycling through enough weight copies that none stays in L2, as a graphed decode step runs them
    (do_bench would time Python's launch cost for kernels this short, tens of microseconds)."""
    rows = []
    for name, (n, k) in {"7B wqkv": (3 * 4096, 4096), "7B w13": (2 * 11008, 4096), "7B w2": (4096, 11008)}.items():
        w = torch.randn(n, k, dtype=dtype, device="cuda") / k ** 0.5
        x = torch.randn(1, k, dtype=dtype, device="cuda")
        dense_bytes = w.numel() * w.element_size()
        ws = [w] + [w.clone() for _ in range(copies_for(dense_bytes) - 1)]
        for prov, fn in (("torch", torch.nn.functional.linear), ("triton", partial(gemv, options=options))):
            calls = [lambda c=c, fn=fn: fn(x, c) for c in ws]
            rows.append(_graph_row("linear (dense)", name, prov, dense_bytes, bw, calls))
        del ws
        for fmt, qw, fns in (("nf4", quantize_nf4(w), (nf4_linear, nf4_linear_ref)),
                             ("int4", quantize_int4(w, group_size=128),
                              (partial(int4_linear, options=options), int4_linear_ref))):
            nbytes = sum(t.numel() * t.element_size() for t in vars(qw).values() if isinstance(t, torch.Tensor))
            qws = [qw] + [clone_weight(qw) for _ in range(copies_for(nbytes) - 1)]
            provs = list(zip(("triton", "reference"), fns))
            if fmt == "int4" and dtype != torch.float32:  # tensor cores: not int4_launch's pick until measured
                sms = torch.cuda.get_device_properties(0).multi_processor_count
                mma = int4_launch(1, n, k, 128, dtype, num_sms=sms, kind="gemv_mma")
                provs.insert(1, ("triton gemv_mma", lambda x, w, mma=mma: int4_linear(x, w, mma, options=options)))
            for prov, fn in provs:
                calls = [lambda c=c, fn=fn: fn(x, c) for c in (qws if prov != "reference" else qws[:2])]
                rows.append(_graph_row(f"{fmt} gemv", name, prov, nbytes, bw, calls))
            frag = {("int4", torch.bfloat16): (to_frag, int4_frag_linear)}  # the Gluon GEMVs on their own layouts
            frag.update({("nf4", dt): (to_nf4_frag, nf4_frag_linear) for dt in (torch.bfloat16, torch.float16)})
            if (fmt, dtype) in frag:
                to_layout, linear = frag[fmt, dtype]
                fws = [to_layout(c) for c in qws]
                frag_bytes = fws[0].codes.nbytes + fws[0].scales.nbytes  # their own bytes
                calls = [lambda c=c, linear=linear: linear(x, c, options=options) for c in fws]
                rows.append(_graph_row(f"{fmt} gemv", name, "gluon frag", frag_bytes, bw, calls))
                del fws
            del qws
    return rows


def run_quant_gemm(dtype=torch.bfloat16, tokens: int = 512, options: KernelOptions = DEFAULT_OPTIONS) -> list[dict]:
    """Prefill projections (`tokens` rows) at 7B shapes, TFLOP/s: dense cuBLAS (the yardstick: 4-bit time to
    first token against bf16's), our fused int4 and NF4 dequant-GEMMs, and the experiments "int4_dequant_gemm" and
    "nf4_dequant_gemm" (the weight dequantized by a Triton kernel, then cuBLAS), each timed with do_bench."""
    rows = []
    dequant = KernelOptions(experiments=options.experiments | {"int4_dequant_gemm", "nf4_dequant_gemm"},
                            pdl=options.pdl)
    for name, (n, k) in {"7B wqkv": (3 * 4096, 4096), "7B w13": (2 * 11008, 4096), "7B w2": (4096, 11008)}.items():
        w = torch.randn(n, k, dtype=dtype, device="cuda") / k ** 0.5
        x = torch.randn(tokens, k, dtype=dtype, device="cuda")
        q, nf = quantize_int4(w, group_size=128), quantize_nf4(w)
        flops = 2 * tokens * n * k
        for kernel, prov, fn in (
                ("int4 gemm", "torch (dense bf16)", partial(torch.nn.functional.linear, x, w)),
                ("int4 gemm", "triton (fused int4)", partial(int4_linear, x, q, options=options)),
                ("int4 gemm", "triton dequant + cuBLAS", partial(int4_linear, x, q, options=dequant)),
                ("nf4 gemm", "triton (fused nf4)", partial(linear_nf4, x, nf, options=options)),
                ("nf4 gemm", "triton dequant + cuBLAS", partial(linear_nf4, x, nf, options=dequant))):
            try:
                ms = bench(fn)
            except Exception as e:  # noqa: BLE001 - one provider failing must not lose the other rows
                torch.cuda.synchronize()
                rows.append(dict(kernel=kernel, shape=f"{name} M={tokens}",
                                 provider=f"{prov} (failed: {type(e).__name__}: {str(e)[:80]})"))
                continue
            rows.append(dict(kernel=kernel, shape=f"{name} M={tokens}", provider=prov, ms=ms,
                             tflops=flops / ms[0] / 1e9))
        del w, q, nf
    return rows


def _graph_row(kernel: str, shape: str, provider: str, nbytes: int, bw: float, calls: list) -> dict:
    """One kernel row timed by `graph_time_us` ("ms" holds the graph time three times: no quantiles there);
    a provider that cannot be captured or fails becomes a row saying so."""
    try:
        ms = graph_time_us(calls) / 1e3
    except Exception as e:  # noqa: BLE001 - one provider failing must not lose the other rows
        torch.cuda.synchronize()
        return dict(kernel=kernel, shape=shape, provider=f"{provider} (failed: {type(e).__name__}: {str(e)[:80]})")
    return dict(kernel=kernel, shape=shape, provider=provider, ms=(ms, ms, ms), timing="cuda graph",
                gbps=nbytes / ms / 1e6, frac_copy=nbytes / ms / 1e6 / bw)


def to_markdown(rows: list[dict]) -> str:
    lines = ["| kernel | shape | provider | median ms (p20–p80) | GB/s | of copy bw | TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r.get("ms")
        ms_s = f"{ms[0]:.3f} ({ms[1]:.3f}–{ms[2]:.3f})" if ms else ""
        gbps = f"{r['gbps']:.0f}" if "gbps" in r else ""
        frac = f"{r['frac_copy']:.0%}" if "frac_copy" in r else ""
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        lines.append(f"| {r['kernel']} | {r.get('shape', '')} | {r['provider']} | {ms_s} | {gbps} | {frac} | {tf} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    table = aot.resource_table(aot_models())
    meta = environment()
    rows = []
    if torch.cuda.is_available():
        meta["device"] = torch.cuda.get_device_name()
        rows = run_gpu()
    else:
        meta["device"] = "no CUDA: speed not measured"
    report = [f"# Kernel report\n\n{json.dumps(meta)}\n", "## Speed\n", to_markdown(rows) if rows else
              "No CUDA device: speed not measured.", "\n## AOT resources (sm_80 / sm_90)\n", aot.format_table(table)]
    loops = sass.four_bit_loops(aot_models())
    report += [f"\n## {sass.TITLE}\n", sass.format_table(loops)]
    problems = aot.problems(table)
    if problems:
        report += ["\n## Problems\n"] + [f"- {p}" for p in problems]
    (a.out / "kernels.md").write_text("\n".join(report) + "\n")
    (a.out / "kernels.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "resources": [r.__dict__ for r in table],
         "four_bit_loops": [dict(r.__dict__, per_weight=r.per_weight, in_flight_kib=r.in_flight_kib) for r in loops]},
        indent=1, default=str))
    print("\n".join(report))


if __name__ == "__main__":
    main()
