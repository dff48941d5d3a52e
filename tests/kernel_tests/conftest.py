"""Fixtures shared by the kernel tests: the AOT compile check (NaN-filled fresh outputs, `nan_empty`, are
tests/conftest.py's)."""
from __future__ import annotations

import pytest

from codellama_rt.kernels._triton import SHARED_LIMIT, compile_for

ARCHS = (80, 90)


@pytest.fixture
def check_aot():
    """check_aot(configs): compile every LaunchConfig for sm_80 and sm_90, print the resource rows, and
    assert no spills and shared memory within the card's limit."""

    def check(configs):
        assert configs, "aot_configs() is empty"
        rows = [compile_for(cfg, arch) for cfg in configs for arch in ARCHS]
        print()
        for r in rows:
            print(f"{r.kernel} [{r.label}] sm_{r.arch}: warps={r.num_warps} registers={r.registers} "
                  f"shared={r.shared_bytes} B stack={r.stack_bytes} B local={r.local_bytes} B")
        for r in rows:
            where = f"{r.kernel} [{r.label}] sm_{r.arch}"
            assert not r.spills, f"{where} spills: stack {r.stack_bytes} B, local {r.local_bytes} B"
            assert r.shared_bytes <= SHARED_LIMIT[r.arch], f"{where}: shared {r.shared_bytes} B"
            assert r.registers > 0
        return rows

    return check
