"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 at the configurations its launcher
uses (7B/34B/70B shapes), without register spills and within the card's shared memory."""
from __future__ import annotations

import pytest

from codellama_rt.kernels import aot


@pytest.fixture(scope="module")
def table():
    return aot.resource_table()


def test_every_kernel_module_has_configs_for_both_archs(table):
    kernels = {r.kernel for r in table}
    assert len(kernels) >= len(aot.KERNEL_MODULES)
    for k in kernels:
        assert {r.arch for r in table if r.kernel == k} == set(aot.ARCHS), k


def test_no_spills_and_shared_memory_within_limits(table):
    print("\n" + aot.format_table(table))
    assert aot.problems(table) == []
    assert all(r.registers > 0 for r in table)
