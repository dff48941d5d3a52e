"""Speculative decoding (`engine/speculation.py`, `engine/verify_graph.py`): the prompt-lookup proposer and the
adaptive policy against known answers; the verify pass's tokens against plain decoding's, token for token, on
the reference, "cpu" (native) and Triton-interpreter backends, with every proposal accepted, none, or some, and
requests ending mid-block (max tokens, a stop string, a stop token); the pass's host-sync freedom; speculative
sampling's distribution against the model's (chi-square, fixed seeds)."""
from __future__ import annotations

import pytest
import torch

import codellama_rt as cl
from codellama_rt.engine.row_sampling import NONFINITE, Stages
from codellama_rt.engine.sampling import SamplingParams
from codellama_rt.engine.speculation import MIN_NGRAM, PassCosts, PromptLookup, Speculation, bucket
from codellama_rt.model.config import ModelArgs
from codellama_rt.model.transformer import Prefill
from codellama_rt.tiny import write_random_checkpoint

PROMPTS = ["def fibonacci(n):\n    if n < 2:", "import os\n", "class Config:\n    def __init__(self", "x = [",
           "for i in range(10):\n    print(i)\nfor i in range(10):\n", "a = b + c\nd = e + f\na = b"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=1000, rope_theta=1e6,
                     max_seq_len=512)
    return write_random_checkpoint(tmp_path_factory.mktemp("speculative") / "m", args, tiny_tokenizer)


@pytest.fixture
def static_pricing(monkeypatch):
    """Engines price verify passes by the static cost model (as under tensor parallelism), not by measured pass
    times: on a loaded machine measured passes may cost so much that requests stop proposing, and the counts a
    test asserts would depend on that (measured pricing has tests of its own, on PassCosts)."""
    from codellama_rt.engine.speculator import Speculator

    step = Speculator.step

    def timing_free_step(self, decoding):
        self.timing_free = True
        return step(self, decoding)

    monkeypatch.setattr(Speculator, "step", timing_free_step)


class Scripted:
    """A proposer proposing `script(done)` (done: ids sampled so far): an oracle, a liar, anything between."""

    def __init__(self, script):
        self.script, self.done = script, 0

    def extend(self, ids) -> None:
        self.done += len(ids)

    def propose(self, n: int) -> list[int]:
        return list(self.script(self.done))[:n]


def run(model, prompts, n, proposer=None, stops=None, **sampling):
    """Completions of `prompts` (id lists) under `sampling`; with `proposer` (a function of the prompt index ->
    Proposer) every request speculates through it."""
    engine = model.engine
    saved = engine.speculator.proposers["lookup"]
    if proposer is not None:
        index = {tuple(p): i for i, p in enumerate(prompts)}
        engine.speculator.proposers["lookup"] = lambda request: proposer(index[tuple(request.prompt)])
        sampling = dict(sampling, speculate="lookup")
    try:
        r = engine.run(prompts, SamplingParams(max_new_tokens=n, **sampling), stops or {})
        for _ in r:
            pass
    finally:
        engine.speculator.proposers["lookup"] = saved
    return r.completions


def ids_of(model, prompts):
    return [model.tokenizer.encode(p) for p in prompts]


# ---- the proposer and the policy ---------------------------------------------------------------------------

def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    look = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    # suffix [1, 2, 3] occurred at 0..2 (followed by 4, 5, ...); [2, 3] also at 6..7 (followed by 7): longest wins
    assert look.propose(3) == [4, 5, 9]
    look.extend([4, 5])
    assert look.propose(2) == [9, 2]  # [..3, 4, 5] now matches 2..4
    assert look.propose(100) == [9, 2, 3, 7, 8, 1, 2, 3, 4, 5]  # up to the end of the context
    assert PromptLookup([5, 6, 7]).propose(4) == []  # no earlier occurrence
    assert PromptLookup([1, 2, 1]).propose(4) == []  # a single-id match is below MIN_NGRAM
    assert MIN_NGRAM == 2
    latest = PromptLookup([1, 2, 5, 1, 2, 6, 1, 2])
    assert latest.propose(1) == [6]  # the latest earlier occurrence


