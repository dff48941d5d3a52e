"""The benchmark report: one command writes report.md, report.json and PNG plots into a folder.

    codellama-rt bench --report DIR [--quick] [--only NAMES] [--budget-s S]
    python bench/report.py --report DIR [...]

On a GPU: copy bandwidth, the end-to-end matrix of `codellama_rt.bench.e2e` (7B bf16 / NF4 / int4 and
34B int4: decode tokens/s at batch 1 and 8 against the bandwidth bound, TTFT for 512/2k/8k-token prompts,
peak memory; ours with and without CUDA graphs, torch.compile(reduce-overhead) of the reference graph,
transformers with a static cache), the kernel rows of `codellama_rt.bench.kernels`, and the bars of the
issue, pass / fail / unmeasured. Work is ordered by what the bars need and each unit is skipped (and
listed) once the time budget no longer fits its estimate, so the whole report fits one device call.
Without CUDA: the CPU subset (tiny and ~100M-parameter models, reference backend vs transformers).
The AOT resource table (registers, shared memory, spills) is written either way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..cli import kernel_options
from ..kernels._triton import pdl_enabled
from ..kernels.options import DEFAULT_OPTIONS, EXPERIMENTS, KernelOptions
from ..quant import model_weight_bytes
from . import e2e
from . import add_arguments, parse_only
from .common import Budget, aot_models, environment, loadavg, memory_bandwidth

DEFAULT_BUDGET_S = {True: 480.0, False: 300.0}  # CUDA / CPU

BARS = [
    # (id, text, kind, args)
    ("bf16-bound", "7B bf16 decode at batch 1 >= 85% of the bandwidth bound", "bound", ("7B-bf16", 0.85)),
    ("int4-bound", "7B int4 decode at batch 1 >= 65% of the bandwidth bound", "bound", ("7B-int4", 0.65)),
    ("bf16-vs-compile", "7B bf16 decode at batch 1 ahead of torch.compile(reduce-overhead) of the reference graph",
     "compile", ("7B-bf16",)),
    ("int4-vs-compile", "7B int4 decode at batch 1 ahead of torch.compile(reduce-overhead) of the reference graph",
     "compile", ("7B-int4",)),
    ("graphs-vs-eager", "CUDA graphs >= 1.3x eager decode at batch 1 (7B bf16)", "graphs", ("7B-bf16", 1.3)),
]

BAR_MODELS = tuple(dict.fromkeys(b[3][0] for b in BARS))  # ("7B-bf16", "7B-int4")


def run(out: Path, *, quick: bool = False, only=None, budget_s: Optional[float] = None, resources: bool = True,
        log: Callable[[str], None] = print, kernel_options: KernelOptions = DEFAULT_OPTIONS) -> dict:
    """Measure, then write report.md, report.json and the plots into `out`; returns the report dict.
    `kernel_options`: those of every row (experiment rows add their own experiments)."""
    plan = e2e.make_plan(cuda=torch.cuda.is_available(), quick=quick, only=only, kernel_options=kernel_options)
    cuda = e2e.plan_uses_gpu(plan)  # False for the CPU subset, even on a machine with a GPU
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"--budget-s={budget_s} is invalid: expected > 0")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--report {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(budget_s or DEFAULT_BUDGET_S[cuda])
    meta = environment()
    meta.update(mode="quick" if quick else "full", gpu_run=cuda, budget_s=budget.seconds, only=only,
                engine_cuda_graphs_option=e2e.engine_has_graphs(),
                pdl=cuda and pdl_enabled(torch.device("cuda"), plan.pdl), experiments=list(plan.experiments))
    report = {"meta": meta, "plan": dataclasses.asdict(plan), "bandwidth_gbps": None, "bandwidth_method": None,
              "models": [], "decode": [], "ttft": [], "kernels": [], "resources": [], "problems": [], "bars": [],
              "skipped": [], "timings": {}, "plots": []}
    device = "cuda" if cuda else "cpu"
    log(f"bench: {meta['card']}, {meta['mode']} mode, budget {budget.seconds:.0f} s, "
        f"experiments: {', '.join(meta['experiments']) or 'none'}")
    t0 = time.monotonic()
    report["bandwidth_gbps"], report["bandwidth_method"] = memory_bandwidth(device)
    report["timings"]["bandwidth"] = time.monotonic() - t0
    log(f"bandwidth {report['bandwidth_gbps']:.0f} GB/s ({report['bandwidth_method']})")
    seen = {k: 0 for k in ("decode", "ttft", "kernels")}
    for unit, estimate, fn in _units(plan, report):
        if not budget.allows(estimate):
            report["skipped"].append(dict(unit=unit, reason=f"time budget: {budget.left():.0f} s left, "
                                                           f"needs ~{estimate:.0f} s"))
            log(f"skip {unit}: time budget")
            continue
        log(f"run {unit} ({budget.left():.0f} s left)")
        t0 = time.monotonic()
        try:
            fn(budget)
        except Exception as e:  # noqa: BLE001 - one unit failing must not lose the others
            report["skipped"].append(dict(unit=unit, reason=f"failed: {e2e._reason(e)}"))
            log(f"{unit} failed: {e2e._reason(e)}")
        report["timings"][unit] = time.monotonic() - t0
        _log_new_rows(report, seen, log)
        # a call killed at its time limit still leaves every finished unit's numbers
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    # after the measurements: the table is the same with or without a GPU (CI compiles it too)
    resources_md = "Left out (--no-resources)."
    if resources and not budget.allows(plan.estimates.get("resources", 60)):
        resources_md = f"Left out: time budget ({budget.left():.0f} s left)."
        report["skipped"].append(dict(unit="aot resources", reason="time budget"))
    elif resources:
        t0 = time.monotonic()
        try:
            from ..kernels import aot

            table = aot.resource_table(aot_models())
            report["resources"] = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(vars(r))
                                   for r in table]
            report["problems"] = aot.problems(table)
            resources_md = aot.format_table(table)
        except Exception as e:  # noqa: BLE001 - e.g. no ptxas in this install
            resources_md = f"Not available: {e2e._reason(e)}"
        report["timings"]["aot_resources"] = time.monotonic() - t0

    _finish_rows(report)
    report["bars"] = evaluate_bars(report, cuda)
    report["plots"] = _plots(report, out)
    report["timings"]["total"] = budget.elapsed()
    meta["loadavg_end"] = loadavg()
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = to_markdown(report, resources_md)
    (out / "report.md").write_text(md)
    log(md.split("\n## Models")[0])  # header, bars, decode and TTFT tables
    log(f"wrote {out / 'report.md'}, {out / 'report.json'}" + "".join(f", {out / p}" for p in report["plots"]))
    return report


def _log_new_rows(report: dict, seen: dict, log: Callable[[str], None]) -> None:
    """Log the decode / TTFT / kernel rows added since the last call, one line each (token lists left out)."""
    for key in seen:
        for row in report[key][seen[key]:]:
            log(f"  {key}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.items() if not isinstance(v, (list, dict))))
        seen[key] = len(report[key])


# ---- units of work ---------------------------------------------------------------------------

def _units(plan: e2e.Plan, report: dict) -> list:
    """(name, estimated seconds, fn(budget)) in the order they run: the bars' models (BAR_MODELS, those the
    plan has), their compile peers, their experiment rows, kernels, the other models, the remaining peers.
    (The AOT resource table comes last.)"""
    est = plan.estimates
    models = list(plan.models)
    ours = [(f"ours {m}", est.get(m, 60), _ours_unit(m, plan, report)) for m in models]
    peers = []
    if plan.isolate_peers:
        peers = [(f"compile {m}", est.get("compile", 150), _peer_unit("compile", m, plan, report))
                 for m in plan.compile_models if m in models]
        peers += [(f"hf {m}", est.get("hf", 150), _peer_unit("hf", m, plan, report))
                  for m in plan.hf_models if m in models]
    kernels = [("kernels", est.get("kernels", 120), _kernels_unit(report, plan))] if plan.kernels else []
    bars = [u for u, m in zip(ours, models) if m in BAR_MODELS]
    bar_peers = [p for p in peers if p[0].startswith("compile ") and p[0].split(" ", 1)[1] in BAR_MODELS]
    rest = [p for p in peers if p not in bar_peers]
    experiments = [(f"experiments {m}", est.get("experiments", 60), _experiments_unit(m, plan, report))
                   for m in models if experiment_sets(e2e.MODELS[m], plan)]
    return bars + bar_peers + experiments + kernels + [u for u in ours if u not in bars] + rest


def _model_info(spec: e2e.ModelSpec, model=None, build_s=None) -> dict:
    args = spec.args()
    elem = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    shapes = model_weight_bytes(args, bytes_per_elem=elem, method=spec.quantize)
    emb = 0 if args.tie_word_embeddings else args.vocab_size * args.dim * elem
    info = dict(model=spec.name, device=spec.device, dtype=spec.dtype, quantize=spec.quantize,
                params=args.param_count(), weight_bytes=shapes, weights_read_per_token=shapes - emb,
                kv_bytes_per_token=args.kv_cache_bytes(1, 1, elem), elem_bytes=elem)
    if model is not None:
        from ..quant import weight_bytes

        info.update(weight_bytes_measured=weight_bytes(model.module),
                    weights_read_measured=e2e.weights_read_per_token(model.module), build_s=build_s,
                    backend=model.backend)
    return info


def _ours_unit(name: str, plan: e2e.Plan, report: dict):
    def fn(budget: Budget) -> None:
        spec = e2e.MODELS[name]
        t0 = time.monotonic()
        model = e2e.build(spec, plan.kernel_options())
        report["models"].append(_model_info(spec, model, time.monotonic() - t0))
        providers = [e2e.OURS_GRAPHS, e2e.OURS_EAGER] if spec.cuda else [e2e.OURS_EAGER]
        for batch in plan.batches:  # batch-1 rows of both providers first: the bars need them
            for provider in providers:
                report["decode"].append(e2e.ours_decode(model, spec, plan, provider, batch))
        report["ttft"] += e2e.ours_ttft(model, spec, plan)
        if not plan.isolate_peers:
            for kind, names in (("compile", plan.compile_models), ("hf", plan.hf_models)):
                if name in names:
                    _add_peer_rows(report, e2e.peer_rows(kind, model, spec, plan))
        del model
        e2e._free()
    return fn


def _experiments_unit(name: str, plan: e2e.Plan, report: dict):
    def fn(budget: Budget) -> None:
        spec = e2e.MODELS[name]
        timeout = max(30.0, min(plan.peer_timeout_s, budget.left() - 15))
        report["decode"].extend(e2e.experiment_rows_isolated(spec, plan, experiment_sets(spec, plan), timeout))
    return fn


def experiment_sets(spec: e2e.ModelSpec, plan: e2e.Plan) -> list:
    """The plan's experiment sets that get a row for `spec`: on a GPU, for the bars' models, those with an
    experiment that changes this weight format's decode (else the row would repeat the default one)."""
    if not spec.cuda or spec.name not in BAR_MODELS:
        return []
    weights = spec.quantize or "dense"
    return [names for names in plan.experiment_sets if any(weights in EXPERIMENTS[n].weights for n in names)]


