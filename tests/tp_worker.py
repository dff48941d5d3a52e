"""One rank of a tensor-parallel test run (tests/test_tensor_parallel.py starts WORLD_SIZE of these with RANK
set): joins the group through a file (no TCP store: nothing listens beyond loopback), loads the checkpoint
split, and saves what it computed to OUT/rank<R>.pt (or the error it raised to OUT/rank<R>.err)."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

from codellama_rt.quant.linear import QuantLinear

PROMPT = "def fibonacci(n):\n    if n < 2:"


def projection_elements(module) -> int:
    """Elements of the blocks' projection weights this rank holds (a quantized one: its packed bytes x 2)."""
    total = 0
    for layer in module.layers:
        for lin in (layer.attn.wqkv, layer.attn.wo, layer.mlp.w13, layer.mlp.w2):
            if isinstance(lin, QuantLinear):
                total += sum(b.numel() * b.element_size() for b in lin.buffers()) * 2
            else:
                total += lin.weight.numel()
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", help="its directory; {rank} in it is replaced by the rank")
    p.add_argument("init")
    p.add_argument("out")
    p.add_argument("--quantize", default=None)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--exit-after-load", type=int, default=None, help="this rank exits right after loading")
    p.add_argument("--fp32-prefill", action="store_true", help="kernel_options cpu_bf16_prefill=False")
    a = p.parse_args()
    rank = int(os.environ["RANK"])
    try:
        from codellama_rt.api import load_model

        model = load_model(a.checkpoint.replace("{rank}", str(rank)), quantize=a.quantize, group_size=a.group_size,
                           tensor_parallel=True, dist_init="file://" + a.init,
                           kernel_options={"cpu_bf16_prefill": not a.fp32_prefill})
        if a.exit_after_load == rank:
            os._exit(3)
        ids = model.tokenizer.encode(PROMPT)
        result = {
            "world": model.tensor_parallel.world,
            "logits": model.logits(ids)[0],
            "greedy": model.generate(PROMPT, max_new_tokens=24).token_ids,
            "sampled": model.generate(PROMPT, max_new_tokens=16, temperature=0.9, top_k=20, seed=3).token_ids,
            "unseeded": model.generate(PROMPT, max_new_tokens=8, temperature=1.0).token_ids,
            # speculative passes chosen by each rank alone (no clock): the same on every rank, plain's tokens
            "lookup": model.generate(PROMPT * 3, max_new_tokens=24, speculate="lookup").token_ids,
            "kv_heads": model.engine.cache.data.shape[3] if model.engine.cache is not None else None,
            "projection_elements": projection_elements(model.module),
        }
        torch.save(result, os.path.join(a.out, f"rank{rank}.pt"))
    except BaseException as e:  # noqa: BLE001 - the test reads it
        with open(os.path.join(a.out, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        sys.exit(1)


if __name__ == "__main__":
    main()