def test_bucket_widths():
    assert [bucket(n, 16) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert bucket(12, 8) == 8


def test_pass_costs_estimates_from_measurements():
    costs = PassCosts()
    assert costs.relative(1, 0) == 1.0
    assert costs.relative(1, 8) == pytest.approx(1 + PassCosts.DEFAULT_SLOPE * 8)  # nothing measured
    costs.observe(1, 0, 1.0)
    costs.observe(1, 4, 2.0)
    assert costs.relative(1, 4) == pytest.approx(2.0)
    assert costs.relative(1, 2) == pytest.approx(1.5)   # between decode (1.0) and width 4 (2.0)
    assert costs.relative(1, 8) == pytest.approx(3.0)   # past the widest: its slope per id
    costs.observe(1, 8, 2.5)
    assert costs.relative(1, 6) == pytest.approx(2.25)
    assert costs.relative(2, 4) == pytest.approx(1 + PassCosts.DEFAULT_SLOPE * 4)  # another batch size


def test_pass_costs_shrug_off_hiccups_and_forget_what_stops_running():
    """A few slow passes (a preempted thread) must not price a width out, and an estimate of a width the policy
    stopped choosing must not stay forever: it is forgotten after STALE_PASSES passes of other widths."""
    costs = PassCosts()
    costs.observe(1, 0, 1.0)
    for seconds in [2.5] * 5 + [40.0] * 3:  # three hiccups among eight passes of width 8
        costs.observe(1, 8, seconds)
    assert costs.relative(1, 8) == pytest.approx(2.5)
    costs.observe(1, 4, 1.5)
    for _ in range(PassCosts.STALE_PASSES):
        costs.observe(1, 4, 1.5)
    assert costs.relative(1, 8) == pytest.approx(2.0)  # width 4's slope (0.125 / id) past it, not 8's stale 2.5
    costs.observe(1, 8, 3.0)
    assert costs.relative(1, 8) == pytest.approx(3.0)  # measured afresh (its old window dropped with it)
    for _ in range(PassCosts.STALE_PASSES + 1):
        costs.observe(1, 8, 3.0)
    assert costs.relative(1, 4) == pytest.approx(2.0)  # width 4 forgotten in turn: between 1.0 and 3.0
    assert costs.relative(1, 0) == 1.0 and costs.measured(1)  # decode steps are never forgotten

def test_policy_proposes_more_when_accepting_and_backs_off_when_not():
    spec = Speculation(Scripted(lambda done: []), k=8)
    flat = lambda m: 1.0  # noqa: E731 - a pass costs a decode step whatever its width (a GPU at batch 1)
    steep = lambda m: 1.0 + 0.5 * m  # noqa: E731
    assert spec.limit(8, flat) == 8   # free passes: propose everything
    assert spec.limit(3, flat) == 3   # at most the room
    for _ in range(6):
        spec.record(8, 8)
    assert spec.acceptance > 0.9 and spec.limit(8, lambda m: 1.0 + 0.1 * m) == 8
    for _ in range(10):
        spec.record(4, 0)
    assert spec.acceptance < 0.4
    assert spec.limit(8, steep) == 0   # plain decoding is better
    waits = []
    for _ in range(4):  # each time plain decoding wins the wait before the next probe doubles
        n = 0
        while not spec.wants():
            n += 1
        waits.append(n)
        assert spec.limit(8, steep) == 1  # a one-id probe
    assert waits == [1, 2, 4, 8]
    assert spec.stats.verifies == 16 and spec.stats.proposed == 88 and spec.stats.accepted == 48
    assert spec.stats.mean_accepted == pytest.approx(3.0)


def test_draft_policy_prices_a_pass_by_its_mean_accepted_ids():
    """A draft (`whole`) proposes all k or none from the mean accepted per pass: 6 of 8 accepted each time is a
    yield of 7 tokens, so passes costing 5.7 decode steps pay (the per-id geometric estimate, ~0.8 after such
    passes, would expect 4.3 and decode plainly) and passes costing 9.9 do not; no probes."""
    spec = Speculation(Scripted(lambda done: []), k=8, whole=True)
    cheap, dear = (lambda m: 1.0 + 0.59 * m), (lambda m: 1.0 + 1.11 * m)
    assert spec.limit(8, cheap) == 8   # the prior: 0.9 k accepted
    assert spec.limit(5, cheap) == 5   # only k or the room, never a shorter run by choice
    for _ in range(6):
        spec.record(8, 6)
    assert spec.acceptance < 0.87  # per id, the rejection at each pass's end weighs in
    assert spec.limit(8, cheap) == 8
    assert spec.limit(8, dear) == 0 and not spec.wants()  # plain decoding, a wait, and no one-id probe after it
    assert spec.limit(8, dear) == 0


def test_sampling_params_check_speculation_values():
    SamplingParams(speculate="lookup", num_speculative_tokens=16)
    for bad in (dict(speculate="ngram"), dict(speculate=True), dict(num_speculative_tokens=0),
                dict(num_speculative_tokens=17), dict(num_speculative_tokens=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_draft_without_a_draft_model_is_refused(checkpoint):
    model = cl.load(checkpoint)
    with pytest.raises(ValueError, match="draft model"):
        model.generate("x", speculate="draft")


# ---- exactness ------------------------------------------------------------------------------------------

SAMPLINGS = [pytest.param(dict(), id="greedy"),
             pytest.param(dict(temperature=0.9, seed=7), id="seeded"),
             pytest.param(dict(temperature=1.1, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=3), id="all"),
             pytest.param(dict(repetition_penalty=1.2), id="greedy-penalty")]


def oracle_of(plain):
    return lambda i: Scripted(lambda done: plain[i].token_ids[done:])


def liar_of(plain, vocab):
    return lambda i: Scripted(lambda done: [(t + 1) % vocab for t in plain[i].token_ids[done:]])


def half_of(plain, vocab):
    """Right for two ids, then wrong: every pass accepts some and rejects the rest."""
    return lambda i: Scripted(lambda done: plain[i].token_ids[done:done + 2] +
                              [(t + 1) % vocab for t in plain[i].token_ids[done + 2:]])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.usefixtures("static_pricing")
def test_speculative_tokens_equal_plain_decoding(checkpoint, backend, sampling):
    """Oracle (all accepted), liar (none), half right (some), and prompt lookup: the same tokens as plain
    decoding, sampled rows included (the verify pass samples each position as plain decoding does), three
    requests at once."""
    model = cl.load(checkpoint, backend=backend, max_batch_size=3)
    prompts = ids_of(model, PROMPTS[:3])
    plain = run(model, prompts, 40, **sampling)
    V = model.args.vocab_size
    for name, proposer in (("oracle", oracle_of(plain)), ("liar", liar_of(plain, V)), ("half", half_of(plain, V)),
                           ("lookup", lambda i: PromptLookup(prompts[i]))):
        got = run(model, prompts, 40, proposer, **sampling)
        assert [c.token_ids for c in got] == [c.token_ids for c in plain], name
        assert [c.finish_reason for c in got] == [c.finish_reason for c in plain], name
    oracle = run(model, prompts, 40, oracle_of(plain), **sampling)
    stats = [c.speculation for c in oracle]
    assert all(s.verifies > 0 and s.accepted == s.proposed for s in stats)
    assert sum(s.verifies for s in stats) < sum(len(c.token_ids) for c in oracle) / 2
    liar = run(model, prompts, 40, liar_of(plain, V), **sampling)
    assert all(c.speculation.accepted == 0 for c in liar)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", SAMPLINGS[:2])
def test_speculative_tokens_equal_plain_decoding_triton(checkpoint, sampling):
    """The same on the Triton backend (its kernels in the interpreter): oracle and half-right proposals."""
    model = cl.load(checkpoint, backend="triton", max_batch_size=2)
    prompts = ids_of(model, PROMPTS[:2])
    plain = run(model, prompts, 16, **sampling)
    for proposer in (oracle_of(plain), half_of(plain, model.args.vocab_size)):
        assert [c.token_ids for c in run(model, prompts, 16, proposer, **sampling)] == \
            [c.token_ids for c in plain]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_requests_ending_mid_block(checkpoint, backend):
    """max_new_tokens, a stop string and a stop token reached inside an accepted block end the request exactly
    where plain decoding ends it."""
    model = cl.load(checkpoint, backend=backend, max_batch_size=2)
    prompts = ids_of(model, PROMPTS[:2])
    full = run(model, prompts, 40)
    oracle = oracle_of(full)
    for n in (1, 2, 5, 13):
        got = run(model, prompts, n, oracle, num_speculative_tokens=8)
        assert [c.token_ids for c in got] == [c.token_ids[:n] for c in full]
    stop_id = full[0].token_ids[6]
    stops = {stop_id: "eos"}
    plain = run(model, prompts, 40, stops=stops)
    assert len(plain[0].token_ids) <= 6 and plain[0].finish_reason == "eos"
    got = run(model, prompts, 40, oracle, stops=stops)
    assert [(c.token_ids, c.finish_reason) for c in got] == [(c.token_ids, c.finish_reason) for c in plain]
    text = full[1].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    plain = run(model, prompts, 40, stop=[stop])
    got = run(model, prompts, 40, oracle, stop=[stop])
    assert plain[1].finish_reason == "stop"
    assert [(c.text, c.token_ids, c.finish_reason) for c in got] == \
        [(c.text, c.token_ids, c.finish_reason) for c in plain]


def submit(model, prompt, params, proposer=None, logprobs=0):
    """One request through `Engine.submit` (logprobs asked for), driven here: its Completion."""
    import queue

    engine, events = model.engine, queue.SimpleQueue()
    saved = engine.speculator.proposers["lookup"]
    if proposer is not None:
        engine.speculator.proposers["lookup"] = lambda request: proposer
    try:
        engine.submit(prompt, params, {}, logprobs=logprobs, sink=events.put, background=False)
        while True:
            event = engine.next_event(events)
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, cl.Completion):
                return event
    finally:
        engine.speculator.proposers["lookup"] = saved


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.usefixtures("static_pricing")
def test_logprobs_match_plain_decoding(checkpoint, backend):
    """Each emitted token's logprob and top alternatives are plain decoding's (fp32: to rounding)."""
    model = cl.load(checkpoint, backend=backend)
    prompt = ids_of(model, PROMPTS[:1])[0]
    values = dict(max_new_tokens=20, temperature=0.8, seed=5)
    plain = submit(model, prompt, SamplingParams(**values), logprobs=5)
    for script in (lambda done: plain.token_ids[done:],
                   lambda done: plain.token_ids[done:done + 1] + [(t + 1) % 1000 for t in plain.token_ids[done + 1:]]):
        got = submit(model, prompt, SamplingParams(**values, speculate="lookup"), Scripted(script), logprobs=5)
        assert got.token_ids == plain.token_ids and got.speculation.verifies > 0
        assert len(got.logprobs) == len(plain.logprobs) == 20
        for a, b in zip(got.logprobs, plain.logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)


@pytest.mark.usefixtures("static_pricing")
def test_lookup_through_the_model_api_and_metrics(checkpoint):
    """`generate(..., speculate="lookup")` on text that repeats itself: the same text as plain decoding, stats
    on the Completion and the engine's counters."""
    model = cl.load(checkpoint)
    prompt = PROMPTS[4] * 3
    plain = model.generate(prompt, max_new_tokens=48)
    got = model.generate(prompt, max_new_tokens=48, speculate="lookup", num_speculative_tokens=4)
    assert got.token_ids == plain.token_ids and got.text == plain.text
    assert plain.speculation is None
    s = got.speculation
    assert s.verifies >= 1 and 0 <= s.accepted <= s.proposed <= 4 * s.verifies
    m = model.engine.metrics.snapshot()
    assert m["verify_steps"] == s.verifies
    assert m["speculative_proposed_tokens"] == s.proposed and m["speculative_accepted_tokens"] == s.accepted
    assert m["generated_tokens"] == len(plain.token_ids) + len(got.token_ids)


def test_no_room_in_the_cache_falls_back_to_plain_steps(checkpoint):
    """Near the end of the context a pass would write past the cache: the request decodes plainly there."""
    model = cl.load(checkpoint, max_seq_len=48)
    prompts = ids_of(model, PROMPTS[:1])
    n = 48 - len(prompts[0])
    plain = run(model, prompts, n)
    got = run(model, prompts, n, oracle_of(plain), num_speculative_tokens=16)
    assert got[0].token_ids == plain[0].token_ids and len(got[0].token_ids) == n


# ---- the pass itself: no host sync; speculative sampling's distribution -----------------------------------

def verify_fixture(B, vocab=16, backend="reference", seq=32):
    """A random tiny model (vocab `vocab`), a cache, decode and verify buffers of B rows, each row's context
    [1, 2, 3] prefilled and its pending token 4 at position 3."""
    from codellama_rt.api import random_model
    from codellama_rt.bench.measure import IdTokenizer
    from codellama_rt.engine.decode_graph import DecodeBuffers
    from codellama_rt.engine.verify_graph import VerifyBuffers
    from codellama_rt.model.kv_cache import KVCache
    from codellama_rt.model.transformer import Prefill

    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=vocab, max_seq_len=seq)
    model = random_model(args, IdTokenizer(vocab), backend=backend, std=1.0, seed=1)
    module = model.module
    cache = KVCache(args, B, seq, torch.float32, "cpu")
    buffers, vbuf = DecodeBuffers(B, vocab, "cpu", seq - 1), VerifyBuffers(B, vocab, "cpu")
    with torch.inference_mode():
        module(torch.tensor([[1, 2, 3]] * B), Prefill(0), cache)
    return model, module, cache, buffers, vbuf


def reset_rows(buffers, B, params, seed0):
    for b in range(B):
        buffers.sampling.set_row(b, params, seed0 + b, [1, 2, 3])
        buffers.start_row(b, 4, 3)


def test_verify_pass_has_no_host_sync_and_fixed_shapes():
    from codellama_rt.engine.verify_graph import VerifyStep
    from test_decode_graph import StepTrace, no_host_reads

    model, module, cache, buffers, vbuf = verify_fixture(3)
    reset_rows(buffers, 3, SamplingParams(temperature=0.9, top_k=5, top_p=0.9, repetition_penalty=1.2), 10)
    stages = Stages(penalty=True, sampled=True, filter=True, logprobs=True)
    for sampling in (False, True):
        step = VerifyStep(module, cache, buffers, vbuf, 3, 4, stages, speculative_sampling=sampling)
        traces = []
        for i in range(3):
            for b in range(3):
                vbuf.set_row(b, [5, 6, 7, 8][:b + 1])
            vbuf.with_draft_probs().fill_(1.0 / 16)
            with StepTrace() as trace, no_host_reads():
                step()
            traces.append(trace.ops)
        assert traces[0] and all(t == traces[0] for t in traces[1:])


@pytest.mark.parametrize("vocab_limit", [None, 29])
def test_native_greedy_acceptance_equals_the_torch_ops(vocab_limit):
    """On the native CPU step, greedy passes without penalty or logprobs take one native call
    (`accept_greedy`) for the torch ops: the same accepted counts, tokens, next tokens, positions and
    counters, on logits with a NaN, a row of -inf and ids past the vocabulary limit."""
    from codellama_rt.engine.verify_graph import VerifyStep
    from codellama_rt.kernels import cpu_native

    if not cpu_native.available():
        pytest.skip("native CPU kernels not built")
    B, V, k = 4, 40, 4
    T = k + 1
    model, module, cache, buffers, vbuf = verify_fixture(B, V, backend="cpu")
    reset_rows(buffers, B, SamplingParams(), 0)
    step = VerifyStep(module, cache, buffers, vbuf, B, k, Stages(), vocab_limit=vocab_limit)
    assert step.native is not None and step._accept is not None
    logits = torch.randn(B * T, V, generator=torch.Generator().manual_seed(3))
    logits[:, 35] = 9.0  # past a limit of 29: never chosen there
    logits[3 * T + 1, 5] = float("nan")  # row 3's second position is not finite
    logits[2 * T + 4] = float("-inf")  # row 2's last position: nothing finite
    best = torch.argmax(logits[:, :vocab_limit or V], dim=-1).view(B, T)
    proposals = {0: [], 1: best[1, :k].tolist(), 2: best[2, :2].tolist() + [(best[2, 2].item() + 1) % 29, 0],
                 3: best[3, :k].tolist()}
    step.native = lambda *args: logits.clone()  # (the torch ops mask ids past the limit in place)
    named = {**buffers.tensors(), **{f"v.{n}": t for n, t in vbuf.tensors().items()}}
    before = {n: t.clone() for n, t in named.items()}
    results = []
    for accept in (step._accept, None):
        for n, t in named.items():
            t.copy_(before[n])
        for b, ids in proposals.items():
            vbuf.set_row(b, ids)
        step._accept = accept
        step()
        results.append({n: t.clone() for n, t in named.items()})
    native_out, torch_out = results
    assert native_out["v.out"][:B, 0].tolist() == [0, 4, 2, 1]
    assert native_out["v.out"][3, 2] == NONFINITE
    for n in named:
        if n == "v.out":
            assert torch.equal(native_out[n][:B, :T + 1], torch_out[n][:B, :T + 1]), n
        else:
            assert torch.equal(native_out[n], torch_out[n]), n


def test_native_greedy_decode_step_equals_the_torch_ops():
    """The plain decode step takes the same native call (a pass with nothing proposed): the same sampled
    tokens (NONFINITE for a row with NaN), next tokens, positions and counters as its torch ops."""
    from codellama_rt.engine.decode_graph import DecodeStep
    from codellama_rt.kernels import cpu_native

    if not cpu_native.available():
        pytest.skip("native CPU kernels not built")
    B, V = 3, 40
    model, module, cache, buffers, vbuf = verify_fixture(B, V, backend="cpu")
    reset_rows(buffers, B, SamplingParams(), 0)
    step = DecodeStep(module, cache, buffers, B, Stages(), vocab_limit=33)
    assert step.native is not None and step._accept is not None
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(4))
    logits[:, 36] = 9.0
    logits[1, 7] = float("nan")
    step.native = lambda *args: logits.clone()
    named = buffers.tensors()
    before = {n: t.clone() for n, t in named.items()}
    results = []
    for accept in (step._accept, None):
        for n, t in named.items():
            t.copy_(before[n])
        step._accept = accept
        step()
        results.append({n: t.clone() for n, t in named.items()})
    want = torch.argmax(logits[:, :33], dim=-1)
    assert results[0]["sampled"][:B].tolist() == [want[0].item(), NONFINITE, want[2].item()]
    for n in named:
        assert torch.equal(results[0][n], results[1][n]), n


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of `counts` against `probs` (cells expecting < 5 pooled)."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


