"""Per-row sampling of a continuous batch (`codellama_rt.engine.row_sampling`): the counter-based noise,
`sample_rows` against softmax, argmax and hand-written filters, row independence, non-finite rows, the
vocabulary limit, logprobs and the counters; also `Stages.of` and `RowSampling`'s row values."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.engine.row_sampling import (LOGPROB_WIDTH, NONFINITE, TOP_P_OFF, RowSampling, RowView, Stages,
                                              _filter, counter_noise, sample_rows)
from codellama_rt.engine.sampling import SamplingParams, apply_repetition_penalty
from codellama_rt.engine.sampling import seed_as_int64 as _as_int64

ALL = Stages(penalty=True, sampled=True, filter=True, logprobs=True)


def chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    counts, expected = counts.double(), expected.double()
    return float((((counts - expected) ** 2) / expected).sum())


def rows_of(params: list, V: int, seeds=None, prompts=None) -> RowSampling:
    """A RowSampling whose row b holds params[b], seed seeds[b] (default 1000 + b), prompt prompts[b]."""
    rs = RowSampling(len(params), V, "cpu")
    for b, p in enumerate(params):
        seed = seeds[b] if seeds is not None else 1000 + b
        rs.set_row(b, p, _as_int64(seed), prompts[b] if prompts is not None else [])
    return rs


def draws(logits: torch.Tensor, n: int, temperature=1.0, top_k=None, top_p=TOP_P_OFF, seed=7,
          stages=Stages(sampled=True, filter=True)) -> torch.Tensor:
    """n draws of one sampled row over logits [V] at counters 0..n-1 (n rows of the same seed)."""
    V = logits.shape[-1]
    rows = RowView(greedy=torch.zeros(n, dtype=torch.bool), temperature=torch.full((n,), float(temperature)),
                   top_k=torch.full((n,), V if top_k is None else top_k, dtype=torch.long),
                   top_p=torch.full((n,), float(top_p)), penalty=torch.ones(n),
                   seed=torch.full((n,), seed, dtype=torch.long), counter=torch.arange(n),
                   seen=torch.zeros(n, V, dtype=torch.bool))
    return sample_rows(logits.expand(n, V).clone(), stages, rows).tokens


# ---- counter_noise ----------------------------------------------------------------------------------

def test_noise_is_a_pure_function_of_seed_counter_and_column():
    seeds, counters = torch.tensor([0, 1, 5, 5, -3]), torch.tensor([0, 0, 0, 1, 9])
    a, b = counter_noise(seeds, counters, 512), counter_noise(seeds.clone(), counters.clone(), 512)
    assert a.shape == (5, 512) and a.dtype == torch.float32 and torch.equal(a, b)
    # a row's noise does not depend on the other rows of the call
    for i in range(5):
        assert torch.equal(counter_noise(seeds[i:i + 1], counters[i:i + 1], 512)[0], a[i])
    # other seeds, other counters, other columns: other values (a collision per column is ~2**-24)
    for i in range(5):
        for j in range(i + 1, 5):
            assert (a[i] == a[j]).float().mean() < 0.01, (i, j)
    assert a[0].unique().numel() > 500


def test_noise_is_inside_the_open_unit_interval_and_uniform():
    seeds = torch.arange(64) * 7919 + 3
    noise = counter_noise(seeds, torch.zeros(64, dtype=torch.long), 4096)
    assert float(noise.min()) > 0.0 and float(noise.max()) < 1.0
    assert abs(float(noise.double().mean()) - 0.5) < 0.003
    counts = torch.histc(noise, bins=20, min=0.0, max=1.0)
    assert chi2(counts, torch.full((20,), noise.numel() / 20)) < 45.3  # 19 dof, p = 0.0005


def test_noise_of_one_row_over_its_steps_is_uniform():
    """What one request draws step after step (counter 0, 1, 2, ...) at a fixed column."""
    n = 20000
    noise = counter_noise(torch.full((n,), 12345), torch.arange(n), 4)
    for col in range(4):
        counts = torch.histc(noise[:, col], bins=10, min=0.0, max=1.0)
        assert chi2(counts, torch.full((10,), n / 10)) < 29.7, col  # 9 dof, p = 0.0005
    # consecutive steps are not correlated
    x = noise[:, 0].double()
    r = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1]
    assert abs(float(r)) < 0.03


@pytest.mark.parametrize("seed", [2 ** 63, 2 ** 64 - 1, 2 ** 63 + 12345, 2 ** 32])
def test_seeds_with_high_bits_set_work(seed):
    s = _as_int64(seed)
    assert -2 ** 63 <= s < 2 ** 63 and s & (2 ** 64 - 1) == seed
    noise = counter_noise(torch.tensor([s, s]), torch.tensor([0, 1]), 256)
    assert float(noise.min()) > 0.0 and float(noise.max()) < 1.0
    assert not torch.equal(noise[0], noise[1])
    low = counter_noise(torch.tensor([seed & 0xFFFFFFFF]), torch.tensor([0]), 256)
    assert (noise[0] == low[0]).float().mean() < 0.01  # the high 32 bits change the noise


def test_seed_conversion_is_one_to_one_at_the_edges():
    assert [_as_int64(s) for s in (0, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1)] == [0, 2 ** 63 - 1, -2 ** 63, -1]


# ---- sample_rows: the choice --------------------------------------------------------------------------

def test_greedy_rows_take_the_argmax_and_counters_advance():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    rs = rows_of([SamplingParams()] * 5, 300)
    for step in range(3):
        out = sample_rows(logits.clone(), Stages(), rs.view(5))
        assert torch.equal(out.tokens, torch.argmax(logits, dim=-1))
        assert out.logprob is None and out.top_ids is None and out.top_logprobs is None
        assert rs.view(5).counter.tolist() == [step + 1] * 5


def test_a_sampled_row_draws_softmax_of_logits_over_temperature():
    n = 4000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -0.5, 0.25])
    for T in (0.7, 1.0, 1.6):
        counts = torch.bincount(draws(logits, n, temperature=T, stages=Stages(sampled=True)), minlength=8)
        p = torch.softmax(logits.double() / T, dim=0)
        assert (counts.double() / n - p).abs().max() < 0.03, (T, counts)
        assert chi2(counts, p * n) < 24.3, (T, counts)  # 7 dof, p = 0.001


def test_the_filtered_distribution_is_the_renormalised_softmax():
    n = 4000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -0.5, 0.25])
    keep = torch.tensor([0, 5, 1])  # top 3
    counts = torch.bincount(draws(logits, n, top_k=3), minlength=8)
    p = torch.softmax(logits[keep].double(), dim=0)
    assert counts[keep].sum() == n
    assert chi2(counts[keep], p * n) < 13.9  # 2 dof, p = 0.001


def test_top_k_one_and_a_tiny_top_p_are_the_argmax():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        logits = torch.randn(64, generator=g)
        best = int(torch.argmax(logits))
        assert set(draws(logits, 500, temperature=2.0, top_k=1).tolist()) == {best}
        assert set(draws(logits, 500, temperature=2.0, top_p=1e-6).tolist()) == {best}


def reference_filter(scaled: torch.Tensor, top_k: int, top_p: float) -> set:
    """The ids one row keeps, by hand: the top_k best (0 or >= V: all), then of those the nucleus of
    Meta's `sample_top_p`: an id stays when the probability mass ranked strictly above it is <= top_p."""
    V = scaled.shape[0]
    order = sorted(range(V), key=lambda i: -float(scaled[i]))
    if 0 < top_k < V:
        order = order[:top_k]
    probs = torch.softmax(scaled[order].double(), dim=0).tolist()
    kept, above = set(), 0.0
    for i, p in zip(order, probs):
        if above <= top_p:
            kept.add(i)
        above += p
    return kept


