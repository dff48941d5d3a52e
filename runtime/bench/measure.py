"""Measurement helpers shared by our rows and the peers': random-weight models and prompts, device sync
and peak memory, decode rate from token timestamps, TTFT rows, and a failure as a row's status."""
from __future__ import annotations

import gc
import itertools
import statistics
from typing import Optional

import torch

from ..api import random_model
from ..kernels.options import DEFAULT_OPTIONS, KernelOptions
from .plan import SEED, ModelSpec, Plan


class IdTokenizer:
    """Stand-in tokenizer for random weights: every id decodes to one character, so the engine streams one
    piece per token with no vocabulary behind it (the benchmark generates from token ids). A SentencePiece
    decode costs microseconds per token; this costs nothing."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.eot_id, self.step_id = 1, 2, None, None
        self.special_ids = frozenset()

    def decode_in_context(self, ids) -> str:
        return "x" * len(ids)


def build(spec: ModelSpec, kernel_options: KernelOptions = DEFAULT_OPTIONS):
    """The random-weight Model of `spec` (reference backend on the CPU, auto on CUDA) with `kernel_options`."""
    args = spec.args()
    return random_model(args, IdTokenizer(args.vocab_size), dtype=spec.dtype, device=spec.device,
                        backend="auto" if spec.cuda else "reference", quantize=spec.quantize, seed=SEED,
                        kernel_options=kernel_options)


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `length` ids in [3, vocab_size) (no bos/eos/unk), the same for every provider."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=g).tolist()


def cold_prompts(vocab_size: int):
    """A function of prompts (id lists) that gives them back with the first id changed, to a new one at each
    call (in [3, vocab_size)): a repeat of a prompt is then never served from the engine's prefix cache."""
    calls = itertools.count(1)

    def fresh(prompts: list) -> list:
        k = next(calls)
        return [[3 + (p[0] - 3 + k) % (vocab_size - 3), *p[1:]] for p in prompts]
    return fresh


def sync_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> Optional[float]:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_text(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def decode_row(spec: ModelSpec, provider: str, batch: int, plan: Plan, **extra) -> dict:
    return dict(model=spec.name, provider=provider, batch=batch, prompt_tokens=plan.decode_prompt,
                new_tokens=plan.decode_tokens, **extra)


def decode_rate(stamps: list, batch: int) -> tuple[float, float]:
    """(tokens/s over all rows, ms per step) from row 0's per-token host timestamps."""
    if len(stamps) < 2:
        raise RuntimeError(f"only {len(stamps)} token(s) generated; need >= 2 to time decode")
    dt = stamps[-1] - stamps[0]
    steps = len(stamps) - 1
    return batch * steps / dt, dt / steps * 1e3


def _median_ttft_ms(run, prompt, repeats: int) -> float:
    """Median milliseconds to the first token of `run(prompt)` (-> (t0, token stamps, ...)) after a warm-up."""
    run(prompt)
    times = []
    for _ in range(repeats):
        t0, stamps, _ = run(prompt)
        times.append((stamps[0] - t0) * 1e3)
    return statistics.median(times)


def ttft_row(model, spec: ModelSpec, plan: Plan, provider: str, backend: str, n: int, run) -> dict:
    """One TTFT row: `run(prompts, new_tokens)` (-> (t0, token stamps, ...)) on a random n-token prompt,
    batch 1, with the peak memory it reached; a failure is a row, not a crash."""
    device = model.module.device
    row = dict(model=spec.name, provider=provider, backend=backend, prompt_tokens=n)
    try:
        prompt = random_prompts(model.args.vocab_size, 1, n, seed=n)
        reset_peak(device)
        ttft = _median_ttft_ms(lambda p: run(p, 1), prompt, plan.ttft_repeats)
        row.update(status="ok", ttft_ms=ttft, peak_gib=peak_gib(device))
    except Exception as e:  # noqa: BLE001
        row.update(status=f"failed: {error_text(e)}")
    return row
