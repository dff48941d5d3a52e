"""The suite's collection hook (tests/conftest.py): experiment tests run after all others; under xdist, slow
tests first within each group."""
from __future__ import annotations

from conftest import pytest_collection_modifyitems


class _Item:
    def __init__(self, name, *marks):
        self.name, self.keywords, self.markers = name, {name: 1, **{m: 1 for m in marks}}, []

    def add_marker(self, marker):
        self.markers.append(marker)


def test_experiment_tests_run_last_in_their_order():
    items = [_Item("a", "gpu", "experiment"), _Item("b"), _Item("c", "experiment"), _Item("d", "gpu")]
    pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["b", "d", "a", "c"]


class _Config:
    def __init__(self, worker):
        if worker:
            self.workerinput = {}


def test_under_xdist_slow_tests_run_first_and_experiments_still_last():
    for worker, want in ((False, ["b", "s", "d", "a", "c"]), (True, ["s", "b", "d", "c", "a"])):
        items = [_Item("a", "gpu", "experiment"), _Item("b"), _Item("s", "slow"), _Item("c", "experiment", "slow"),
                 _Item("d", "gpu")]
        pytest_collection_modifyitems(_Config(worker), items)
        assert [i.name for i in items] == want, worker