def test_filter_keeps_exactly_the_expected_ids():
    """One call, each row with its own top_k and top_p (the per-row tensors), against the reference."""
    g = torch.Generator().manual_seed(2)
    cases = [(5, 1.0), (1, 1.0), (0, 0.5), (0, 0.9), (10, 0.8), (0, 1e-6), (3, 0.5), (200, 0.95), (150, 1.0),
             (199, 0.3)]
    logits = torch.randn(len(cases), 200, generator=g) * 2
    top_k = torch.tensor([k if 0 < k < 200 else 200 for k, _ in cases])
    top_p = torch.tensor([p if p < 1 else TOP_P_OFF for _, p in cases])
    got = _filter(logits.clone(), top_k, top_p)
    for b, (k, p) in enumerate(cases):
        kept = set(torch.nonzero(torch.isfinite(got[b])).flatten().tolist())
        assert kept == reference_filter(logits[b], k, p), (k, p)
        assert torch.equal(got[b][torch.isfinite(got[b])], logits[b][torch.isfinite(got[b])])  # values untouched


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (1, 1.0), (0, 0.5), (0, 0.9), (10, 0.8), (0, 1e-6)])
def test_filter_matches_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 200, generator=g) * 2
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = _filter(logits.clone(), torch.full((4,), top_k or 200), torch.full((4,), top_p if top_p < 1 else TOP_P_OFF))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))


