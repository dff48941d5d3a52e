"""The suite's collection hook (tests/conftest.py): experiment tests run after all others."""
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