def _peer_unit(kind: str, name: str, plan: e2e.Plan, report: dict):
    def fn(budget: Budget) -> None:
        spec = e2e.MODELS[name]
        timeout = max(30.0, min(plan.peer_timeout_s, budget.left() - 15))
        _add_peer_rows(report, e2e.peer_rows_isolated(kind, spec, plan, timeout))
    return fn


def _add_peer_rows(report: dict, rows: list) -> None:
    for r in rows:
        report["ttft" if "new_tokens" not in r else "decode"].append(r)


def _kernels_unit(report: dict, plan: e2e.Plan):
    def fn(budget: Budget) -> None:
        from .kernels import run_gpu

        report["kernels"] = run_gpu(bw=report["bandwidth_gbps"], options=plan.kernel_options())
    return fn


# ---- derived numbers -------------------------------------------------------------------------

def _finish_rows(report: dict) -> None:
    """Bounds beside every decode row; token agreement of each peer with ours; drop the token lists."""
    bw = report["bandwidth_gbps"]
    infos = {m["model"]: m for m in report["models"]}
    for row in report["decode"]:
        spec = e2e.MODELS[row["model"]]
        info = infos.get(row["model"]) or _model_info(spec)
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
            n = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            row["agree_with_ours"] = f"{n}/{min(len(mine), len(theirs))}"
    for row in report["decode"]:
        row.pop("tokens0", None)


