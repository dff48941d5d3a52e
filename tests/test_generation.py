"""Generation behaviour: streaming, stop conditions, context limits, infilling, bad input."""
from __future__ import annotations

import pytest
import torch

import codellama_rt as cl

PROMPT = "def parse(line):\n    key, value ="


@pytest.fixture
def model(hf_checkpoint):
    path, _ = hf_checkpoint(n_heads=8, n_kv_heads=2, rope_theta=1e6)
    return cl.load(path, max_seq_len=128, max_batch_size=3)


def first_fresh_index(ids, start=2):
    """Index of a token that does not occur earlier in ids (so stopping on it stops exactly there)."""
    return next(i for i in range(start, len(ids)) if ids[i] not in ids[:i])


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_p=0.95, top_k=40, seed=5),
                                      dict(temperature=1.2, repetition_penalty=1.3, seed=11)])
def test_stream_concatenates_to_generate(model, sampling):
    done = model.generate(PROMPT, max_new_tokens=40, **sampling)
    pieces = list(model.stream(PROMPT, max_new_tokens=40, **sampling))
    assert "".join(pieces) == done.text
    assert all(pieces)


def test_text_is_the_exact_continuation_of_the_prompt(model):
    """prompt text + completion text == decode(prompt ids + generated ids): no space lost or added."""
    tok = model.tokenizer
    for prompt in (PROMPT, "x = 1\ny =", "import"):
        c = model.generate(prompt, max_new_tokens=30)
        assert prompt + c.text == tok.decode(tok.encode(prompt) + c.token_ids)


def test_seeded_sampling_reproducible_and_seed_matters(model):
    a = model.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=1)
    b = model.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=1)
    assert a.token_ids == b.token_ids
    others = {tuple(model.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=s).token_ids) for s in range(2, 6)}
    assert len(others | {tuple(a.token_ids)}) > 1


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    greedy = model.generate(PROMPT, max_new_tokens=20).token_ids
    assert model.generate(PROMPT, max_new_tokens=20, temperature=0.8, top_k=1, seed=0).token_ids == greedy
    assert model.generate(PROMPT, max_new_tokens=20, temperature=0.8, top_p=1e-9, seed=0).token_ids == greedy


def test_stop_string_cuts_text_and_stream(model):
    full = model.generate(PROMPT, max_new_tokens=40)
    assert len(full.text) > 12
    stop = full.text[6:9]
    cut = full.text[:full.text.find(stop)]
    got = model.generate(PROMPT, max_new_tokens=40, stop=["@@never@@", stop])
    assert got.text == cut and got.finish_reason == "stop"
    assert got.token_ids == full.token_ids[:len(got.token_ids)] and len(got.token_ids) < len(full.token_ids)
    pieces = list(model.stream(PROMPT, max_new_tokens=40, stop=[stop]))
    assert "".join(pieces) == cut


def test_eos_stops_and_is_not_returned(model):
    full = model.generate(PROMPT, max_new_tokens=30)
    i = first_fresh_index(full.token_ids)
    model.args.eos_ids = (full.token_ids[i],)
    got = model.generate(PROMPT, max_new_tokens=30)
    assert got.finish_reason == "eos" and got.token_ids == full.token_ids[:i]
    assert got.text == model.tokenizer.decode_in_context(full.token_ids[:i])


def test_infill_uses_meta_format_and_stops_at_eot(model, monkeypatch):
    tok = model.tokenizer
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    ids = tok.encode_infill(prefix, suffix)
    assert ids[:2] == [tok.bos_id, tok.prefix_id] and ids[-1] == tok.middle_id
    full = model.generate(ids, max_new_tokens=30)
    assert model.infill(prefix, suffix, max_new_tokens=30).token_ids == full.token_ids
    i = first_fresh_index(full.token_ids)
    monkeypatch.setattr(tok, "eot_id", full.token_ids[i])
    got = model.infill(prefix, suffix, max_new_tokens=30)
    assert got.finish_reason == "eot" and got.token_ids == full.token_ids[:i]
    assert got.text == tok.decode_infill(full.token_ids[:i])
    spm = model.infill(prefix, suffix, suffix_first=True, max_new_tokens=5)
    assert spm.prompt_tokens == len(tok.encode_infill(prefix, suffix, suffix_first=True))


def test_context_limit(model):
    ids = model.tokenizer.encode("a = 1\n" * 200)
    assert len(ids) > 128
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(ids)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.logits(ids)
    near = ids[:120]
    got = model.generate(near, max_new_tokens=50)
    assert got.finish_reason in ("length", "eos") and len(got.token_ids) <= 128 - 120
    if got.finish_reason == "length":
        assert len(got.token_ids) == 8
    assert model.generate(ids[:128], max_new_tokens=5).token_ids == []