def test_sampled_tokens_cover_exactly_the_kept_set():
    n = 4000
    logits = torch.tensor([3.0, 2.5, 2.0, 1.8, 0.0, -1.0, 2.2, 1.0])
    probs = torch.softmax(logits, 0)
    for top_k, top_p in ((2, TOP_P_OFF), (8, 0.6), (4, 0.8), (3, float(probs[0] + probs[1] * 0.5))):
        want = reference_filter(logits, top_k, top_p)
        assert set(draws(logits, n, top_k=top_k, top_p=top_p).tolist()) == want, (top_k, top_p)


def test_repetition_penalty_only_on_rows_with_one_and_only_on_seen_ids():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0],     # penalty 3 on id 0: 1.0, so id 1 (not id 2: 1 is unpenalised)
                           [3.0, 2.9, 2.8, 0.0],     # penalty 1: id 0 stays the best although seen
                           [-1.0, -1.2, -5.0, -9.0],  # penalty 1.3 on a negative logit multiplies: -1.3 < -1.2
                           [3.0, 2.9, 2.8, 0.0]])     # penalty 3 but nothing seen
    params = [SamplingParams(repetition_penalty=3.0), SamplingParams(), SamplingParams(repetition_penalty=1.3),
              SamplingParams(repetition_penalty=3.0)]
    rs = rows_of(params, 4, prompts=[[0], [0], [0], []])
    assert rs.view(4).seen.tolist() == [[True, False, False, False], [False] * 4, [True, False, False, False],
                                        [False] * 4]  # seen is recorded only where a penalty applies
    rs.view(4).seen[1, 0] = True  # and even when seen, penalty 1 leaves the row alone
    assert sample_rows(logits.clone(), Stages(penalty=True), rs.view(4)).tokens.tolist() == [1, 0, 1, 0]
    assert sample_rows(logits.clone(), Stages(), rs.view(4)).tokens.tolist() == [0, 0, 0, 0]  # stage off


def test_a_penalised_sampled_row_samples_the_penalised_logits():
    """Same seed and counter: sampling with the penalty stage equals sampling logits penalised beforehand."""
    g = torch.Generator().manual_seed(3)
    V, B = 50, 6
    logits = torch.randn(B, V, generator=g) * 2
    seen = torch.rand(B, V, generator=g) < 0.3
    params = [SamplingParams(temperature=0.9, repetition_penalty=1.5, seed=s) for s in range(B)]
    for step in range(20):
        with_stage = rows_of(params, V, seeds=list(range(B)))
        with_stage.view(B).seen.copy_(seen)
        with_stage.view(B).counter.fill_(step)
        plain = rows_of([SamplingParams(temperature=0.9, seed=s) for s in range(B)], V, seeds=list(range(B)))
        plain.view(B).counter.fill_(step)
        a = sample_rows(logits.clone(), Stages(penalty=True, sampled=True), with_stage.view(B)).tokens
        pre = apply_repetition_penalty(logits, seen, torch.full((B, 1), 1.5))
        b = sample_rows(pre, Stages(sampled=True), plain.view(B)).tokens
        assert torch.equal(a, b), step


