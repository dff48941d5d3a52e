"""Who runs the engine's iterations (`codellama_rt.engine.driver.Driver`): a synchronous caller runs its
own generation on its own thread (no loop thread: on a CPU a second thread's OpenMP team is slow), background
submissions get a loop thread that ends when the work does, a thread in run_forever takes both, and any
mix of them finishes every request with its solo text."""
from __future__ import annotations

import queue
import threading

import pytest

import codellama_rt as cl
from codellama_rt.engine.events import Completion
from codellama_rt.engine.sampling import SamplingParams
from codellama_rt.engine.scheduler import Engine

PROMPT = "def parse(line):\n    key, value ="


@pytest.fixture(scope="module")
def model():
    return cl.load(max_batch_size=4)


@pytest.fixture
def forward_threads(model, monkeypatch):
    """The threads the model's forward pass runs on: the module graph's, or the CPU's native step (which prefills
    and decodes where the extension is built)."""
    from codellama_rt.model.native_decoder import native_decoder

    seen = set()
    forward = type(model.module).forward

    def recording(self, *args, **kwargs):
        seen.add(threading.current_thread())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model.module), "forward", recording)
    step = native_decoder(model.module)
    if step is not None:
        def recording_step(*args, **kwargs):
            seen.add(threading.current_thread())
            return step(*args, **kwargs)

        monkeypatch.setitem(model.module.__dict__, "_native_decoder", recording_step)
    return seen


def _engine(model) -> Engine:
    return Engine(model.module, model.tokenizer, max_batch=4, max_seq_len=model.max_seq_len)


def _completion(events: queue.SimpleQueue, timeout=120.0) -> Completion:
    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Completion):
            return event


def test_a_generation_runs_on_the_calling_thread(model, forward_threads):
    want = model.generate(PROMPT, max_new_tokens=8).text
    forward_threads.clear()
    for _ in model.stream(PROMPT, max_new_tokens=8):
        assert not model.engine.driver.alive()
    assert forward_threads == {threading.main_thread()}
    got = []
    thread = threading.Thread(target=lambda: got.append(model.generate(PROMPT, max_new_tokens=8).text))
    thread.start()
    thread.join(timeout=120)
    assert got == [want] and forward_threads == {threading.main_thread(), thread}


def test_background_submissions_get_a_loop_thread_that_ends_with_the_work(model, forward_threads):
    engine = _engine(model)
    events: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(model.tokenizer.encode(PROMPT), SamplingParams(max_new_tokens=8), {}, sink=events.put)
    got = _completion(events)
    assert got.text == model.generate(PROMPT, max_new_tokens=8).text
    loop_threads = {t for t in forward_threads if t.name == "codellama-rt-engine"}
    assert loop_threads and threading.main_thread() in forward_threads
    for t in loop_threads:
        t.join(timeout=30)
    assert not engine.driver.alive()


def test_run_forever_takes_every_submission_and_starts_no_loop_thread(model, forward_threads):
    engine = _engine(model)
    stop = threading.Event()
    resident = threading.Thread(target=engine.driver.run_forever, args=(stop,), name="resident")
    resident.start()
    try:
        events: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(3):
            engine.submit(model.tokenizer.encode(PROMPT), SamplingParams(max_new_tokens=6), {}, sink=events.put)
            _completion(events)
        assert forward_threads == {resident} and not engine.driver.alive()
    finally:
        stop.set()
        resident.join(timeout=30)
    assert not resident.is_alive()


def test_background_and_caller_driven_requests_mixed_all_finish(model):
    """A long background request, then synchronous generations from two threads while it runs, then the
    background one still runs to its end after they return (nobody is left waiting for a driver)."""
    engine = _engine(model)
    tok = model.tokenizer
    events: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(tok.encode(PROMPT), SamplingParams(max_new_tokens=120), {}, sink=events.put)
    want = model.generate("import os\n", max_new_tokens=10).text
    results = []

    def sync_call():
        run = engine.run([tok.encode("import os\n")], SamplingParams(max_new_tokens=10), {})
        results.append("".join(piece for _, piece in run))

    threads = [threading.Thread(target=sync_call) for _ in range(2)]
    for t in threads:
        t.start()
    sync_call()
    for t in threads:
        t.join(timeout=120)
    assert results == [want] * 3
    background = _completion(events)
    assert len(background.token_ids) == 120 or background.finish_reason == "eos"
    assert background.text == model.generate(PROMPT, max_new_tokens=120).text


def test_an_interrupt_while_driving_ends_the_running_requests_and_leaves_the_engine_usable(model, monkeypatch):
    """A KeyboardInterrupt on the driving caller's thread mid-step (its state half-updated) fails every running
    request with it, frees their slots, and reaches the caller; the next generation is right."""
    engine = _engine(model)
    tok = model.tokenizer
    other: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(tok.encode("import os\n"), SamplingParams(max_new_tokens=50), {}, sink=other.put,
                  background=False)
    calls = []
    decode = Engine._decode

    def interrupted(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode(self)

    monkeypatch.setattr(Engine, "_decode", interrupted)
    run = engine.run([tok.encode(PROMPT)], SamplingParams(max_new_tokens=20), {})
    with pytest.raises(KeyboardInterrupt):
        for _ in run:
            pass
    events = [other.get_nowait() for _ in range(other.qsize())]
    assert isinstance(events[-1], KeyboardInterrupt)
    assert engine.idle() and all(owner is None for owner in engine._slots.owner)
    monkeypatch.undo()
    run = engine.run([tok.encode(PROMPT)], SamplingParams(max_new_tokens=8), {})
    assert "".join(piece for _, piece in run) == model.generate(PROMPT, max_new_tokens=8).text
