"""Horizontal bar charts as PNG (matplotlib, the `plots` extra; see `codellama_rt.plotting`).

One chart type serves both report plots: a bar per row (coloured by series), an optional light bar
behind it for that row's bound, and an optional vertical reference line (e.g. the copy bandwidth).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..plotting import new_figure


@dataclass
class Bar:
    label: str
    value: float
    series: str = ""
    bound: Optional[float] = None  # drawn as a light bar behind the value
    text: str = ""                 # printed right of the bar


def hbar_chart(path, title: str, panels, *, unit: str, ref: Optional[float] = None, ref_label: str = "") -> Path:
    """Write the chart to `path` (PNG). panels: a list of Bars, or {panel title: [Bar, ...]} for panels
    stacked vertically, each with its own scale (models of very different speeds side by side).
    Raises MissingExtraError without matplotlib."""
    panels = dict(panels) if isinstance(panels, dict) else {"": list(panels)}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        raise ValueError("hbar_chart: no bars")
    path = Path(path)
    series = list(dict.fromkeys(b.series for bars in panels.values() for b in bars))
    colors = {name: f"C{i % 10}" for i, name in enumerate(series)}  # matplotlib's default colour cycle
    sizes = [len(bars) + 1.5 for bars in panels.values()]
    fig = new_figure("drawing PNG charts", figsize=(11, 1.2 + 0.3 * sum(sizes)), layout="tight")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": sizes})[:, 0]
    seen = set()  # legend entries already made

    def once(name):
        if not name or name in seen:
            return None
        seen.add(name)
        return name

    for ax, (name, bars) in zip(axes, panels.items()):
        ys = range(len(bars))
        if any(b.bound for b in bars):
            ax.barh(ys, [b.bound or 0 for b in bars], height=0.8, color="#d7d7d7", label=once("bound"))
        for i, b in enumerate(bars):
            ax.barh([i], [b.value], height=0.5, color=colors[b.series], label=once(b.series))
            if b.text:
                ax.text(max(b.value, b.bound or 0), i, " " + b.text, va="center", fontsize=7)
        if ref:
            ax.axvline(ref, color="#c81e1e", linestyle="--", linewidth=1, label=once(ref_label or "reference"))
        ax.set_yticks(list(ys), [b.label for b in bars], fontsize=7)
        top = max([b.value for b in bars] + [b.bound or 0 for b in bars] + [ref or 0])
        ax.set_xlim(0, (top or 1) * 1.2)  # room for the text right of the longest bar
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel(unit)
    fig.suptitle(title)
    fig.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=110, format="png")
    return path