def test_speculative_sampling_keeps_the_models_distribution():
    """Draft proposals drawn from a distribution q unlike the model's p, accepted by the min(1, p/q) rule and
    replaced from max(0, p - q) at the first rejection: the first two emitted tokens follow the model's
    p(x1) p(x2 | x1) (chi-square over the 16 x 16 pairs, 4096 draws, fixed seeds); the proposals themselves
    do not (the test's power)."""
    from codellama_rt.engine.verify_graph import VerifyStep

    B, V = 512, 16
    model, module, cache, buffers, vbuf = verify_fixture(B, V)
    params = SamplingParams(temperature=1.0)
    stages = Stages(sampled=True)
    step = VerifyStep(module, cache, buffers, vbuf, B, 2, stages, speculative_sampling=True)
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, dim=-1)  # the draft's distribution at each proposal
    pairs, proposal_pairs = torch.zeros(V, V), torch.zeros(V, V)
    for round_ in range(8):
        reset_rows(buffers, B, params, 1000 * round_)
        drafts = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g) for i in range(2)], 1)
        vbuf.proposals[:, :2] = drafts
        vbuf.proposed.fill_(2)
        vbuf.draft_probs[:, :2] = q
        step()
        out = vbuf.out[:B].clone()
        assert (out[:, 0] <= 2).all()
        vbuf.proposed.fill_(0)  # rows that accepted nothing: their second token from a plain step
        step()
        x1 = out[:, 1]
        x2 = torch.where(out[:, 0] >= 1, out[:, 2], vbuf.out[:B, 1])
        pairs.index_put_((x1, x2), torch.ones(B), accumulate=True)
        proposal_pairs.index_put_((drafts[:, 0], drafts[:, 1]), torch.ones(B), accumulate=True)
    with torch.inference_mode():
        p1 = torch.softmax(model.logits([1, 2, 3, 4])[0, -1], -1)
        p2 = torch.softmax(model.logits(torch.tensor([[1, 2, 3, 4, x] for x in range(V)]))[:, -1], -1)
    joint = (p1[:, None] * p2).reshape(-1).double()
    assert chi_square_p(pairs.reshape(-1).double(), joint) > 1e-3
    assert chi_square_p(proposal_pairs.reshape(-1).double(), joint) < 1e-6


