"""`codellama-rt bench`: the benchmark report (`codellama_rt.bench`)."""
from __future__ import annotations

from .common import kernel_options


def add_parser(sub, parents: list) -> None:
    b = sub.add_parser("bench", parents=parents, help="benchmark report: decode tokens/s vs the bandwidth bound, "
                       "TTFT, memory, peers, kernels (CPU: a CI-sized subset)")
    from ..bench import add_arguments

    add_arguments(b)
    b.set_defaults(run=run)


def run(a) -> None:
    from ..bench import parse_only
    from ..bench.report import run as run_report

    run_report(a.report, quick=a.quick, only=parse_only(a.only), budget_s=a.budget_s, resources=not a.no_resources,
        kernel_options=kernel_options(a))
