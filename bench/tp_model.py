"""Tensor parallelism on paper (`codellama_rt.bench.tp_model`): weights per GPU, all-reduces per token and
the decode bounds for CodeLlama 34B and 70B at TP 1/2/4/8 on A100 and H100.

    python bench/tp_model.py [--latency-us 8]
"""
from __future__ import annotations

import argparse

from codellama_rt.bench import tp_model
from codellama_rt.model.config import ModelArgs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-us", type=float, default=tp_model.ALLREDUCE_LATENCY_US,
                   help="one small all-reduce's latency (default: %(default)s, an assumption)")
    a = p.parse_args(argv)
    for name in ("CodeLlama-34b", "CodeLlama-70b"):
        print(tp_model.table(name, tp_model.rows(ModelArgs.from_preset(name), latency_us=a.latency_us)), end="\n\n")


if __name__ == "__main__":
    main()