# ---- the draft model ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.usefixtures("static_pricing")
def test_draft_model_greedy_equals_plain(checkpoint, backend):
    """A draft that is the model itself (every proposal accepted) and its int4 quantization (some rejected):
    the same tokens as plain greedy decoding, two requests at once."""
    model = cl.load(checkpoint, backend=backend, max_batch_size=2)
    prompts = ids_of(model, PROMPTS[:2])
    plain = run(model, prompts, 24)
    for draft, all_accepted in ((cl.load(checkpoint, backend=backend, max_batch_size=2), True),
                                (cl.load(checkpoint, backend=backend, max_batch_size=2, quantize="int4"), False)):
        m = cl.load(checkpoint, backend=backend, max_batch_size=2, draft=draft)
        got = run(m, prompts, 24, speculate="draft", num_speculative_tokens=4)
        assert [c.token_ids for c in got] == [c.token_ids for c in plain]
        stats = [c.speculation for c in got]
        assert sum(s.verifies for s in stats) > 0  # (the cost model may stop a request's passes early)
        if all_accepted:
            assert all(s.accepted == s.proposed for s in stats)


@pytest.mark.usefixtures("static_pricing")
def test_draft_runs_propose_the_models_own_greedy_tokens(checkpoint):
    """Greedy drafting through `DraftRun`s (what the experiment "draft_graphs" captures on a GPU, run eagerly
    here): a draft that is the model itself has every proposal accepted and the tokens are plain decoding's;
    one run per (row, steps), made once."""
    model = cl.load(checkpoint, backend="reference", max_batch_size=2)
    prompts = ids_of(model, PROMPTS[:2])
    plain = run(model, prompts, 24)
    m = cl.load(checkpoint, backend="reference", max_batch_size=2,
                draft=cl.load(checkpoint, backend="reference", max_batch_size=2))
    draft = m.engine.speculator.draft
    assert not draft.graphed and not draft.use_runs  # (a CPU model: eager one-id steps unless asked)
    draft.use_runs = True
    got = run(m, prompts, 24, speculate="draft", num_speculative_tokens=4)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]
    stats = [c.speculation for c in got]
    assert sum(s.verifies for s in stats) > 0 and all(s.accepted == s.proposed for s in stats)
    assert draft._runs and all(r.steps == steps for (_, steps), r in draft._runs.items())


