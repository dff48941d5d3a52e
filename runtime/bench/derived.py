"""Numbers derived from the measured rows: model sizes, each decode row's bound and token agreement, the
experiment summary, and the issue's bars (pass / fail / unmeasured)."""
from __future__ import annotations

from typing import Optional

import torch

from ..quant.linear import model_weight_bytes, weight_bytes
from . import e2e
from .common import shared_prefix

BARS = [
    # (id, text, kind, args)
    ("bf16-bound", "7B bf16 decode at batch 1 >= 88% of the bandwidth bound", "bound", ("7B-bf16", 0.88)),
    ("int4-bound", "7B int4 decode at batch 1 >= 70% of the bandwidth bound", "bound", ("7B-int4", 0.70)),
    ("nf4-bound", "7B NF4 decode at batch 1 >= 55% of the bandwidth bound", "bound", ("7B-nf4", 0.55)),
    ("bf16-vs-compile", "7B bf16 decode at batch 1 ahead of torch.compile(reduce-overhead) of the reference graph",
     "compile", ("7B-bf16",)),
    ("int4-vs-compile", "7B int4 decode at batch 1 ahead of torch.compile(reduce-overhead) of the reference graph",
     "compile", ("7B-int4",)),
    ("graphs-vs-eager", "CUDA graphs >= 1.3x eager decode at batch 1 (7B bf16)", "graphs", ("7B-bf16", 1.3)),
]

BAR_MODELS = tuple(dict.fromkeys(b[3][0] for b in BARS))  # ("7B-bf16", "7B-int4", "7B-nf4")


def model_info(spec: e2e.ModelSpec, model=None, build_s=None) -> dict:
    """Sizes of `spec` from its shapes (and, given the built `model`, as measured on it)."""
    args = spec.args()
    elem = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    shapes = model_weight_bytes(args, bytes_per_elem=elem, method=spec.quantize)
    emb = 0 if args.tie_word_embeddings else args.vocab_size * args.dim * elem
    info = dict(model=spec.name, device=spec.device, dtype=spec.dtype, quantize=spec.quantize,
                params=args.param_count(), weight_bytes=shapes, weights_read_per_token=shapes - emb,
                kv_bytes_per_token=args.kv_cache_bytes(1, 1, elem), elem_bytes=elem)
    if model is not None:
        info.update(weight_bytes_measured=weight_bytes(model.module),
                    weights_read_measured=e2e.weights_read_per_token(model.module), build_s=build_s,
                    backend=model.backend)
    return info


def finish_rows(report: dict) -> None:
    """Bounds beside every decode row; token agreement of each peer with ours; drop the token lists."""
    bw = report["bandwidth_gbps"]
    infos = {m["model"]: m for m in report["models"]}
    for row in report["decode"]:
        spec = e2e.MODELS[row["model"]]
        info = infos.get(row["model"]) or model_info(spec)
        context = row["prompt_tokens"] + row["new_tokens"] / 2  # mean cached tokens read per step
        step = e2e.decode_step_bytes(info["weights_read_per_token"], spec.args(), row["batch"], context,
                                     info["elem_bytes"])
        row.update(step_bytes=step, bound_tok_s=e2e.decode_bound(step, bw, row["batch"]))
        if row.get("tok_s"):
            row["frac_bound"] = row["tok_s"] / row["bound_tok_s"]
    refs = {}  # (model, batch) -> the row whose tokens the others are compared with: eager, else graphs
    for provider in (e2e.OURS_GRAPHS, e2e.OURS_EAGER):
        for r in report["decode"]:
            if r["provider"] == provider and r.get("tokens0"):
                refs[(r["model"], r["batch"])] = r
    for row in report["decode"]:
        ref = refs.get((row["model"], row["batch"]))
        mine = row.get("tokens0")
        if mine and ref is not None and ref is not row:
            theirs = ref["tokens0"]
            row["agree_with_ours"] = f"{shared_prefix(mine, theirs)}/{min(len(mine), len(theirs))}"
    for row in report["decode"]:
        row.pop("tokens0", None)


def experiment_summary(report: dict) -> list:
    """Each experiment row beside its model's default batch-1 CUDA-graph row: tok/s of both, the speedup
    (None where either failed), the share of the bound and the token agreement."""
    out = []
    for r in report["decode"]:
        if not r.get("experiments"):
            continue
        base = find_row(report, r["model"], e2e.OURS_GRAPHS)
        tok_s, base_tok_s = r.get("tok_s"), base.get("tok_s") if base else None
        out.append(dict(model=r["model"], experiments=r["experiments"], tok_s=tok_s, default_tok_s=base_tok_s,
                        speedup=tok_s / base_tok_s if tok_s and base_tok_s else None,
                        frac_bound=r.get("frac_bound"), agree_with_ours=r.get("agree_with_ours", "")))
    return out


def find_row(report: dict, model: str, provider: str, batch: int = 1) -> Optional[dict]:
    return next((r for r in report["decode"] if r["model"] == model and r["provider"] == provider
                 and r["batch"] == batch), None)


def ours_best(report: dict, model: str) -> Optional[dict]:
    """Our batch-1 row a user gets: CUDA graphs where measured, else eager."""
    for provider in (e2e.OURS_GRAPHS, e2e.OURS_EAGER):
        r = find_row(report, model, provider)
        if r is not None and r.get("status") == "ok":
            return r
    return None


def evaluate_bars(report: dict, cuda: bool) -> list:
    """Each bar of the issue: pass / fail / unmeasured, with the numbers behind it."""
    out = []
    for bar_id, text, kind, args in BARS:
        bar = dict(id=bar_id, bar=text, status="unmeasured", detail="")
        model = args[0]
        if not cuda:
            bar["detail"] = "no GPU model in this run"
        elif kind == "bound":
            r = ours_best(report, model)
            if r is None:
                bar["detail"] = f"no {model} batch-1 decode row"
            else:
                frac = r["frac_bound"]
                bar.update(status="pass" if frac >= args[1] else "fail", value=frac,
                           detail=f"{r['provider']}: {r['tok_s']:.1f} tok/s = {frac:.1%} of {r['bound_tok_s']:.1f}")
        elif kind == "compile":
            r, c = ours_best(report, model), find_row(report, model, e2e.COMPILE)
            if r is None or c is None or c.get("status") != "ok":
                bar["detail"] = (f"{e2e.COMPILE}: {c['status']}" if c is not None and r is not None
                                 else f"missing {model} rows")
            else:
                ratio = r["tok_s"] / c["tok_s"]
                bar.update(status="pass" if ratio > 1 else "fail", value=ratio,
                           detail=f"{r['provider']} {r['tok_s']:.1f} vs {c['tok_s']:.1f} tok/s ({ratio:.2f}x)")
        elif kind == "graphs":
            g, e = find_row(report, model, e2e.OURS_GRAPHS), find_row(report, model, e2e.OURS_EAGER)
            if g is None or e is None or g.get("status") != "ok" or e.get("status") != "ok":
                bar["detail"] = f"graphs: {g['status'] if g else 'missing'}; eager: {e['status'] if e else 'missing'}"
            else:
                ratio = g["tok_s"] / e["tok_s"]
                bar.update(status="pass" if ratio >= args[1] else "fail", value=ratio,
                           detail=f"{g['tok_s']:.1f} vs {e['tok_s']:.1f} tok/s ({ratio:.2f}x)")
        out.append(bar)
    return out