MIXED = [SamplingParams(), SamplingParams(temperature=0.8, seed=5),
         SamplingParams(temperature=1.0, top_k=3, top_p=0.5, repetition_penalty=1.3, seed=11),
         SamplingParams(repetition_penalty=1.2)]


def test_rows_are_independent_of_the_rest_of_the_batch():
    """Each row of a mixed batch (all stages on) draws, step after step, what it draws alone under its own
    stages: the stages it does not use leave it exactly as it was."""
    V = 64
    g = torch.Generator().manual_seed(4)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    batch = rows_of(MIXED, V, seeds=[p.seed or 0 for p in MIXED], prompts=prompts)
    alone = [rows_of([p], V, seeds=[p.seed or 0], prompts=[prompts[b]]) for b, p in enumerate(MIXED)]
    stages = Stages.of(MIXED, [0, 2, 0, 0], V)
    assert stages == ALL
    for step in range(40):
        logits = torch.randn(len(MIXED), V, generator=g) * 2
        got = sample_rows(logits.clone(), stages, batch.view(len(MIXED)))
        for b, p in enumerate(MIXED):
            own = sample_rows(logits[b:b + 1].clone(), Stages.of([p], [0], V), alone[b].view(1))
            assert int(got.tokens[b]) == int(own.tokens[0]), (step, b)
            alone[b].view(1).seen[0, own.tokens[0]] = True
        batch.view(len(MIXED)).seen.scatter_(1, got.tokens[:, None], True)


def test_nonfinite_rows_are_marked_whatever_the_stages():
    V = 40
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(5))
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    logits[3] = float("-inf")
    logits[4, :30] = float("-inf")  # some -inf is fine: the row still has finite logits
    for params in ([SamplingParams()] * 5, [SamplingParams(temperature=0.7, top_k=5, top_p=0.9,
                                                             repetition_penalty=1.2, seed=0)] * 5):
        for stages in (Stages(), Stages.of(params, [3] * 5, V), ALL):
            rs = rows_of(params, V, prompts=[[1, 2]] * 5)
            got = sample_rows(logits.clone(), stages, rs.view(5)).tokens.tolist()
            assert got[1:4] == [NONFINITE] * 3, (params[0], stages)
            assert got[0] >= 0 and got[4] >= 30, (params[0], stages)
            if params[0].greedy:
                assert got[0] == int(torch.argmax(logits[0])) and got[4] == int(torch.argmax(logits[4]))


def test_ids_past_the_vocab_limit_are_never_chosen():
    V, limit, n = 16, 10, 2000
    logits = torch.zeros(V)
    logits[limit:] = 5.0  # the padding would win
    greedy = sample_rows(logits[None].clone(), Stages(), rows_of([SamplingParams()], V).view(1), limit)
    assert int(greedy.tokens[0]) == 0  # the argmax of the ids below the limit (all equal: the first)
    rows = draws(logits, 1, stages=Stages(sampled=True))  # without the limit the padding is drawn
    assert int(rows[0]) >= limit
    rs = RowSampling(n, V, "cpu")
    for b in range(n):
        rs.set_row(b, SamplingParams(temperature=1.0, top_p=0.99), 3, [])
    rs.view(n).counter.copy_(torch.arange(n))
    out = sample_rows(logits.expand(n, V).clone(), Stages(sampled=True, filter=True, logprobs=True), rs.view(n), limit)
    assert int(out.tokens.max()) < limit and len(set(out.tokens.tolist())) == limit
    past = out.top_ids >= limit  # listed last (a width past the limit), with logprob -inf
    assert bool(torch.isinf(out.top_logprobs[past]).all()) and not bool(past[:, :limit].any())


