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

from ..cli.common import kernel_options
from ..kernels._triton import pdl_enabled
from ..kernels.options import DEFAULT_OPTIONS, EXPERIMENTS, KernelOptions
from . import add_arguments, e2e, parse_only
from .common import Budget, aot_models, environment, loadavg, memory_bandwidth
from .derived import BAR_MODELS, BARS, evaluate_bars, experiment_summary, finish_rows, model_info  # noqa: F401
from .render import to_markdown, write_plots

DEFAULT_BUDGET_S = {True: 480.0, False: 300.0}  # CUDA / CPU


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
              "skipped": [], "timings": {}, "plots": [], "plots_missing": None}
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
            report["skipped"].append(dict(unit=unit, reason=f"failed: {e2e.error_text(e)}"))
            log(f"{unit} failed: {e2e.error_text(e)}")
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
            from ..kernels import sass

            loops = sass.four_bit_loops(aot_models())
            report["four_bit_loops"] = [dict(dataclasses.asdict(r), per_weight=r.per_weight,
                                             in_flight_kib=r.in_flight_kib) for r in loops]
            resources_md = f"{aot.format_table(table)}\n\n### {sass.TITLE}\n\n{sass.format_table(loops)}"
        except Exception as e:  # noqa: BLE001 - e.g. no ptxas in this install
            resources_md = f"Not available: {e2e.error_text(e)}"
        report["timings"]["aot_resources"] = time.monotonic() - t0

    finish_rows(report)
    report["bars"] = evaluate_bars(report, cuda)
    report["plots"] = write_plots(report, out)
    if report["plots_missing"]:
        log(f"plots not drawn: {report['plots_missing']}")
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
    """(name, estimated seconds, fn(budget)) in the order they run: kernels, the bars' models (BAR_MODELS, those
    the plan has), their experiment rows, the bars' compile peers, the other models, the remaining peers (the
    kernel and experiment rows decide which paths become the default, the kernel rows at the least cost, so
    they come before the peers, whose rows change only with torch). (The AOT resource table comes last.)"""
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
    return kernels + bars + experiments + bar_peers + [u for u in ours if u not in bars] + rest


def _ours_unit(name: str, plan: e2e.Plan, report: dict):
    def fn(budget: Budget) -> None:
        spec = e2e.MODELS[name]
        t0 = time.monotonic()
        model = e2e.build(spec, plan.kernel_options())
        report["models"].append(model_info(spec, model, time.monotonic() - t0))
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
        e2e.free_memory()
    return fn


def _experiments_unit(name: str, plan: e2e.Plan, report: dict):
    def fn(budget: Budget) -> None:
        spec = e2e.MODELS[name]
        timeout = max(30.0, min(plan.peer_timeout_s, budget.left() - 15))
        _add_peer_rows(report, e2e.experiment_rows_isolated(spec, plan, experiment_sets(spec, plan), timeout))
    return fn


def experiment_sets(spec: e2e.ModelSpec, plan: e2e.Plan) -> list:
    """The plan's experiment sets that get rows for `spec`: on a GPU, for the bars' models, those with an
    experiment that changes this weight format's decode or prefill (else the rows would repeat the default
    ones); a quantized model only those with an experiment particular to its format (one that also changes the
    dense model, attention say, is measured there)."""
    if not spec.cuda or spec.name not in BAR_MODELS:
        return []
    weights = spec.quantize or "dense"

    def measured_here(name: str) -> bool:
        e = EXPERIMENTS[name]
        return weights in e.weights + e.prefill and (weights == "dense" or "dense" not in e.weights)

    return [names for names in plan.experiment_sets if any(measured_here(n) for n in names)]


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

