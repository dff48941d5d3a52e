"""One model, several callers at once: threads and interleaved streams share the serving engine's
batch, and each gets exactly the text it gets alone (greedy and seeded sampling alike)."""
from __future__ import annotations

import threading
import time

import pytest

import codellama_rt as cl
from nan_poison import nan_filled

PROMPTS = ["def parse(line):\n    key, value =", "import os\n\ndef walk(root):", "class Stack:\n    def push("]
SAMPLED = (("temperature", 0.8), ("seed", 3))
FILTERED = (("temperature", 1.1), ("top_k", 5), ("top_p", 0.8), ("repetition_penalty", 1.3), ("seed", 11))
N = 24


@pytest.fixture(scope="module")
def model():
    return cl.load(max_batch_size=4)  # the embedded default model, on the CPU


@pytest.fixture(scope="module")
def solo(model):
    """What each prompt gives alone, one request at a time (greedy and two seeded samplings)."""
    return {(p, s): model.generate(p, max_new_tokens=N, **dict(s)).text for p in PROMPTS
            for s in ((), SAMPLED, FILTERED)}


def _idle(model, timeout=30.0) -> bool:
    """True once the engine runs no request and holds no slot (it drops cancelled ones between steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = model.engine.metrics.snapshot()
        if snap["running"] == 0 and snap["waiting"] == 0 and not model.engine.driver.alive():
            return True
        time.sleep(0.01)
    return False


def test_generate_while_a_stream_is_live(model, solo):
    stream = model.stream(PROMPTS[0], max_new_tokens=N)
    text = next(stream)
    assert model.generate(PROMPTS[1], max_new_tokens=N).text == solo[(PROMPTS[1], ())]
    assert model.infill("def f(x):\n    ", "\n    return y\n", max_new_tokens=4).finish_reason in ("length", "eot")
    text += "".join(stream)
    assert text == solo[(PROMPTS[0], ())]


def test_interleaved_streams_with_mixed_sampling_in_one_thread(model, solo):
    """Three live streams, one greedy and two sampled with different values, read a piece at a time in
    turn: they decode in one batch, and each row's tokens are the ones it gets alone."""
    keys = [(PROMPTS[0], ()), (PROMPTS[1], SAMPLED), (PROMPTS[2], FILTERED)]
    streams = [model.stream(p, max_new_tokens=N, **dict(s)) for p, s in keys]
    texts = [""] * len(keys)
    live = list(range(len(keys)))
    while live:
        for i in list(live):
            piece = next(streams[i], None)
            if piece is None:
                live.remove(i)
            else:
                texts[i] += piece
    assert texts == [solo[k] for k in keys]


def test_a_closed_stream_frees_its_slot_and_stays_finished(model, solo):
    abandoned = model.stream(PROMPTS[0], max_new_tokens=N)
    next(abandoned)
    abandoned.close()
    assert _idle(model)
    assert model.engine.metrics.snapshot()["cancelled"] >= 1
    assert model.generate(PROMPTS[1], max_new_tokens=N).text == solo[(PROMPTS[1], ())]
    assert list(abandoned) == []  # a closed stream never continues


def test_a_dropped_stream_frees_the_model(model, solo):
    for piece in model.stream(PROMPTS[0], max_new_tokens=N):
        break
    assert model.generate(PROMPTS[2], max_new_tokens=N).text == solo[(PROMPTS[2], ())]
    assert _idle(model)


def test_a_stream_not_yet_read_holds_nothing(model, solo):
    pending = model.stream(PROMPTS[0], max_new_tokens=N)
    assert model.generate(PROMPTS[1], max_new_tokens=N).text == solo[(PROMPTS[1], ())]
    assert "".join(pending) == solo[(PROMPTS[0], ())]


def test_a_failed_generation_frees_the_model(model, solo):
    with nan_filled(model.module.norm), pytest.raises(FloatingPointError):
        model.generate(PROMPTS[0], max_new_tokens=N)
    assert _idle(model)
    assert model.generate(PROMPTS[0], max_new_tokens=N).text == solo[(PROMPTS[0], ())]


def test_more_prompts_than_slots_in_one_call(model, solo):
    prompts = PROMPTS * 3  # 9 requests, 4 slots: they queue and join the batch as slots free up
    got = model.generate(prompts, max_new_tokens=N, temperature=0.8, seed=3)
    assert [c.text for c in got] == [solo[(p, SAMPLED)] for p in prompts]


@pytest.mark.slow
def test_threads_each_get_their_own_text(model, solo):
    """4 threads x 6 calls at once on one model (generate and stream, greedy and sampled): every call
    returns exactly its solo text."""
    results, errors = [], []
    start = threading.Barrier(4)
    kinds = ((), SAMPLED, FILTERED)

    def worker(i):
        start.wait()
        for j in range(6):
            key = (PROMPTS[(i + j) % len(PROMPTS)], kinds[(i + 2 * j) % len(kinds)])
            try:
                if j % 2:
                    text = "".join(model.stream(key[0], max_new_tokens=N, **dict(key[1])))
                else:
                    text = model.generate(key[0], max_new_tokens=N, **dict(key[1])).text
                results.append((key, text))
            except Exception as e:  # anything is a failure of the test
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
    for key, text in results:
        assert text == solo[key], key
    assert _idle(model)


def test_a_stream_held_by_another_thread(model, solo):
    """Thread A holds a stream open; the main thread generates meanwhile; both get their solo text."""
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
        assert model.generate(PROMPTS[0], max_new_tokens=N).text == solo[(PROMPTS[0], ())]
    finally:
        release.set()
        t.join(timeout=120)
    assert out == [solo[(PROMPTS[2], SAMPLED)]]


def test_a_run_iterates_once(model):
    run = model.engine.run([model.tokenizer.encode(PROMPTS[0])], cl.SamplingParams(max_new_tokens=2), {})
    iter(run)
    with pytest.raises(RuntimeError, match="only once"):
        iter(run)
