"""Extreme sampling values, broken numerics and sizes past memory: every bad value is a ValueError naming
its parameter at the call; tiny temperatures are greedy; non-finite logits are an error, not a stream of
id 0; one decode step serves any top_k; ids the tokenizer lacks are never generated; max_seq_len
is bounded; a KV cache or model that cannot be allocated is a MemoryError saying what was asked for."""
from __future__ import annotations

import pytest
import torch

import codellama_rt as cl
from codellama_rt.api import LONG_CONTEXT
from codellama_rt.engine.sampling import SamplingParams
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


@pytest.mark.slow
def test_a_decode_step_used_for_one_top_k_serves_another_as_a_fresh_model_would(model):
    """top_k is a per-row device value: after top_k=5 the same decode step serves top_k=7 exactly as a fresh
    model would (the step count staying bounded whatever the values is test_serving_engine's)."""
    model.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=5, seed=3)
    reused = model.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=7, seed=3)
    fresh = cl.load().generate(PROMPT, max_new_tokens=12, temperature=1.0, top_k=7, seed=3)
    assert reused.token_ids == fresh.token_ids


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
        assert sampled.token_ids and all(t < 1000 for t in sampled.token_ids)
        assert len(sampled.token_ids) == 12 or sampled.finish_reason == "eos"


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
