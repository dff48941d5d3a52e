"""Which KV-cache slot a request runs in, and which cached tokens it can reuse (prefix caching)."""
from __future__ import annotations

from typing import Optional


def common_prefix(a: list, b: list) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotTable:
    """One entry per KV-cache row: the request running there (or None) and the ids whose K/V the row
    holds at positions 0..len-1 (kept after the request leaves, for the next prompt sharing a prefix).

    `limit` caps what a record may claim: the last cache position is where idle rows of a decode batch
    write, so it never holds reusable K/V.
    """

    def __init__(self, n: int, limit: int):
        self.owner: list = [None] * n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.used: list[int] = [0] * n  # when each slot was last taken (for least-recently-used choice)
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

    def choose(self, prompt: list) -> tuple[Optional[int], int, Optional[int], int]:
        """(slot, reuse, source, copy) for a new request, or (None, 0, None, 0) when every slot is busy.

        slot: the free slot to run in. A slot whose record is mostly reused (shared prefix >= the
        tokens it would lose) is preferred, the longest shared prefix first; otherwise the least recently
        used slot is overwritten, so a prompt sharing only BOS never evicts a long cached prefix.
        reuse: prompt tokens already valid in `slot`. source/copy: another slot (busy or free) holding a
        longer common prefix, and how many of its positions to copy into `slot` (None, 0 when none is
        longer). At most len(prompt) - 1 tokens are reused: the last prompt token is always computed,
        for its logits.
        """
        free = self.free()
        if not free:
            return None, 0, None, 0
        cap = len(prompt) - 1

        def match(s: int) -> int:
            return min(common_prefix(self.tokens[s], prompt), cap)

        def keeps_most(s: int) -> bool:
            return match(s) >= len(self.tokens[s]) - match(s)

        slot = max(free, key=lambda s: (keeps_most(s), match(s) if keeps_most(s) else 0, -self.used[s], -s))
        reuse = match(slot)
        source, best = None, reuse
        for s in range(len(self.owner)):
            if s != slot:
                m = match(s)
                if m > best:
                    source, best = s, m
        self._clock += 1
        self.used[slot] = self._clock
        return slot, reuse, source, (best if source is not None else 0)