def test_draft_run_capture_restores_its_buffers_and_replays_the_eager_run(checkpoint, monkeypatch):
    """`capture_step` on a `DraftRun`, on CPU with torch.cuda's stream and graph calls faked: the warm-up leaves
    the run's buffers as the call set them and the cache row holding what the run itself writes; replays give
    the eager run's ids."""

    from codellama_rt.engine.decode_graph import capture_step
    from codellama_rt.engine.draft_graph import DraftRun
    from codellama_rt.model.kv_cache import KVCache
    from test_decode_graph import fake_cuda_capture

    model = cl.load(checkpoint, backend="reference")
    module, ids = model.module, ids_of(model, PROMPTS[:1])[0]

    def fresh():
        cache = KVCache(module.args, 2, 64, module.dtype, module.device)
        with torch.inference_mode():
            module(torch.tensor([ids]), Prefill(0, slot=1), cache)
        return cache, DraftRun(module, cache, 1, 5, model.args.vocab_size)

    cache, eager = fresh()
    want, want_cache = eager.run(7, len(ids)), cache.data.clone()
    cache, step = fresh()
    step.token.fill_(7)
    step.position.fill_(len(ids))
    named = {"token": step.token, "position": step.position, "out": step.out}
    before = {k: t.clone() for k, t in named.items()}
    fake_cuda_capture(monkeypatch, named)
    with torch.inference_mode():
        step.graph = capture_step(step._step, named, "cpu", "pool")
    assert all(torch.equal(named[k], t) for k, t in before.items())
    assert torch.equal(cache.data, want_cache)  # the warm-up wrote exactly what the run writes
    step.graph = type("Graph", (), {"replay": lambda self: step._step()})()
    assert step.run(7, len(ids)) == want and len(want) == 5


