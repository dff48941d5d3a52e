"""Extreme sampling values, broken numerics and sizes past memory: every bad value is a ValueError naming
its parameter at the call; tiny temperatures are greedy; non-finite logits are an error, not a stream of
id 0; distinct top_k values share decode steps; ids the tokenizer lacks are never generated; max_seq_len
is bounded; a KV cache or model that cannot be allocated is a MemoryError saying what was asked for."""
from __future__ import annotations

import pytest
import torch

import codellama_rt as cl
from codellama_rt.api import LONG_CONTEXT
from codellama_rt.engine.decode_graph import NONFINITE, DecodeStep
from codellama_rt.model.kv_cache import KVCache
from codellama_rt.engine.sampling import SamplingParams, SamplingSignature, filter_top_k_top_p, top_k_bucket
from codellama_rt.tiny import write_random_checkpoint
from nan_poison import nan_filled

PROMPT = "def parse(line):\n    key, value ="


@pytest.fixture(scope="module")
def model():
    return cl.load()  # the embedded default model (rope theta 1e6, context 1024, 4096 pieces)


@pytest.mark.parametrize("name,value", [
    ("temperature", 1e308), ("temperature", 1e5), ("repetition_penalty", 1e300), ("repetition_penalty", 1e-300),
    ("repetition_penalty", float("inf")), ("seed", 2 ** 64), ("seed", -1), ("seed", 1.0), ("stop", 5),
    ("stop", {"a": 1}), ("stop", b"\n"), ("top_k", True), ("max_new_tokens", None),
])
def test_bad_values_raise_at_the_call_naming_the_parameter(model, name, value):
    for call in (model.generate, model.stream):  # stream checks at the call, not at the first next()
        with pytest.raises(ValueError, match=f"^{name}="):
            call(PROMPT, **{name: value})


def test_largest_seed_works(model):
    a = model.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=2 ** 64 - 1)
    b = model.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=2 ** 64 - 1)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 5e-324, 1e-6])
def test_tiny_temperature_is_greedy(model, temperature):
    greedy = model.generate(PROMPT, max_new_tokens=16)
    got = model.generate(PROMPT, max_new_tokens=16, temperature=temperature, top_k=5, top_p=0.5, seed=0)
    assert SamplingParams(temperature=temperature).greedy
    assert got.token_ids == greedy.token_ids and 0 not in got.token_ids


def test_largest_temperature_samples_without_overflow(model):
    got = model.generate(PROMPT, max_new_tokens=16, temperature=1e4, repetition_penalty=1e6, seed=1)
    assert len(got.token_ids) == 16 and len(set(got.token_ids)) > 4  # near-uniform draws, not id 0


def test_nonfinite_logits_raise_naming_the_cause(model):
    with nan_filled(model.module.norm):
        for sampling in (dict(), dict(temperature=0.7, top_k=5, seed=0)):
            with pytest.raises(FloatingPointError, match="not finite"):
                model.generate(PROMPT, max_new_tokens=4, **sampling)


def test_step_marks_rows_whose_logits_are_not_finite(model):
    """The first tokens a step samples (`start`, from the prefill's logits): NONFINITE for a row with NaN,
    +inf or only -inf logits, the argmax for a finite row."""
    cache = KVCache(model.args, 4, 16, model.module.dtype, model.module.device)
    V = model.args.vocab_size
    greedy = SamplingParams()
    step = DecodeStep(model.module, cache, 4, SamplingSignature.of(greedy, V))
    logits = torch.randn(4, V)
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    logits[3] = float("-inf")
    step.start(logits.clone(), [[1]] * 4, greedy)
    got = step.tokens.tolist()
    assert got[0] == int(torch.argmax(logits[0])) and got[1:] == [NONFINITE] * 3


def test_top_k_as_a_device_value_matches_transformers():
    """One top-k width (the bucket) serves every top_k value in it, with transformers' result."""
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)) * 2
    for k in (1, 2, 3, 5, 8, 9, 31, 64, 100, 255, 299):
        width = top_k_bucket(k, 300)
        assert width >= k and (width == 300 or width & (width - 1) == 0)
        got = filter_top_k_top_p(logits, torch.tensor(k), 1.0, nucleus=False, k_width=width)
        expected = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), k