def experiment_summary(report: dict) -> list:
    """Each experiment row beside its model's default batch-1 CUDA-graph row: tok/s of both, the speedup
    (None where either failed), the share of the bound and the token agreement."""
    out = []
    for r in report["decode"]:
        if not r.get("experiments"):
            continue
        base = _find(report, r["model"], e2e.OURS_GRAPHS)
        tok_s, base_tok_s = r.get("tok_s"), base.get("tok_s") if base else None
        out.append(dict(model=r["model"], experiments=r["experiments"], tok_s=tok_s, default_tok_s=base_tok_s,
                        speedup=tok_s / base_tok_s if tok_s and base_tok_s else None,
                        frac_bound=r.get("frac_bound"), agree_with_ours=r.get("agree_with_ours", "")))
    return out


def _find(report: dict, model: str, provider: str, batch: int = 1) -> Optional[dict]:
    return next((r for r in report["decode"] if r["model"] == model and r["provider"] == provider
                 and r["batch"] == batch), None)


def _ours_best(report: dict, model: str) -> Optional[dict]:
    """Our batch-1 row a user gets: CUDA graphs where measured, else eager."""
    for provider in (e2e.OURS_GRAPHS, e2e.OURS_EAGER):
        r = _find(report, model, provider)
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
            r = _ours_best(report, model)
            if r is None:
                bar["detail"] = f"no {model} batch-1 decode row"
            else:
                frac = r["frac_bound"]
                bar.update(status="pass" if frac >= args[1] else "fail", value=frac,
                           detail=f"{r['provider']}: {r['tok_s']:.1f} tok/s = {frac:.1%} of {r['bound_tok_s']:.1f}")
        elif kind == "compile":
            r, c = _ours_best(report, model), _find(report, model, e2e.COMPILE)
            if r is None or c is None or c.get("status") != "ok":
                bar["detail"] = (f"{e2e.COMPILE}: {c['status']}" if c is not None and r is not None
                                 else f"missing {model} rows")
            else:
                ratio = r["tok_s"] / c["tok_s"]
                bar.update(status="pass" if ratio > 1 else "fail", value=ratio,
                           detail=f"{r['provider']} {r['tok_s']:.1f} vs {c['tok_s']:.1f} tok/s ({ratio:.2f}x)")
        elif kind == "graphs":
            g, e = _find(report, model, e2e.OURS_GRAPHS), _find(report, model, e2e.OURS_EAGER)
            if g is None or e is None or g.get("status") != "ok" or e.get("status") != "ok":
                bar["detail"] = f"graphs: {g['status'] if g else 'missing'}; eager: {e['status'] if e else 'missing'}"
            else:
                ratio = g["tok_s"] / e["tok_s"]
                bar.update(status="pass" if ratio >= args[1] else "fail", value=ratio,
                           detail=f"{g['tok_s']:.1f} vs {e['tok_s']:.1f} tok/s ({ratio:.2f}x)")
        out.append(bar)
    return out