def test_draft_model_sampling_runs_and_is_seeded(checkpoint):
    """Sampling with a draft: valid tokens, every id a proposal or the model's, the same tokens for the same
    seed (the draft draws from a stream of the request's own seed)."""
    draft = cl.load(checkpoint, quantize="int4")
    model = cl.load(checkpoint, draft=draft)
    a = model.generate(PROMPTS[0], max_new_tokens=24, temperature=0.9, seed=11, speculate="draft")
    b = model.generate(PROMPTS[0], max_new_tokens=24, temperature=0.9, seed=11, speculate="draft")
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert all(0 <= t < model.args.vocab_size for t in a.token_ids)
    assert a.speculation.verifies > 0


def _together(model, jobs: list) -> list:
    """Texts of (prompt, sampling) jobs streamed in turn from one thread, so their rows share passes."""
    streams, texts = [model.stream(p, **kw) for p, kw in jobs], [""] * len(jobs)
    live = set(range(len(jobs)))
    while live:
        for i in sorted(live):
            try:
                texts[i] += next(streams[i])
            except StopIteration:
                live.discard(i)
    return texts


def test_drafted_sampling_tokens_depend_on_the_seed_alone(checkpoint):
    """The same seed gives the same tokens alone, beside another request, and after an unrelated request grew
    the KV cache (a pass's proposals are priced by the row alone; the cache is grown, not the pass skipped)."""
    draft = cl.load(checkpoint, quantize="int4")
    kw = dict(max_new_tokens=40, temperature=0.8, seed=3, speculate="draft")
    prompt = PROMPTS[0]
    alone = cl.load(checkpoint, draft=draft, max_batch_size=2).generate(prompt, **kw)
    model = cl.load(checkpoint, draft=draft, max_batch_size=2)
    assert _together(model, [(prompt, kw), ("import os\n", dict(max_new_tokens=40))])[0] == alone.text
    model = cl.load(checkpoint, draft=draft, max_batch_size=2)
    model.generate([1] * 300, max_new_tokens=1)  # the cache grows past what `prompt` needs
    assert model.generate(prompt, **kw).token_ids == alone.token_ids


