"""The report's output: report.md (header, bars, decode / experiment / TTFT / model / kernel tables) and
the PNG plots, from the report dict that `report.run` fills."""
from __future__ import annotations

from pathlib import Path

from ..errors import MissingExtraError
from ..plotting import require
from .derived import experiment_summary


def write_plots(report: dict, out: Path) -> list:
    """Draw the decode and kernel charts into `out`; returns the file names written. Without matplotlib
    none is drawn and report["plots_missing"] says how to get them (the tables are the report)."""
    from .plots import Bar, hbar_chart

    try:
        require("drawing PNG charts")
    except MissingExtraError as e:
        report["plots_missing"] = str(e)
        return []
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
        f"- codellama-rt {m.get('codellama_rt')}, commit {m.get('git_commit')} "
        f"(source digest {m.get('source_digest')}), {m['date']}, {m['mode']} mode, budget {m['budget_s']:.0f} s, "
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
                  "| model | experiments | tok/s | default tok/s | x default | of bound "
                  "| same tokens as ours (eager) |",
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
    elif report.get("plots_missing"):
        lines += ["", "## Plots", "", f"Not drawn: {report['plots_missing']}."]
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['unit']}: {s['reason']}" for s in report["skipped"]]
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())]
    lines += ["", "## AOT resources (sm_80 / sm_90)", "", resources_md]
    if report["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"