def test_zero_new_tokens(model):
    got = model.generate(PROMPT, max_new_tokens=0)
    assert got.text == "" and got.token_ids == [] and got.finish_reason == "length"


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_new_tokens=-2), "max_new_tokens"), (dict(bogus=1), "bogus"),
])
def test_bad_sampling_arguments(model, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        model.generate(PROMPT, **kwargs)


@pytest.mark.parametrize("prompt,match", [([], "empty"), ([1, 10**6], "outside the vocabulary"),
                                          ([1, -5], "outside the vocabulary"), (3.5, "prompt")])
def test_bad_prompts(model, prompt, match):
    with pytest.raises(ValueError, match=match):
        model.generate(prompt)


@pytest.mark.parametrize("kwargs,name", [
    (dict(dtype=torch.float64), "dtype"), (dict(dtype="int8"), "dtype"), (dict(backend="nope"), "backend"),
    (dict(quantize="int3"), "quantize"), (dict(max_batch_size=0), "max_batch_size"),
    (dict(max_seq_len=0), "max_seq_len"), (dict(threads=0), "threads"), (dict(threads=True), "threads"),
    (dict(threads=1.5), "threads"), (dict(threads=10 ** 9), "threads"), (dict(draft=5), "draft=5"),
])
def test_bad_load_arguments(hf_checkpoint, kwargs, name):
    path, _ = hf_checkpoint()
    with pytest.raises(ValueError, match=name):
        cl.load(path, **kwargs)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(quantize="int8", group_size=64), "group_size=64 applies to quantize='int4' only"),
    (dict(group_size=64), "group_size"), (dict(quantize_head=True), "quantize_head=True needs quantize="),
])
def test_quantizer_knobs_without_their_method_are_refused(hf_checkpoint, kwargs, fragment):
    from codellama_rt.api import load_model

    path, _ = hf_checkpoint()
    with pytest.raises(ValueError, match=fragment):
        load_model(path, **kwargs)


@pytest.mark.parametrize("path, name", [(5, "path=5"), ("", "path=''")])
def test_bad_load_paths(path, name):
    with pytest.raises(ValueError, match=name):
        cl.load(path)


@pytest.mark.parametrize("token_ids", [torch.ones(0, 3, dtype=torch.long), [[1, 2], [3, 4]], "def f",
                                       torch.ones(1, 3, dtype=torch.long, device="meta")])
def test_bad_logits_input_names_token_ids(model, token_ids):
    with pytest.raises(ValueError, match="token_ids"):
        model.logits(token_ids)


def test_a_stream_closed_from_another_thread_stops(model, monkeypatch):
    """A UI thread cancelling the stream a worker thread reads, while the worker waits inside it for the next
    piece: the request is cancelled and the worker's loop ends (no 'generator already executing')."""
    import threading

    inside, release, calls = threading.Event(), threading.Event(), [0]
    next_event = model.engine.next_event

    def waiting_next_event(events):
        calls[0] += 1
        if calls[0] == 4:
            inside.set()
            release.wait(30)
        return next_event(events)

    monkeypatch.setattr(model.engine, "next_event", waiting_next_event)
    stream, pieces, failures = model.stream(PROMPT, max_new_tokens=100), [], []

    def read():
        try:
            pieces.extend(stream)
        except BaseException as e:  # (reported below)
            failures.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    assert inside.wait(30)
    stream.close()  # the reader is inside the stream's generator
    release.set()
    reader.join(60)
    assert not reader.is_alive() and not failures and len(pieces) < 10
    monkeypatch.undo()
    assert model.generate(PROMPT, max_new_tokens=3).token_ids  # the engine is free


def test_decode_step_keeps_static_buffers(model):
    """Decode steps write the cache in place: no reallocation, no shape change between steps or calls."""
    model.generate(PROMPT, max_new_tokens=2)
    cache = model.engine.cache
    ptr, shape = cache.data.data_ptr(), cache.data.shape
    model.generate([PROMPT, "import os"], max_new_tokens=20)
    assert model.engine.cache is cache
    assert cache.data.data_ptr() == ptr and cache.data.shape == shape


def test_streaming_does_not_leak_inference_mode_to_the_caller(model):
    states = [torch.is_inference_mode_enabled() for _ in model.stream(PROMPT, max_new_tokens=10)]
    assert states and not any(states)


def test_threads_sets_torchs_cpu_threads_and_keeps_the_tokens(hf_checkpoint):
    path, _ = hf_checkpoint()
    before = torch.get_num_threads()
    want = cl.load(path).generate(PROMPT, max_new_tokens=12).token_ids
    try:
        model = cl.load(path, threads=1)
        assert torch.get_num_threads() == 1
        assert model.generate(PROMPT, max_new_tokens=12).token_ids == want
    finally:
        torch.set_num_threads(before)
