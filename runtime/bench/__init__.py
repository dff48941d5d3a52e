"""Benchmarks (not imported by the runtime): kernel speed (`kernels`), end-to-end decode tokens/s against
the bandwidth bound, time to first token and peak memory (`e2e`, the face of `plan`, `bound`, `measure`,
`ours`, `peers` and `child`), and the one-command report that runs them all (`report`: `codellama-rt bench
--report DIR`, `python bench/report.py`), with its derived numbers (`derived`), report.md and charts
(`render`, `plots`). Shared helpers (timing, bandwidth, environment, time budget) are in `common`; what code
ran in `provenance`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", required=True, type=Path, metavar="DIR",
                   help="output folder (report.md, report.json; PNG plots with the plots extra)")
    p.add_argument("--quick", action="store_true",
                   help="fewer models and tokens (GPU: 7B bf16 and int4, no peers or kernels; CPU: CI-sized)")
    p.add_argument("--only", action="append", default=None, metavar="NAMES",
                   help="comma-separated models to run (7B-bf16, 7B-nf4, 7B-int4, 34B-int4 on a GPU; tiny, 100M "
                   "anywhere) and/or 'kernels'; repeatable")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock seconds for the whole report (default: 480 on a GPU, 300 on the CPU)")
    p.add_argument("--no-resources", action="store_true",
                   help="leave out the AOT resource table (about 30 s of compiling on a cold Triton cache)")
    from ..cli.common import add_kernel_flags

    add_kernel_flags(p)  # the kernel options of every row (experiment rows add their own experiments)


def parse_only(values) -> Optional[list]:
    if not values:
        return None
    names = [n for v in values for n in v.split(",") if n.strip()]
    if not names:
        raise ValueError("--only: no names given")
    return names