# ---- output ----------------------------------------------------------------------------------

def _plots(report: dict, out: Path) -> list:
    from .plots import Bar, hbar_chart

    written = []
    panels = {}
    for r in report["decode"]:
        if r.get("status") == "ok":
            panels.setdefault(r["model"], []).append(Bar(
                label=f"b{r['batch']}", value=r["tok_s"], series=r["provider"], bound=r["bound_tok_s"],
                text=f"{r['tok_s']:.1f} ({r['frac_bound']:.0%})"))
    if panels:
        hbar_chart(out / "decode_vs_bound.png", f"Decode tokens/s vs bound, {report['meta']['card']}", panels,
                   unit="tokens/s")
        written.append("decode_vs_bound.png")
    panels = {}
    for r in report["kernels"]:
        if "gbps" in r and r["kernel"] != "copy":
            panels.setdefault(r["kernel"], []).append(Bar(label=r["shape"], value=r["gbps"], series=r["provider"],
                                                          text=f"{r['gbps']:.0f}"))
    if panels:
        hbar_chart(out / "kernels_gbps.png", f"Kernel GB/s vs shape, {report['meta']['card']}", panels,
                   unit="GB/s", ref=report["bandwidth_gbps"], ref_label="copy bandwidth")
        written.append("kernels_gbps.png")
    return written