def test_logprobs_are_of_the_raw_logits_and_the_top_ids_sorted():
    V = 100
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(len(MIXED), V, generator=g) * 3
    rs = rows_of(MIXED, V, prompts=[[1, 2, 3]] * len(MIXED))
    out = sample_rows(logits.clone(), Stages.of(MIXED, [5] * len(MIXED), V), rs.view(len(MIXED)))
    lsm = torch.log_softmax(logits, dim=-1)
    assert out.top_ids.shape == out.top_logprobs.shape == (len(MIXED), LOGPROB_WIDTH)
    torch.testing.assert_close(out.logprob, lsm.gather(-1, out.tokens[:, None])[:, 0])
    ref = torch.topk(lsm, LOGPROB_WIDTH, dim=-1)
    assert torch.equal(out.top_ids, ref.indices)
    torch.testing.assert_close(out.top_logprobs, ref.values)
    assert bool((out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all())
    small = sample_rows(torch.randn(2, 8, generator=g), Stages(logprobs=True), rows_of(MIXED[:2], 8).view(2))
    assert small.top_ids.shape == (2, 8)  # a vocabulary narrower than LOGPROB_WIDTH: all of it


def test_counters_advance_by_one_per_call_on_every_row():
    V = 30
    rs = rows_of(MIXED, V)
    view = rs.view(len(MIXED))
    view.counter.copy_(torch.tensor([0, 5, 9, 2]))
    for step in range(1, 4):
        sample_rows(torch.randn(len(MIXED), V), ALL, view)
        assert view.counter.tolist() == [step, 5 + step, 9 + step, 2 + step]
    rs.set_row(1, MIXED[1], 5, [])
    assert rs.view(4).counter.tolist() == [3, 0, 12, 5]


def test_same_seed_same_tokens_other_seed_other_tokens():
    V = 100
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.0)

    def run(seed):
        rs = rows_of([p] * 4, V, seeds=[seed] * 4)
        return tuple(tuple(sample_rows(logits.clone(), Stages(sampled=True), rs.view(4)).tokens.tolist())
                     for _ in range(5))

    assert run(7) == run(7)
    assert len({run(s) for s in range(8)}) > 1


# ---- Stages and RowSampling ---------------------------------------------------------------------------

def test_stages_of_a_mix():
    V = 100
    assert Stages.of([SamplingParams()], [0], V) == Stages()
    assert Stages.of([SamplingParams(top_k=5, top_p=0.5)], [0], V) == Stages()  # greedy: no filter
    assert Stages.of([SamplingParams(temperature=1.0, top_k=V)], [0], V) == Stages(sampled=True)  # top_k >= V: off
    assert Stages.of([SamplingParams(temperature=1.0, top_k=V - 1)], [0], V) == Stages(sampled=True, filter=True)
    assert Stages.of([SamplingParams(temperature=1.0, top_p=0.9)], [0], V) == Stages(sampled=True, filter=True)
    assert Stages.of([SamplingParams(repetition_penalty=1.1)], [1], V) == Stages(penalty=True, logprobs=True)
    assert Stages.of(MIXED, [0] * 4, V) == Stages(penalty=True, sampled=True, filter=True)
    # distinct values, same stages: one key (one decode step, one graph)
    assert len({Stages.of([SamplingParams(temperature=t, top_k=k, seed=s)], [0], V)
                for t in (0.5, 1.0, 2.0) for k in (3, 40) for s in (0, 1)}) == 1


def test_row_values_set_and_cleared():
    V = 50
    rs = RowSampling(2, V, "cpu")
    rs.set_row(1, SamplingParams(temperature=0.5, top_k=7, top_p=0.3, repetition_penalty=1.4), -5, [3, 4, 3])
    r = rs.rows(1, 2)
    assert (r.greedy.tolist(), r.top_k.tolist(), r.seed.tolist(), r.counter.tolist()) == ([False], [7], [-5], [0])
    assert r.temperature.tolist() == pytest.approx([0.5]) and r.top_p.tolist() == pytest.approx([0.3])
    assert r.penalty.tolist() == pytest.approx([1.4])
    assert torch.nonzero(r.seen[0]).flatten().tolist() == [3, 4]
    rs.set_row(0, SamplingParams(temperature=1.0, top_k=V + 5), 0, [])
    assert rs.rows(0, 1).top_k.tolist() == [V] and rs.rows(0, 1).top_p.tolist() == [TOP_P_OFF]
    rs.clear_row(1)
    r = rs.rows(1, 2)
    assert (r.greedy.tolist(), r.top_k.tolist(), r.counter.tolist()) == ([True], [V], [0])
    assert r.temperature.tolist() == [1.0] and r.top_p.tolist() == [TOP_P_OFF] and r.penalty.tolist() == [1.0]