@pytest.mark.slow
def test_distinct_top_k_values_share_decode_steps(model):
    """300 top_k values build at most one step per bucket (log2 of the vocabulary), not 300."""
    before = len(model.engine._steps)
    for k in range(1, 301):
        model.generate(PROMPT, max_new_tokens=2, temperature=1.0, top_k=k, seed=k)
    buckets = {top_k_bucket(k, model.args.vocab_size) for k in range(1, 301)}
    assert len(model.engine._steps) <= before + len(buckets) <= before + 10


@pytest.mark.slow
def test_top_k_values_in_one_bucket_give_their_own_tokens(model):
    """A step built for top_k=5 (bucket 8) then serves top_k=7 exactly as a fresh model would."""
    model.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=5, seed=3)
    reused = model.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=7, seed=3)
    fresh = cl.load().generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=7, seed=3)
    assert reused.token_ids == fresh.token_ids


def test_decode_steps_are_bounded_least_recent_first(model, monkeypatch):
    import codellama_rt.engine.generate as generate

    monkeypatch.setattr(generate, "MAX_DECODE_STEPS", 2)
    eng = model.engine
    for sampling in (dict(), dict(temperature=1.0, seed=0), dict(temperature=1.0, top_p=0.9, seed=0)):
        model.generate(PROMPT, max_new_tokens=2, **sampling)
    assert len(eng._steps) == 2
    sigs = [key[1] for key in eng._steps]
    assert not any(s.greedy for s in sigs) and any(s.top_p for s in sigs)  # the greedy one, oldest, went


@pytest.fixture(scope="module")
def padded_embedding(tmp_path_factory, tiny_tokenizer):
    """A checkpoint whose embedding has 16 rows past the tokenizer's 1000 pieces, and whose lm_head
    favours those rows: unmasked, greedy decoding would pick one at once."""
    from safetensors.torch import load_file, save_file

    args = cl.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=1016,
                        rope_theta=1e4, max_seq_len=256)
    directory = write_random_checkpoint(tmp_path_factory.mktemp("padded") / "ckpt", args, tiny_tokenizer)
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"][1000:] *= 50
    save_file(tensors, directory / "model.safetensors")
    return directory


def test_ids_past_the_tokenizer_are_never_generated(padded_embedding):
    model = cl.load(padded_embedding)
    assert model.tokenizer.vocab_size == 1000 and model.args.vocab_size == 1016
    prompt = model.tokenizer.encode(PROMPT)
    logits = model.logits(prompt)[0, -1]
    assert int(torch.argmax(logits)) >= 1000  # the padding rows would win
    greedy = model.generate(prompt, max_new_tokens=12)
    assert greedy.token_ids[0] == int(torch.argmax(logits[:1000]))
    assert all(t < 1000 for t in greedy.token_ids)
    for seed in range(3):
        sampled = model.generate(prompt, max_new_tokens=12, temperature=1.0, seed=seed)
        assert len(sampled.token_ids) == 12 and all(t < 1000 for t in sampled.token_ids)


def test_max_seq_len_is_bounded_by_the_model(model, hf_checkpoint):
    with pytest.raises(ValueError, match=r"max_seq_len=10000000 .* at most 100000"):
        cl.load(max_seq_len=10 ** 7)
    assert cl.load(max_seq_len=LONG_CONTEXT).max_seq_len == LONG_CONTEXT  # CodeLlama's rope base: 100k
    path, _ = hf_checkpoint(rope_theta=1e4, max_pos=512)  # a Llama-2 base: its config's context
    assert cl.load(path, max_seq_len=512).max_seq_len == 512
    with pytest.raises(ValueError, match=r"max_seq_len=513 .* at most 512"):
        cl.load(path, max_seq_len=513)


def test_a_kv_cache_past_memory_is_a_memory_error_naming_it():
    model = cl.load(max_batch_size=10 ** 6)  # the cache is allocated at the first generation: ~4 TB
    with pytest.raises(MemoryError, match=r"KV cache \(1000000 x 256 tokens"):
        model.generate(PROMPT, max_new_tokens=4)


def test_a_model_past_memory_is_a_memory_error(tiny):
    from codellama_rt.api import random_model

    args = cl.ModelArgs(dim=2 ** 20, n_layers=1, n_heads=2 ** 13, ffn_dim=2 ** 20, vocab_size=2 ** 20,
                        rope_theta=1e4, max_seq_len=256)
    with pytest.raises(MemoryError, match="not enough cpu memory for the model"):
        random_model(args, tiny, device="cpu")