def _f(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def to_markdown(report: dict, resources_md: str) -> str:
    m = report["meta"]
    plan = report["plan"]
    lines = [
        "# codellama-rt benchmark report", "",
        f"- card: **{m['card']}**, driver {m.get('driver')}, CUDA {m.get('cuda')}",
        f"- torch {m['torch']}, triton {m.get('triton')}, transformers {m.get('transformers')}, "
        f"python {m['python']}",
        f"- commit {m.get('git_commit')} (source digest {m.get('source_digest')}), {m['date']}, {m['mode']} mode, budget {m['budget_s']:.0f} s, "
        f"took {report['timings'].get('total', 0):.0f} s",
        f"- measured bandwidth **{report['bandwidth_gbps']:.0f} GB/s** ({report['bandwidth_method']})",
        f"- Engine `cuda_graphs` option: {'present' if m.get('engine_cuda_graphs_option') else 'absent'}; "
        f"programmatic dependent launch: {'on' if m.get('pdl') else 'off'}; "
        f"experiments (--experiments): {', '.join(m.get('experiments') or []) or 'none'}; "
        f"load average {m.get('loadavg_start')} at the start, {m.get('loadavg_end')} at the end",
        "", "Random weights at the models' real shapes, greedy decoding, no stop tokens. The bound of a decode row"
        " is batch / (bytes one step reads / measured bandwidth): the weights it multiplies by (the embedding table"
        " but one row excluded) plus the KV cache at the mean context (prompt + new tokens / 2; a CUDA-graph step"
        " attends over its whole cache, prompt + new tokens long, so reads somewhat more at batch 8).", "",
        "## Bars", "", "| bar | status | measured |", "|---|---|---|",
    ]
    lines += [f"| {b['bar']} | **{b['status']}** | {b['detail']} |" for b in report["bars"]]
    lines += ["", f"## Decode ({plan['decode_prompt']}-token prompts, {plan['decode_tokens']} new tokens)", "",
              "| model | provider | batch | tok/s | bound tok/s | of bound | ms/step | peak GiB | same tokens as"
              " ours (eager) | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["decode"]:
        lines.append(f"| {r['model']} | {r['provider']} | {r['batch']} | {_f(r.get('tok_s'), '.1f')} | "
                     f"{_f(r.get('bound_tok_s'), '.1f')} | {_f(r.get('frac_bound'), '.0%')} | "
                     f"{_f(r.get('ms_per_step'), '.2f')} | {_f(r.get('peak_gib'), '.2f')} | "
                     f"{r.get('agree_with_ours', '')} | {r['status']}"
                     f"{'; ' + r['notes'] if r.get('notes') else ''} |")
    summary = experiment_summary(report)
    if summary:
        lines += ["", "## Experiments (batch 1, CUDA graphs; KernelOptions experiments)", "",
                  "Each row: a fresh engine captured with the named kernel paths on too, beside the default row.",
                  "",
                  "| model | experiments | tok/s | default tok/s | x default | of bound | same tokens as ours (eager) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['model']} | {', '.join(e['experiments'])} | {_f(e['tok_s'], '.1f')} | "
                  f"{_f(e['default_tok_s'], '.1f')} | {_f(e['speedup'], '.3f')} | {_f(e['frac_bound'], '.0%')} | "
                  f"{e['agree_with_ours']} |" for e in summary]
    lines += ["", "## Time to first token (batch 1)", "",
              "| model | provider | prompt tokens | TTFT ms | peak GiB | status |", "|---|---|---|---|---|---|"]
    for r in report["ttft"]:
        lines.append(f"| {r['model']} | {r['provider']} | {r['prompt_tokens']} | {_f(r.get('ttft_ms'), '.1f')} | "
                     f"{_f(r.get('peak_gib'), '.2f')} | {r['status']} |")
    lines += ["", "## Models", "", "| model | device | weights | parameters | weight GiB | read per token GiB | "
              "KV KiB per token | build s |", "|---|---|---|---|---|---|---|---|"]
    for i in report["models"]:
        lines.append(f"| {i['model']} | {i['device']} | {i['quantize'] or i['dtype']} | {i['params'] / 1e9:.3f} B | "
                     f"{i.get('weight_bytes_measured', i['weight_bytes']) / 2 ** 30:.2f} | "
                     f"{i['weights_read_per_token'] / 2 ** 30:.2f} | {i['kv_bytes_per_token'] / 1024:.0f} | "
                     f"{_f(i.get('build_s'), '.1f')} |")
    if report["kernels"]:
        from .kernels import to_markdown as kernels_md

        lines += ["", "## Kernels", "", kernels_md(report["kernels"])]
    if report["plots"]:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['unit']}: {s['reason']}" for s in report["skipped"]]
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())]
    lines += ["", "## AOT resources (sm_80 / sm_90)", "", resources_md]
    if report["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python bench/report.py", description=__doc__.splitlines()[0])
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        run(a.report, quick=a.quick, only=parse_only(a.only), budget_s=a.budget_s, resources=not a.no_resources,
            kernel_options=kernel_options(a))
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
