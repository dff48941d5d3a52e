"""Fixtures shared by the kernel tests: NaN-filled fresh outputs and the AOT compile check."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.kernels._triton import SHARED_LIMIT, compile_for

ARCHS = (80, 90)


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors during the test, so an output
    element a launcher allocates but its kernel never writes shows up as NaN (inputs have none)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.device.type != "meta" else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


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
