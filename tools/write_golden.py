#!/usr/bin/env python
"""Record the default model's greedy outputs for the golden regression test (tests/test_default_model.py).

    python tools/write_golden.py            # after (re)training the default model, never otherwise

Each case's greedy tokens come from the reference backend in fp32 on the CPU. The smallest gap between
the best and second-best logit along each case's path is stored with it: the test replays the cases on
the reference and the Triton backend and needs every token to match, which is only a fair demand
where no step is a near tie (cases below MIN_MARGIN are refused here).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

import codellama_rt as cl

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "default_model.json"
MIN_MARGIN = 1e-3
CASES = [
    {"kind": "generate", "prompt": "def fibonacci(n):\n", "max_new_tokens": 24},
    {"kind": "generate", "prompt": "import os\n\n\ndef read_lines(path):\n", "max_new_tokens": 24},
    {"kind": "generate", "prompt": "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n"
                                   "    def __init__(self):\n", "max_new_tokens": 24},
    {"kind": "generate", "prompt": "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
     "max_new_tokens": 24},
    {"kind": "infill", "prefix": "def remove_non_ascii(s: str) -> str:\n    \"\"\" ",
     "suffix": "\n    return result\n", "suffix_first": False, "max_new_tokens": 16},
    {"kind": "infill", "prefix": "def add(a, b):\n", "suffix": "    return c\n", "suffix_first": False,
     "max_new_tokens": 16},
    {"kind": "infill", "prefix": "def add(a, b):\n", "suffix": "    return c\n", "suffix_first": True,
     "max_new_tokens": 16},
    {"kind": "infill", "prefix": "for i in range(10):\n", "suffix": "\nprint('done')\n", "suffix_first": False,
     "max_new_tokens": 16},
]


def weights_sha256(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()


def prompt_ids(model, case: dict) -> list[int]:
    if case["kind"] == "generate":
        return model.tokenizer.encode(case["prompt"], add_bos=True)
    return model.tokenizer.encode_infill(case["prefix"], case["suffix"], suffix_first=case["suffix_first"])


def run_case(model, case: dict):
    """The Completion of one golden case (greedy)."""
    if case["kind"] == "generate":
        return model.generate(case["prompt"], max_new_tokens=case["max_new_tokens"])
    return model.infill(case["prefix"], case["suffix"], suffix_first=case["suffix_first"],
                        max_new_tokens=case["max_new_tokens"])


def min_margin(model, prompt: list[int], generated: list[int]) -> float:
    """Smallest top-1 minus top-2 logit over the generated positions (checks they are the argmax)."""
    logits = model.logits(prompt + generated)[0, len(prompt) - 1:len(prompt) - 1 + len(generated)]
    top = logits.topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == generated, "greedy tokens are not the full forward's argmax"
    return float((top.values[:, 0] - top.values[:, 1]).min())


def main() -> None:
    model_dir = cl.default_model_path()
    model = cl.load(backend="reference", dtype=torch.float32, device="cpu")
    cases = []
    for case in CASES:
        c = run_case(model, case)
        margin = min_margin(model, prompt_ids(model, case), c.token_ids) if c.token_ids else float("inf")
        print(f"{case['kind']:8} margin {margin:.4f} {c.finish_reason:6} {c.text!r}")
        if margin < MIN_MARGIN:
            print(f"  refused: a near tie (margin < {MIN_MARGIN}) would make the test flaky", file=sys.stderr)
            continue
        cases.append({**case, "token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason,
                      "min_margin": round(margin, 4)})
    GOLDEN.write_text(json.dumps({"weights_sha256": weights_sha256(model_dir), "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {GOLDEN}")


if __name__ == "__main__":
    main()
