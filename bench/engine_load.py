"""The serving engine's batching and prefix reuse in process (no HTTP): issue 18's speed bars where the
server's extra is not installed (the GPU image) or its overhead would blur the engine's numbers.

    python bench/engine_load.py [--model NAME] [--requests 8] [--max-tokens 128] [--prompt-tokens 32]
                                [--prefix-tokens 800] [--samples 3] [--out FILE]

--model: `default` (the embedded default model, real weights) or a random-weight model of
codellama_rt.bench.e2e.MODELS (7B-bf16, tiny, ...); default: 7B-bf16 on CUDA, `default` on CPU.

- concurrency: `--requests` greedy requests of `--max-tokens` tokens each (no stop tokens: every request
  runs its full length), one after another, then all at once on a second set of prompts (so neither set
  reuses the other's cached prefix); wall times and sequential / concurrent. Bars: >= 2x on CPU with the
  default model, >= 5x on a GPU at 7B.
- prefix: time to the first token of a `--prefix-tokens` prompt never seen (cold), and of the same prefix
  with another short tail after one request with it (warm); medians of `--samples`. Bar: cold / warm >= 3x.

A warm-up (a concurrent and a single request) runs first, so CUDA graph captures and Triton compiles are
not timed. JSON to stdout or --out; a short table to stderr.
"""
from __future__ import annotations

import argparse
import statistics
import queue
import sys
import time
from pathlib import Path

import torch

import codellama_rt as cl
from codellama_rt.bench import e2e
from codellama_rt.bench.common import emit_json, environment, loadavg
from codellama_rt.engine.events import Completion
from codellama_rt.engine.sampling import SamplingParams

TAIL = 8  # tokens after the shared prefix in the prefix scenario


def bars(cuda: bool) -> dict:
    return {"concurrency_ratio": 5.0 if cuda else 2.0, "prefix_ttft_ratio": 3.0}


def load_model(name: str):
    """(model, description): the embedded default model, or a random-weight model of e2e.MODELS."""
    if name == "default":
        return cl.load(max_batch_size=1), "the embedded default model"
    if name not in e2e.MODELS:
        raise SystemExit(f"--model {name!r}: expected default or one of {', '.join(e2e.MODELS)}")
    spec = e2e.MODELS[name]
    if spec.cuda and not torch.cuda.is_available():
        raise SystemExit(f"--model {name} needs CUDA; this machine has none (use --model default or tiny)")
    return e2e.build(spec), f"{name} (random weights)"


def run_all(engine, prompts: list, max_tokens: int) -> list:
    """Run `prompts` as concurrent requests (one Run: submitted together); each one's generated ids."""
    run = engine.run(prompts, SamplingParams(max_new_tokens=max_tokens), {})
    for _ in run:
        pass
    return [c.token_ids for c in run.completions]