def test_lookup_sampling_beside_drafted_sampling_keeps_plain_sampling_tokens(monkeypatch):
    """A pass with a drafted sampling row verifies by speculative sampling: a lookup row that samples proposes
    nothing in it, so its tokens stay plain sampling's (passes priced as free, so lookup proposes whenever it
    can)."""
    from codellama_rt.engine import speculation

    monkeypatch.setattr(speculation.PassCosts, "relative", lambda self, batch, width: 1.0)
    prompt = "def f(a, b):\n    return a + b\n\ndef g(a, b):\n    return a + b\n\ndef h(a, b):\n    return a +"
    plain = cl.load()  # (the default model: it copies enough for lookup to propose)
    model = cl.load(max_batch_size=2, draft=cl.load(quantize="int4"))
    _together(model, [(prompt, dict(max_new_tokens=4)), ("x", dict(max_new_tokens=4))])  # a batch-2 step timed
    for seed in (5, 6, 7):
        kw = dict(max_new_tokens=60, temperature=1.0, seed=seed)
        got = _together(model, [(prompt, dict(kw, speculate="lookup")),
                                (prompt, dict(kw, seed=100 + seed, speculate="draft"))])[0]
        assert got == plain.generate(prompt, **kw).text, seed


def test_draft_model_checks(checkpoint, tmp_path, tiny_tokenizer):
    other = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=1000, max_seq_len=512)
    path = write_random_checkpoint(tmp_path / "small", other, tiny_tokenizer)
    cl.load(checkpoint, draft=path)  # a smaller model with the same tokenizer: fine
    with pytest.raises(ValueError, match="draft model was loaded for 64 positions"):
        cl.load(checkpoint, draft=cl.load(path, max_seq_len=64))
    with pytest.raises(ValueError, match="tokenizer"):
        cl.load(checkpoint, draft=cl.load(None))  # the default model: another tokenizer


# ---- CUDA graphs (need a GPU) ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("sampling", SAMPLINGS[:3])
def test_graphed_verify_passes_equal_plain_decoding(checkpoint, sampling):
    """On CUDA the verify passes are captured into graphs (one per width) and replayed: tokens equal plain
    graphed decoding's, every proposal kind, three requests at once; a draft model's greedy tokens too."""
    model = cl.load(checkpoint, device="cuda", max_batch_size=3)
    prompts = ids_of(model, PROMPTS[:3])
    plain = run(model, prompts, 40, **sampling)
    V = model.args.vocab_size
    for proposer in (oracle_of(plain), liar_of(plain, V), half_of(plain, V), lambda i: PromptLookup(prompts[i])):
        assert [c.token_ids for c in run(model, prompts, 40, proposer, **sampling)] == \
            [c.token_ids for c in plain]
    verify_keys = [k for k in model.engine.steps() if k[0] == "verify"]
    assert verify_keys and model.engine.captures >= len(verify_keys)
    if not sampling:
        drafted = cl.load(checkpoint, device="cuda", max_batch_size=3,
                          draft=cl.load(checkpoint, device="cuda", max_batch_size=3, quantize="int4"))
        got = run(drafted, prompts, 40, speculate="draft", num_speculative_tokens=4)
        assert [c.token_ids for c in got] == [c.token_ids for c in plain]


@pytest.mark.gpu
@pytest.mark.experiment
def test_draft_graphs_on_cuda_propose_the_models_own_tokens(checkpoint):
    """The experiment "draft_graphs": greedy draft runs captured as CUDA graphs (one per row and length); a draft
    that is the model itself has nearly every proposal accepted (its steps and the verify pass attend through
    different kernels: a bf16 near-tie may differ), and the tokens are plain decoding's."""
    options = {"experiments": ["draft_graphs"]}
    model = cl.load(checkpoint, device="cuda", max_batch_size=2)
    prompts = ids_of(model, PROMPTS[:2])
    plain = run(model, prompts, 40)
    drafted = cl.load(checkpoint, device="cuda", max_batch_size=2, kernel_options=options,
                      draft=cl.load(checkpoint, device="cuda", max_batch_size=2, kernel_options=options))
    draft = drafted.engine.speculator.draft
    assert draft.graphed
    got = run(drafted, prompts, 40, speculate="draft", num_speculative_tokens=8)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]
    assert sum(c.speculation.accepted for c in got) >= 0.9 * sum(c.speculation.proposed for c in got) > 0
    assert draft._runs and all(r.graph is not None for r in draft._runs.values())


