"""Slot choice (`codellama_rt.engine.slots.SlotTable`): requests run in the lowest free slot, so decode
batches stay packed; records (cached prompt prefixes) are reused in place, copied from any slot, or saved to
a free slot holding an empty or older record rather than overwritten; and, on an engine, unrelated
requests one after another all decode as a batch of one while each keeps its cached prefix."""
from __future__ import annotations

import queue

import pytest

import codellama_rt as cl
from codellama_rt.engine.events import Completion
from codellama_rt.engine.sampling import SamplingParams
from codellama_rt.engine.scheduler import Engine
from codellama_rt.engine.slots import Placement, SlotTable, common_prefix

A = [1, 10, 11, 12, 13, 14, 15, 16]
B = [1, 20, 21, 22, 23, 24, 25, 26]
C = [1, 30, 31, 32, 33, 34]


def table(records, busy=(), limit=100) -> SlotTable:
    """A table whose slot s holds records[s], taken in that order (slot 0 least recently used)."""
    t = SlotTable(len(records), limit)
    for s, ids in enumerate(records):
        if ids:
            t.take(Placement(s, 0, None, None), object(), ids)
            t.record(s, ids)
            t.owner[s] = None
    for s in busy:
        t.owner[s] = object()
    return t


def test_common_prefix():
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_an_empty_table_places_in_slot_zero_and_a_full_one_nowhere():
    t = table([[], [], []])
    assert t.choose(A) == Placement(0, 0, None, None)
    assert table([A, B], busy=(0, 1)).choose(A) is None


def test_requests_take_the_lowest_free_slot():
    t = table([[], [], [], []], busy=(0, 2))
    assert t.choose(C).slot == 1
    t.owner[1] = object()
    assert t.choose(C).slot == 3


def test_an_own_record_mostly_reused_stays_in_place():
    t = table([A + [40, 41], []])
    assert t.choose(A[:6] + [50]) == Placement(0, 6, None, None)  # reuses 6, overwrites 4: kept in place


def test_a_record_the_request_would_lose_moves_to_an_empty_slot():
    t = table([A, [], []])
    place = t.choose(B)  # shares only BOS with A
    assert place == Placement(0, 1, None, 1)
    t.take(place, object(), B)
    assert t.tokens[1] == A and t.tokens[0] == [1] and t.owner[0] is not None


def test_a_prefix_in_another_slot_is_copied_and_the_lowest_slot_record_saved():
    t = table([B, A, []], busy=(1,))  # A's record in a busy slot still serves (its prompt positions are final)
    place = t.choose(A[:5] + [60, 61])
    assert place == Placement(0, 5, 1, 2)  # B saved to slot 2 first, then A's 5 positions copied from slot 1
    t.take(place, object(), A[:5] + [60, 61])
    assert t.tokens[2] == B and t.tokens[0] == A[:5]


def test_reuse_leaves_the_last_prompt_token_to_compute():
    t = table([A, []])
    assert t.choose(A).reuse == len(A) - 1 and t.choose(A[:1]).reuse == 0


def test_the_least_recently_used_record_is_the_one_dropped():
    t = table([A, B, C])  # A oldest, then B, then C
    place = t.choose([1, 70, 71])
    assert place.slot == 0 and place.save_to is None  # A is older than every other record: dropped
    t = table([B, A, C])
    t.used[0] = 10  # slot 0's record (B) is the newest: it replaces the oldest other one (A in slot 1)
    assert t.choose([1, 70, 71]) == Placement(0, 1, None, 1)


def test_a_source_record_is_never_the_one_overwritten():
    t = table([B, A])
    place = t.choose(A[:6] + [9])
    assert place == Placement(0, 6, 1, None)  # the only other free slot is the source: B is dropped


def test_serving_a_source_makes_it_recently_used():
    t = table([B, A, C])
    place = t.choose(A[:6] + [9])
    t.take(place, object(), A[:6] + [9])
    assert t.used[1] == max(t.used)


def test_records_are_capped_at_the_limit():
    t = table([[]], limit=4)
    t.record(0, A)
    assert t.tokens[0] == A[:4]


@pytest.fixture(scope="module")
def model():
    return cl.load(max_batch_size=1)


def _run(engine, ids, n=6) -> Completion:
    events: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(ids, SamplingParams(max_new_tokens=n), {}, sink=events.put)
    while True:
        event = events.get(timeout=120)
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Completion):
            return event


def test_unrelated_requests_one_after_another_decode_alone_and_keep_their_prefixes(model):
    """Each runs in slot 0 (every decode step a batch of one, not up to the slot it landed in), and the
    records they leave are saved to the other slots: coming back to the first prompt reuses it."""
    tok = model.tokenizer
    prompts = [tok.encode(text) for text in ("def area(radius):\n    return", "class Point:\n    def __init__(",
                                              "import json\n\ndef load(path):\n    with open(path) as f:")]
    engine = Engine(model.module, tok, max_batch=4, max_seq_len=model.max_seq_len)
    for ids in prompts:
        assert _run(engine, ids).cached_tokens <= 1  # at most BOS in common with another
    assert {batch for batch, _ in engine.steps()} == {1}
    again = _run(engine, prompts[0] + tok.encode(" 3.14", add_bos=False))
    assert again.cached_tokens >= len(prompts[0]) - 1
    assert again.text == model.generate(prompts[0] + tok.encode(" 3.14", add_bos=False), max_new_tokens=6).text
    assert {batch for batch, _ in engine.steps()} == {1}
