"""Where a decode step's GPU time goes: each kernel's time per decode step of a random-weight model.

    python bench/profile_decode.py [--model 7B-bf16] [--tokens 32] [--out DIR] [--experiments NAMES] [--no-pdl]

Runs our greedy decode step eagerly (no CUDA graphs, so each kernel is its own profiler event; kernel durations are
the same as in a graph, launch gaps are not counted) for a short prompt, then `--tokens` greedy steps
under torch.profiler, and prints the kernels by GPU time per step (prefill left out: the profile starts
after the first token). On CPU it profiles the `tiny` model (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from codellama_rt.bench import e2e
from codellama_rt.cli.common import add_kernel_flags, kernel_options
from codellama_rt.kernels.options import DEFAULT_OPTIONS, KernelOptions
from codellama_rt.engine.decode_graph import DecodeBuffers, DecodeStep
from codellama_rt.engine.row_sampling import Stages
from codellama_rt.model.kv_cache import KVCache
from codellama_rt.model.transformer import Prefill


def profile_steps(name: str, tokens: int, options: KernelOptions = DEFAULT_OPTIONS) -> tuple[list[dict], float]:
    """([{kernel, us_per_step, calls_per_step}] by time, their total us per step) for `tokens` eager decode
    steps with the kernel `options`: GPU kernel time on CUDA, CPU self time of the ops on CPU."""
    spec = e2e.MODELS[name]
    model = e2e.build(spec, options)
    module, device = model.module, model.module.device
    cache = KVCache(model.args, 1, 64 + tokens + 8, module.dtype, device)
    buffers = DecodeBuffers(1, model.args.vocab_size, device, cache.max_seq_len - 1)
    prompt = e2e.random_prompts(model.args.vocab_size, 1, 16, seed=0)[0]
    with torch.inference_mode():
        logits = module(torch.tensor([prompt], device=device), Prefill(0, slot=0), cache)[0, -1]
    buffers.start_row(0, int(torch.argmax(logits)), len(prompt))
    # the decode step itself (not the engine, whose loop thread a CPU profile of this thread would miss)
    step = DecodeStep(module, cache, buffers, 1, Stages())
    cuda = spec.cuda
    for _ in range(4):  # warm-up: JIT compiles, scratch buffers
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(tokens):
            step()
            buffers.sampled[:1].tolist()  # the engine's one host read per step
    events = prof.key_averages()
    rows = []
    for ev in events:
        t = ev.device_time_total if cuda else ev.self_cpu_time_total
        if t <= 0 or (cuda and ev.device_type != torch.autograd.DeviceType.CUDA):
            continue
        rows.append(dict(kernel=ev.key[:110], us_per_step=t / tokens, calls_per_step=ev.count / tokens))
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    return rows, total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="a model of codellama_rt.bench.e2e.MODELS (default 7B-bf16 on CUDA, tiny on CPU)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    add_kernel_flags(p)
    a = p.parse_args(argv)
    name = a.model or ("7B-bf16" if torch.cuda.is_available() else "tiny")
    if name not in e2e.MODELS:
        raise SystemExit(f"--model {name!r}: expected one of {', '.join(e2e.MODELS)}")
    if e2e.MODELS[name].cuda and not torch.cuda.is_available():
        raise SystemExit(f"--model {name} needs CUDA")
    rows, total = profile_steps(name, a.tokens, kernel_options(a))
    print(f"{name}: {total:.0f} us of kernel time per decode step ({'GPU' if e2e.MODELS[name].cuda else 'CPU self'})")
    for r in rows[:40]:
        print(f"{r['us_per_step']:9.1f} us {r['us_per_step'] / total:6.1%} {r['calls_per_step']:6.1f}x  {r['kernel']}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"profile-{name}.json").write_text(json.dumps(dict(model=name, total_us=total, rows=rows), indent=1))


if __name__ == "__main__":
    main()
