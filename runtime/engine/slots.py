"""Which KV-cache slot a request runs in, and which cached tokens it can reuse (prefix caching)."""
from __future__ import annotations

from typing import NamedTuple, Optional


def common_prefix(a: list, b: list) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Placement(NamedTuple):
    """Where a new request runs (`SlotTable.choose`). The caller copies K/V in this order: `slot`'s old
    record (positions 0..len-1) to `save_to` when that is not None, then positions 0..reuse-1 of `source`
    into `slot` when `source` is not None (else they are `slot`'s own)."""

    slot: int               # the lowest free slot
    reuse: int              # prompt tokens whose K/V are valid in `slot` once the copies are done
    source: Optional[int]   # another slot holding the longest common prefix, or None
    save_to: Optional[int]  # a free slot that keeps `slot`'s old record, or None


class SlotTable:
    """One entry per KV-cache row: the request running there (or None) and the ids whose K/V the row
    holds at positions 0..len-1 (a record, kept after the request leaves, for the next prompt sharing a
    prefix).

    Requests run in the lowest free slots, so a decode step over rows 0..n-1 has few idle rows (each
    costs as much as a running one). Records are the prefix cache: a record that the new request would
    overwrite moves to the free slot with the least valuable record (an empty one, else the least
    recently used) when there is one, and a prompt sharing a prefix with any slot's record copies it.

    `limit` caps what a record may claim: the last cache position is where idle rows of a decode batch
    write, so it never holds reusable K/V.
    """

    def __init__(self, n: int, limit: int):
        self.owner: list = [None] * n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.used: list[int] = [0] * n  # when each slot's record was last taken or reused (LRU order)
        self.limit = limit
        self._clock = 0

    def __len__(self) -> int:
        return len(self.owner)

    def free(self) -> list[int]:
        return [s for s, o in enumerate(self.owner) if o is None]

    def busy(self) -> list[int]:
        return [s for s, o in enumerate(self.owner) if o is not None]

    def record(self, slot: int, ids: list) -> None:
        """Slot `slot` now holds valid K/V for `ids` (truncated to `limit`)."""
        self.tokens[slot] = list(ids[:self.limit])

    def forget(self, slot: int) -> None:
        self.tokens[slot] = []

    def choose(self, prompt: list) -> Optional[Placement]:
        """Where a request for `prompt` runs; None when every slot is busy. Changes nothing (see `take`).

        reuse is at most len(prompt) - 1: the last prompt token is always computed, for its logits. The
        slot's own record stays in place when the request reuses at least as much of it as it overwrites;
        otherwise it is saved to another free slot whose record is empty or older, or dropped.
        """
        free = self.free()
        if not free:
            return None
        slot, cap = free[0], len(prompt) - 1

        def match(s: int) -> int:
            return min(common_prefix(self.tokens[s], prompt), cap)

        reuse, source = match(slot), None
        for s in range(len(self.owner)):
            m = match(s) if s != slot else 0
            if m > reuse:
                reuse, source = m, s
        old = self.tokens[slot]
        save_to = None
        if old and (source is not None or 2 * reuse < len(old)):
            others = [s for s in free if s not in (slot, source)]
            if others:
                victim = min(others, key=lambda s: (bool(self.tokens[s]), self.used[s]))
                if not self.tokens[victim] or self.used[victim] < self.used[slot]:
                    save_to = victim
        return Placement(slot, reuse, source, save_to)

    def take(self, placement: Placement, owner, prompt: list) -> None:
        """Book `placement` for `owner` (once its copies are done): the saved record moves, `slot` holds the
        reused prompt prefix, and the slots whose records served are the most recently used."""
        p = placement
        self._clock += 1
        if p.save_to is not None:
            self.tokens[p.save_to], self.used[p.save_to] = self.tokens[p.slot], self.used[p.slot]
        if p.source is not None:
            self.used[p.source] = self._clock
        self.owner[p.slot], self.used[p.slot] = owner, self._clock
        self.record(p.slot, prompt[:p.reuse])