def first_token_seconds(engine, prompt: list) -> float:
    """Seconds from submitting `prompt` (greedy, one new token) to its first event, driven on this thread
    (as the library does)."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    t0 = time.perf_counter()
    engine.submit(prompt, SamplingParams(max_new_tokens=1), {}, sink=events.put, background=False)
    first = None
    while True:
        event = engine.next_event(events)
        first = first or time.perf_counter()
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Completion):
            return first - t0


def prompts_of(vocab: int, n: int, length: int, seed: int) -> list:
    return e2e.random_prompts(vocab, n, length, seed=seed)


def concurrency(engine, vocab: int, n: int, length: int, max_tokens: int) -> dict:
    run_all(engine, prompts_of(vocab, n, length, 1), max_tokens)  # warm-up: every batch size's step
    run_all(engine, prompts_of(vocab, 1, length, 2), max_tokens)
    sequential, concurrent = prompts_of(vocab, n, length, 3), prompts_of(vocab, n, length, 4)
    t0 = time.perf_counter()
    seq_ids = [run_all(engine, [p], max_tokens)[0] for p in sequential]
    t1 = time.perf_counter()
    conc_ids = run_all(engine, concurrent, max_tokens)
    t2 = time.perf_counter()
    tokens_seq, tokens_conc = sum(map(len, seq_ids)), sum(map(len, conc_ids))
    return {"requests": n, "prompt_tokens": length, "max_tokens": max_tokens, "sequential_s": t1 - t0,
            "concurrent_s": t2 - t1, "ratio": (t1 - t0) / (t2 - t1), "tokens_sequential": tokens_seq,
            "tokens_concurrent": tokens_conc, "tok_s_sequential": tokens_seq / (t1 - t0),
            "tok_s_concurrent": tokens_conc / (t2 - t1)}


def prefix(engine, vocab: int, tokens: int, samples: int) -> dict:
    first_token_seconds(engine, prompts_of(vocab, 1, tokens + TAIL, 10)[0])  # warm-up: prefill shapes
    cold = [first_token_seconds(engine, p) for p in prompts_of(vocab, samples, tokens + TAIL, 11)]
    shared = prompts_of(vocab, 1, tokens, 12)[0]
    tails = prompts_of(vocab, samples + 1, TAIL, 13)
    before = engine.metrics.snapshot()["prefix_reused_tokens"]
    first_token_seconds(engine, shared + tails[0])  # the shared prefix's first (cold) request
    warm = [first_token_seconds(engine, shared + t) for t in tails[1:]]
    reused = engine.metrics.snapshot()["prefix_reused_tokens"] - before
    c, w = statistics.median(cold), statistics.median(warm)
    return {"prefix_tokens": tokens, "tail_tokens": TAIL, "samples": samples, "ttft_cold_s": cold,
            "ttft_warm_s": warm, "ttft_cold_median_s": c, "ttft_warm_median_s": w, "ratio": c / w,
            "prefix_reused_tokens": reused}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default, or a model of codellama_rt.bench.e2e.MODELS")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="default: 128 on CUDA, 64 on CPU")
    p.add_argument("--prompt-tokens", type=int, default=32, help="concurrency: prompt length (default 32)")
    p.add_argument("--prefix-tokens", type=int, default=800)
    p.add_argument("--samples", type=int, default=3, help="prefix: cold and warm requests each (default 3)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    for name in ("requests", "max_tokens", "prompt_tokens", "prefix_tokens", "samples"):
        value = getattr(a, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    cuda = torch.cuda.is_available()
    name = a.model or ("7B-bf16" if cuda else "default")
    max_tokens = a.max_tokens or (128 if cuda else 64)
    model, what = load_model(name)
    need = max(a.prompt_tokens + max_tokens, a.prefix_tokens + TAIL + 1)
    if need > model.max_seq_len:
        raise SystemExit(f"{what} has a context of {model.max_seq_len} tokens; the runs need {need}")
    engine = e2e.make_engine(model, max(a.requests, 2), need, None)
    vocab = min(model.args.vocab_size, getattr(model.tokenizer, "vocab_size", model.args.vocab_size))
    doc = {"meta": {**environment(), "model": what, "device": str(model.module.device),
                    "cuda_graphs": engine.cuda_graphs, "options": {k: str(v) for k, v in vars(a).items()}}}
    doc["concurrency"] = concurrency(engine, vocab, a.requests, a.prompt_tokens, max_tokens)
    doc["prefix"] = prefix(engine, vocab, a.prefix_tokens, a.samples)
    doc["meta"].update(loadavg_end=loadavg(), graph_captures=engine.captures)
    want = bars(model.module.device.type == "cuda")
    doc["bars"] = {k: {"value": doc[s]["ratio"], "bar": want[k], "met": doc[s]["ratio"] >= want[k]}
                   for k, s in (("concurrency_ratio", "concurrency"), ("prefix_ttft_ratio", "prefix"))}
    emit_json(doc, a.out)
    c, p = doc["concurrency"], doc["prefix"]
    print(f"{what} on {doc['meta']['device']}: {c['requests']} x {c['max_tokens']} tokens sequential "
          f"{c['sequential_s']:.2f} s, concurrent {c['concurrent_s']:.2f} s: {c['ratio']:.2f}x (bar "
          f"{want['concurrency_ratio']}x); TTFT of a {p['prefix_tokens']}-token prefix cold "
          f"{p['ttft_cold_median_s'] * 1e3:.1f} ms, warm {p['ttft_warm_median_s'] * 1e3:.1f} ms: {p['ratio']:.2f}x "
          f"(bar {want['prefix_ttft_ratio']}x)", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
