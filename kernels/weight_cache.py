"""Layouts derived from a weight object (a kernel's repack of it), made on first use and kept on the object: a
model's weights are the same objects every step, and a weight moved or rebuilt is a new object, so the layout
goes with it."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


def derived(w: object, attr: str, make: Callable[[], T]) -> T:
    """`w.<attr>`, set to `make()` on the first call."""
    value = getattr(w, attr, None)
    if value is None:
        value = make()
        setattr(w, attr, value)
    return value
