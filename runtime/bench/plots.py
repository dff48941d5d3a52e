"""Horizontal bar charts as PNG: with matplotlib when it is installed, else drawn with `codellama_rt.png`.

One chart type serves both report plots: a bar per row (coloured by series), an optional light bar
behind it for that row's bound, and an optional vertical reference line (e.g. the copy bandwidth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..png import GLYPH_H, Canvas

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BOUND_RGB, GRID_RGB, REF_RGB, TEXT_RGB = (215, 215, 215), (235, 235, 235), (200, 30, 30), (20, 20, 20)


@dataclass
class Bar:
    label: str
    value: float
    series: str = ""
    bound: Optional[float] = None  # drawn as a light bar behind the value
    text: str = ""                 # printed right of the bar


def hbar_chart(path, title: str, panels, *, unit: str, ref: Optional[float] = None,
               ref_label: str = "", backend: str = "auto") -> Path:
    """Write the chart to `path` (PNG). panels: a list of Bars, or {panel title: [Bar, ...]} for panels
    stacked vertically, each with its own scale (models of very different speeds side by side).
    backend: "auto" (matplotlib if importable), "matplotlib", "png"."""
    panels = dict(panels) if isinstance(panels, dict) else {"": list(panels)}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        raise ValueError("hbar_chart: no bars")
    path = Path(path)
    if backend in ("auto", "matplotlib"):
        try:
            return _matplotlib_chart(path, title, panels, unit=unit, ref=ref, ref_label=ref_label)
        except ImportError:
            if backend == "matplotlib":
                raise
    return _png_chart(path, title, panels, unit=unit, ref=ref, ref_label=ref_label)


def _series_colors(bars: list) -> dict:
    names = list(dict.fromkeys(b.series for b in bars))
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _nice_max(x: float) -> float:
    """The smallest 1/2/2.5/5 x 10^k >= x."""
    if x <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(x))
    return next(m * exp for m in (1, 2, 2.5, 5, 10) if m * exp >= x)


def _panel_max(bars: list, ref: Optional[float]) -> float:
    return _nice_max(max([b.value for b in bars] + [b.bound or 0 for b in bars] + [ref or 0]) * 1.02)


def _matplotlib_chart(path: Path, title, panels: dict, *, unit, ref, ref_label) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _series_colors([b for bars in panels.values() for b in bars])
    sizes = [len(bars) + 1.5 for bars in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.2 + 0.3 * sum(sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    seen = set()
    for ax, (name, bars) in zip(axes[:, 0], panels.items()):
        ys = list(range(len(bars)))
        if any(b.bound for b in bars):
            ax.barh(ys, [b.bound or 0 for b in bars], height=0.8, color="#d7d7d7",
                    label=None if "bound" in seen else "bound")
            seen.add("bound")
        for i, b in enumerate(bars):
            label = b.series if b.series and b.series not in seen else None
            seen.add(b.series)
            ax.barh([i], [b.value], height=0.5, color=[c / 255 for c in colors[b.series]], label=label)
            if b.text:
                ax.text(max(b.value, b.bound or 0), i, " " + b.text, va="center", fontsize=7)
        if ref:
            ax.axvline(ref, color="#c81e1e", linestyle="--", linewidth=1,
                       label=None if "ref" in seen else (ref_label or None))
            seen.add("ref")
        ax.set_yticks(ys, [b.label for b in bars], fontsize=7)
        ax.set_xlim(0, _panel_max(bars, ref) * 1.15)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(unit)
    fig.suptitle(title)
    fig.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _png_chart(path: Path, title, panels: dict, *, unit, ref, ref_label) -> Path:
    s = 2                                    # font scale: 10 x 14 pixel glyphs
    gh = GLYPH_H * s
    row_h, pad, bar_w = gh + 8, 12, 520
    every = [b for bars in panels.values() for b in bars]
    colors = _series_colors(every)
    label_w = max(Canvas.text_width(b.label, s) for b in every)
    text_w = max(Canvas.text_width(b.text, s) for b in every)
    legend = [(name, rgb) for name, rgb in colors.items() if name]
    if any(b.bound for b in every):
        legend.append(("bound", BOUND_RGB))
    if ref:
        legend.append((ref_label or "reference", REF_RGB))
    x0 = pad + label_w + pad                 # bar origin
    width = max(x0 + bar_w + pad + text_w + pad, pad + Canvas.text_width(title, s) + pad,
                *(pad + Canvas.text_width(n, s) + pad for n in panels))
    panel_h = {n: (gh + pad if n else 0) + len(bars) * row_h + pad // 2 + gh + pad for n, bars in panels.items()}
    top = pad + gh + pad + len(legend) * row_h + pad
    height = top + sum(panel_h.values()) + gh + pad
    c = Canvas(width, height)
    c.text(pad, pad, title, TEXT_RGB, s)
    y = pad + gh + pad
    for name, rgb in legend:
        c.rect(pad, y + 2, 6 * s, gh - 4, rgb)
        c.text(pad + 8 * s, y, name, TEXT_RGB, s)
        y += row_h
    y = top
    for name, bars in panels.items():
        if name:
            c.text(pad, y, name, TEXT_RGB, s)
            y += gh + pad
        xmax = _panel_max(bars, ref)
        scale = bar_w / xmax
        axis_y = y + len(bars) * row_h
        for k in range(5):                   # grid lines and tick labels at 0, 25, 50, 75, 100 %
            gx = x0 + round(bar_w * k / 4)
            c.rect(gx, y, 1, axis_y - y, GRID_RGB)
            tick = f"{xmax * k / 4:g}"
            c.text(gx - Canvas.text_width(tick, s) // 2, axis_y + pad // 2, tick, TEXT_RGB, s)
        for i, b in enumerate(bars):
            ry = y + i * row_h
            c.text(x0 - pad - Canvas.text_width(b.label, s), ry + 4, b.label, TEXT_RGB, s)
            if b.bound:
                c.rect(x0, ry + 1, round(b.bound * scale), row_h - 2, BOUND_RGB)
            c.rect(x0, ry + 5, max(1, round(b.value * scale)), row_h - 10, colors[b.series])
            if b.text:
                c.text(x0 + round(max(b.value, b.bound or 0) * scale) + 6, ry + 4, b.text, TEXT_RGB, s)
        c.rect(x0, y, 1, axis_y - y, TEXT_RGB)
        if ref:
            rx = x0 + round(ref * scale)
            for yy in range(y, axis_y, 8):   # dashed
                c.rect(rx, yy, 2, 4, REF_RGB)
        y = axis_y + pad // 2 + gh + pad
    c.text(x0 + bar_w // 2 - Canvas.text_width(unit, s) // 2, y, unit, TEXT_RGB, s)
    path.write_bytes(c.png())
    return path
