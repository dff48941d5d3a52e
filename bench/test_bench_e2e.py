"""End-to-end micro-benchmarks of the engine on random weights (`codellama_rt.bench.e2e`): a batch-1
greedy decode and a prefill to the first token. GPU: CodeLlama-7B bf16 (CUDA graphs, the default engine);
CPU: the tiny model on the reference backend. Every round is a cold prompt (no prefix-cache hit).
Rounds: --benchmark-min-rounds (default 5) after a warm-up."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.bench import e2e
from codellama_rt.bench.measure import cold_prompts
from codellama_rt.engine.sampling import SamplingParams

MODEL = "7B-bf16" if torch.cuda.is_available() else "tiny"
PROMPT, NEW = (128, 128) if torch.cuda.is_available() else (32, 16)


@pytest.fixture(scope="module")
def model():
    return e2e.build(e2e.MODELS[MODEL])


def _generate(engine, prompts, new_tokens: int) -> list:
    run = engine.run(prompts, SamplingParams(max_new_tokens=new_tokens), {})
    for _ in run:
        pass
    return run.completions[0].token_ids


def _cold(engine, prompts, new_tokens: int):
    """pytest-benchmark's `setup`: each round's prompts differ from the last round's in their first id, so
    the engine's prefix cache never serves a round (every round prefills the whole prompt)."""
    fresh = cold_prompts(engine.model.args.vocab_size)

    def setup():
        return (engine, fresh(prompts), new_tokens), {}
    return setup


def _rounds(request) -> int:
    return max(1, request.config.getoption("benchmark_min_rounds"))


@pytest.mark.parametrize("name", [MODEL])
def test_decode(benchmark, request, model, name):
    """PROMPT-token prompt, NEW new tokens; extra_info: tokens/s of the median round (prefill included)."""
    engine = e2e.make_engine(model, 1, PROMPT + NEW, None)
    prompts = e2e.random_prompts(model.args.vocab_size, 1, PROMPT, seed=1001)
    ids = benchmark.pedantic(_generate, setup=_cold(engine, prompts, NEW), rounds=_rounds(request), warmup_rounds=1)
    assert len(ids) == NEW
    benchmark.extra_info.update(model=name, prompt_tokens=PROMPT, new_tokens=NEW,
                                tok_s_median=NEW / benchmark.stats.stats.median)


@pytest.mark.parametrize("name", [MODEL])
def test_prefill(benchmark, request, model, name):
    """Time to the first token of a PROMPT * 4-token prompt."""
    n = PROMPT * 4
    engine = e2e.make_engine(model, 1, n + 1, None)
    prompts = e2e.random_prompts(model.args.vocab_size, 1, n, seed=n)
    ids = benchmark.pedantic(_generate, setup=_cold(engine, prompts, 1), rounds=_rounds(request), warmup_rounds=1)
    assert len(ids) == 1
    benchmark.extra_info.update(model=name, prompt_tokens=n)