def test_requests_of_different_lengths_and_a_cancelled_stream(checkpoint):
    """Three speculating requests of different lengths share passes: each ends at its own max_new_tokens with
    plain decoding's tokens; a speculative stream closed early is cancelled, its slot freed, and the next
    request gets plain decoding's tokens."""
    model = cl.load(checkpoint, max_batch_size=3)
    prompts = ids_of(model, PROMPTS[:3])
    full = run(model, prompts, 30)
    engine = model.engine
    saved = engine.speculator.proposers["lookup"]
    index = {tuple(p): i for i, p in enumerate(prompts)}
    engine.speculator.proposers["lookup"] = lambda r: oracle_of(full)(index[tuple(r.prompt)])
    try:
        got = []
        for i, n in enumerate((3, 17, 30)):
            got.append(engine.run([prompts[i]], SamplingParams(max_new_tokens=n, speculate="lookup"), {}))
        events = [iter(r) for r in got]
        done = [False] * 3
        while not all(done):  # interleave the three runs on this thread
            for i, it in enumerate(events):
                if not done[i]:
                    done[i] = next(it, None) is None
        assert [r.completions[0].token_ids for r in got] == [c.token_ids[:n] for c, n in zip(full, (3, 17, 30))]
    finally:
        engine.speculator.proposers["lookup"] = saved
    stream = model.stream(PROMPTS[4] * 3, max_new_tokens=64, speculate="lookup")
    next(stream)
    stream.close()
    assert not engine._running  # the closed stream freed its slot
    again = model.generate(PROMPTS[0], max_new_tokens=20, speculate="lookup")
    assert again.token_ids == full[0].token_ids[:20]


def test_verify_capture_leaves_every_buffer_as_found_and_replays_what_eager_runs(monkeypatch):
    """`capture_step` on a verify pass, on CPU with torch.cuda's stream and graph calls faked: the warm-up
    passes are undone (decode and verify buffers, counters included), and the graph's replays give the
    eager passes' outputs."""

    from codellama_rt.engine.decode_graph import capture_step
    from codellama_rt.engine.verify_graph import VerifyStep
    from test_decode_graph import fake_cuda_capture

    def fresh():
        model, module, cache, buffers, vbuf = verify_fixture(3)
        reset_rows(buffers, 3, SamplingParams(temperature=0.8, top_k=5, repetition_penalty=1.1), 7)
        for b in range(3):
            vbuf.set_row(b, [5, 6, 7, 8][:b + 2])
        step = VerifyStep(module, cache, buffers, vbuf, 3, 4, Stages(True, True, True, True))
        return step, {**buffers.tensors(), **{f"v.{k}": t for k, t in vbuf.tensors().items()}}

    eager, _ = fresh()
    want = []
    for _ in range(2):
        eager()
        want.append(eager.vbuf.out[:3].clone())
    step, named = fresh()
    before = {k: t.clone() for k, t in named.items()}
    fake_cuda_capture(monkeypatch, named)
    step.graph = capture_step(step._step, named, "cpu", "pool")
    assert all(torch.equal(named[k], t) for k, t in before.items())
    step.graph = type("Graph", (), {"replay": lambda self: step._step()})()
    got = []
    for _ in range(2):
        step()
        got.append(step.vbuf.out[:3].clone())
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.usefixtures("static_pricing")
def test_mixed_batch_shares_passes(checkpoint, backend):
    """One request speculates (oracle), one does not, one samples plainly: passes run for the batch, the
    non-speculating rows get one token per pass, and all three get plain decoding's tokens."""
    model = cl.load(checkpoint, backend=backend, max_batch_size=3)
    prompts = ids_of(model, PROMPTS[:3])
    values = [dict(), dict(), dict(temperature=0.8, seed=9)]
    plain = [run(model, [p], 30, **v)[0] for p, v in zip(prompts, values)]
    engine = model.engine
    saved = engine.speculator.proposers["lookup"]
    engine.speculator.proposers["lookup"] = lambda r: Scripted(lambda done: plain[0].token_ids[done:])
    try:
        runs = [engine.run([prompts[0]], SamplingParams(max_new_tokens=30, speculate="lookup"), {}),
                engine.run([prompts[1]], SamplingParams(max_new_tokens=30), {}),
                engine.run([prompts[2]], SamplingParams(max_new_tokens=30, **values[2]), {})]
        its, done = [iter(r) for r in runs], [False] * 3
        while not all(done):
            for i, it in enumerate(its):
                if not done[i]:
                    done[i] = next(it, None) is None
    finally:
        engine.speculator.proposers["lookup"] = saved
    assert [r.completions[0].token_ids for r in runs] == [c.token_ids for c in plain]
    assert runs[0].completions[0].speculation.verifies > 0
    assert engine.metrics.snapshot()["verify_steps"] > 0
