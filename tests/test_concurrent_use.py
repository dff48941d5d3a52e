"""One model, several callers: until the serving engine runs them together, a second generation while
one is live (another thread, a second live stream, an abandoned stream) raises ModelBusyError; it never
returns another request's tokens, and the running generation is unaffected."""
from __future__ import annotations

import threading
import time

import pytest

import codellama_rt as cl
from nan_poison import nan_filled

PROMPTS = ["def parse(line):\n    key, value =", "import os\n\ndef walk(root):", "class Stack:\n    def push("]
N = 24


@pytest.fixture(scope="module")
def model():
    return cl.load(max_batch_size=2)  # the embedded default model, on the CPU


@pytest.fixture(scope="module")
def solo(model):
    """What each prompt gives alone (greedy and seeded sampling)."""
    return {(p, s): model.generate(p, max_new_tokens=N, **dict(s)).text for p in PROMPTS
            for s in ((), (("temperature", 0.8), ("seed", 3)))}


def test_generate_while_a_stream_is_live_raises_and_the_stream_is_unharmed(model, solo):
    stream = model.stream(PROMPTS[0], max_new_tokens=N)
    text = next(stream)
    with pytest.raises(cl.ModelBusyError, match="busy with another generation"):
        model.generate(PROMPTS[1], max_new_tokens=N)
    with pytest.raises(cl.ModelBusyError):
        model.infill("def f(x):\n    ", "\n    return y\n")
    text += "".join(stream)
    assert text == solo[(PROMPTS[0], ())]
    assert model.generate(PROMPTS[1], max_new_tokens=N).text == solo[(PROMPTS[1], ())]  # free again


def test_two_interleaved_streams_in_one_thread(model, solo):
    first = model.stream(PROMPTS[0], max_new_tokens=N)
    second = model.stream(PROMPTS[1], max_new_tokens=N, temperature=0.8, seed=3)
    text = next(first)
    with pytest.raises(cl.ModelBusyError):
        next(second)
    text += "".join(first)
    assert text == solo[(PROMPTS[0], ())]


def test_abandoned_stream_blocks_until_closed_and_cannot_resume_after(model, solo):
    abandoned = model.stream(PROMPTS[0], max_new_tokens=N)
    next(abandoned)
    with pytest.raises(cl.ModelBusyError, match="close"):
        model.generate(PROMPTS[1], max_new_tokens=N)
    abandoned.close()
    assert model.generate(PROMPTS[1], max_new_tokens=N).text == solo[(PROMPTS[1], ())]
    assert list(abandoned) == []  # a closed stream stays finished: it never continues another's state


def test_a_dropped_stream_frees_the_model(model, solo):
    for piece in model.stream(PROMPTS[0], max_new_tokens=N):
        break
    assert model.generate(PROMPTS[2], max_new_tokens=N).text == solo[(PROMPTS[2], ())]


def test_a_stream_not_yet_read_holds_nothing(model, solo):
    pending = model.stream(PROMPTS[0], max_new_tokens=N)
    assert model.generate(PROMPTS[1], max_new_tokens=N).text == solo[(PROMPTS[1], ())]
    assert "".join(pending) == solo[(PROMPTS[0], ())]


def test_a_failed_generation_frees_the_model(model, solo):
    with nan_filled(model.module.norm), pytest.raises(FloatingPointError):
        model.generate(PROMPTS[0], max_new_tokens=N)
    assert model.generate(PROMPTS[0], max_new_tokens=N).text == solo[(PROMPTS[0], ())]


@pytest.mark.slow
def test_threads_get_their_own_result_or_busy_never_another_text(model, solo):
    """Threads generating at once on one model: every call returns exactly its solo text or raises
    ModelBusyError (bounded: 4 threads x 6 calls)."""
    results, errors = [], []
    start = threading.Barrier(4)

    def worker(i):
        start.wait()
        for j in range(6):
            key = (PROMPTS[(i + j) % len(PROMPTS)], () if (i + j) % 2 else (("temperature", 0.8), ("seed", 3)))
            try:
                results.append((key, model.generate(key[0], max_new_tokens=N, **dict(key[1])).text))
            except cl.ModelBusyError:
                results.append((key, None))
            except Exception as e:  # anything else is a failure of the test
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a generation hung"
    assert not errors, errors
    assert len(results) == 24
    served = [(key, text) for key, text in results if text is not None]
    assert served, "no call was served"
    for key, text in served:
        assert text == solo[key]


def test_a_stream_held_by_another_thread(model, solo):
    """Thread A holds a stream open; the main thread is refused; A's text is its solo text."""
    started, release, out = threading.Event(), threading.Event(), []

    def holder():
        stream = model.stream(PROMPTS[2], max_new_tokens=N, temperature=0.8, seed=3)
        text = next(stream)
        started.set()
        release.wait(timeout=60)
        out.append(text + "".join(stream))

    t = threading.Thread(target=holder)
    t.start()
    assert started.wait(timeout=120)
    try:
        with pytest.raises(cl.ModelBusyError):
            model.generate(PROMPTS[0], max_new_tokens=N)
    finally:
        release.set()
        t.join(timeout=120)
    assert out == [solo[(PROMPTS[2], (("temperature", 0.8), ("seed", 3)))]]


def test_a_run_iterates_once(model):
    run = model.engine.run([model.tokenizer.encode(PROMPTS[0])], cl.SamplingParams(max_new_tokens=2), {})
    iter(run)
    with pytest.raises(RuntimeError, match="only once"):
        iter(run)
