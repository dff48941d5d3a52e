"""NaN poison, so that memory a computation should write but does not, or a value it should never
read, shows up as NaN in what it returns (the tests' inputs have none).

- `poisoned_like(t)`: an output buffer full of NaN, handed to a launcher;
- `nan_allocations(monkeypatch)`: torch.empty / torch.empty_like return NaN-filled floating tensors
  (the `nan_empty` fixture of tests/conftest.py), for buffers a launcher allocates itself;
- `nan_filled(t)`: a context manager that fills a tensor (a model's weight) with NaN and restores it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so an element the kernel fails to write fails the test."""
    return torch.full_like(t, float("nan"))


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if t.is_floating_point() and t.device.type != "meta" else t


def nan_allocations(monkeypatch) -> None:
    """torch.empty / torch.empty_like return NaN-filled floating tensors until `monkeypatch` is undone, so an
    output element a launcher allocates but its kernel never writes shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))


@contextmanager
def nan_filled(t: torch.Tensor):
    """Within the block, `t` (a parameter, say a model's final norm) holds NaN; its values come back after."""
    saved = t.detach().clone()
    with torch.no_grad():
        t.fill_(float("nan"))
    try:
        yield t
    finally:
        with torch.no_grad():
            t.copy_(saved)
