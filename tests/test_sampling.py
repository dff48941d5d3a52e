"""Sampling: parameter validation, logit processors vs transformers' own, and the sampler's distribution."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.engine.sampling import (SamplingParams, apply_repetition_penalty, filter_top_k_top_p,
                                   sample_next)


@pytest.mark.parametrize("name,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -1), ("top_k", -1), ("top_k", 2.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("max_new_tokens", -1), ("max_new_tokens", 1.5),
    ("stop", [""]), ("stop", [3]), ("seed", "x"),
])
def test_invalid_parameters_name_themselves(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=None).stop == ()


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    history = torch.randint(0, 50, (3, 12), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (1, 1.0), (0, 0.5), (0, 0.9), (10, 0.8), (0, 1e-6)])
def test_top_k_top_p_filter_matches_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 200, generator=g) * 2
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


def test_greedy_is_argmax_and_penalty_applies():
    logits = torch.tensor([[0.1, 3.0, 2.9], [1.0, -2.0, 0.5]])
    p = SamplingParams()
    assert sample_next(logits, p, None, None).tolist() == [1, 0]
    seen = torch.tensor([[False, True, False], [True, False, False]])
    assert sample_next(logits, SamplingParams(repetition_penalty=3.0), seen, None).tolist() == [2, 2]


def test_sampler_distribution_matches_softmax():
    """Exp(1)-race sampling draws token i with probability softmax(logits / T)_i."""
    n = 40000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).expand(n, 5).contiguous()
    params = SamplingParams(temperature=0.7, seed=0)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, params, None, g), minlength=5).double()
    expected = torch.softmax(logits[0].double() / 0.7, dim=0) * n
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 20.5, (counts, expected)  # 4 dof: p < 0.0005 of a false failure


def test_sampler_respects_top_k_and_top_p_support():
    n = 5000
    logits = torch.tensor([3.0, 2.5, 2.0, 0.0, -1.0]).expand(n, 5).contiguous()
    g = torch.Generator().manual_seed(2)
    out = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), None, g)
    assert set(out.tolist()) == {0, 1}
    probs = torch.softmax(logits[0], 0)
    top_p = (probs[0] + probs[1] * 0.5).item()  # keeps tokens 0 and 1 (mass above token 2 > top_p)
    out = sample_next(logits, SamplingParams(temperature=1.0, top_p=top_p), None, g)
    assert set(out.tolist()) == {0, 1}


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.0, seed=7)
    a = sample_next(logits, p, None, torch.Generator().manual_seed(7))
    b = sample_next(logits, p, None, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    draws = {tuple(sample_next(logits, p, None, torch.Generator().manual_seed(s)).tolist()) for s in range(8)}
    assert len(draws) > 1
