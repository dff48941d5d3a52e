"""Speculative decoding's host side: what a request proposes each step and how much.

`PromptLookup` proposes what followed the most recent earlier occurrence of the context's last n-gram
(prompt-lookup decoding: code re-emits what it has seen, renamed variables, whole blocks); the draft model's
proposals come from `draft.py`. `Speculation` is one request's state: its proposer, an adaptive proposal
length, and the counts its Completion reports. The verify pass itself is `verify_graph.VerifyStep`.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Protocol

MAX_NGRAM = 4  # longest suffix looked up; longer matches are tried first
MIN_NGRAM = 2  # shortest: single ids (a newline, a space) match everywhere and predict little
STATIC_DRAFT_COST = 0.15  # a drafted id over a target decode step, where timing must not decide (a 7B draft of 34B)
BACKOFF_LIMIT = 32  # most decode steps a request waits before probing again when plain decoding looks better


@dataclass
class SpeculationStats:
    """One request's speculative decoding: `verifies` passes it took part in, `proposed` ids they scored,
    `accepted` of those the model agreed with. Each pass also yields one token of the model's own."""

    verifies: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def mean_accepted(self) -> float:
        """Accepted proposals per verify pass (0.0 before any pass)."""
        return self.accepted / self.verifies if self.verifies else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Share of the proposed ids that were accepted (0.0 before any)."""
        return self.accepted / self.proposed if self.proposed else 0.0


class Proposer(Protocol):
    """What proposes a request's next ids: told every id the request samples (`extend`), asked for up to n
    ids continuing the context (`propose`, [] for none)."""

    def extend(self, ids) -> None: ...

    def propose(self, n: int) -> list[int]: ...


class PromptLookup:
    """An n-gram index over a request's ids (prompt, then generated ones as they come).

    For each n in MIN_NGRAM..MAX_NGRAM it maps an n-gram to the end of its latest occurrence, entered one id
    late, so a lookup of the context's own suffix finds an earlier occurrence with at least one id after it.
    Appending is O(MAX_NGRAM) per id; a proposal is O(MAX_NGRAM + k).
    """

    def __init__(self, ids: list[int]):
        self.ids: list[int] = []
        self._last: dict[int, dict[tuple, int]] = {n: {} for n in range(MIN_NGRAM, MAX_NGRAM + 1)}
        self.extend(ids)

    def extend(self, ids) -> None:
        """Append ids to the context."""
        for token in ids:
            self.ids.append(token)
            end = len(self.ids) - 2  # the n-grams ending just before the new id now have a continuation
            for n, table in self._last.items():
                if end - n + 1 >= 0:
                    table[tuple(self.ids[end - n + 1:end + 1])] = end

    def propose(self, k: int) -> list[int]:
        """Up to k ids following the latest earlier occurrence of the longest suffix found ([] if none)."""
        ids = self.ids
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(ids) < n:
                continue
            end = self._last[n].get(tuple(ids[-n:]))
            if end is not None:
                return ids[end + 1:end + 1 + k]
        return []


class PassCosts:
    """Seconds a decode step (width 0) and a verify pass of each width take on this engine, per batch size: the
    median of the last WINDOW times the engine measured (host time of the call and its one sync). A width not
    measured yet is estimated from the nearest measured ones (a pass costs at least a decode step; past the
    widest measured one, linearly), before any from DEFAULT_SLOPE decode steps per proposed id.

    Estimates decide which widths run, and only a width that runs is measured again, so neither a hiccup (a
    preempted thread, a page fault: the median ignores a few) nor an old measurement may price a width out for
    good: a width's estimate not refreshed in STALE_PASSES passes at its batch size is forgotten (estimated
    from its neighbours until it runs again)."""

    DEFAULT_SLOPE = 0.125
    WINDOW = 9
    STALE_PASSES = 64

    def __init__(self):
        self._mean: dict[tuple, float] = {}     # key -> the estimate (the median of its window)
        self._recent: dict[tuple, deque] = {}
        self._passes: dict[int, int] = {}      # batch size -> verify passes observed at it
        self._refreshed: dict[tuple, int] = {}  # (batch, width > 0) -> _passes[batch] when last observed

    def observe(self, batch: int, width: int, seconds: float) -> None:
        key = (batch, width)
        self._update(key, seconds)
        if width == 0:  # (decode steps: the yardstick, refreshed whenever plain steps run)
            return
        n = self._passes[batch] = self._passes.get(batch, 0) + 1
        self._refreshed[key] = n
        for k in [k for k, at in self._refreshed.items() if k[0] == batch and n - at > self.STALE_PASSES]:
            del self._refreshed[k], self._mean[k], self._recent[k]

    def measured(self, batch: int) -> bool:
        """Whether a decode step at `batch` rows has been timed (what every estimate is relative to)."""
        return (batch, 0) in self._mean

    def observe_draft(self, batch: int, seconds_per_id: float, seconds_per_pass: float) -> None:
        """Drafting took `seconds_per_pass` beyond the one-id steps after its first (catching up with what was
        accepted, the host's work) and `seconds_per_id` per further id (speculate="draft")."""
        self._update((batch, "draft"), seconds_per_id)
        self._update((batch, "draft pass"), max(seconds_per_pass, 0.0))

    def drafting(self, batch: int, m: int) -> float:
        """Drafting m ids over a decode step at `batch` rows: a pass's fixed part and m - 1 one-id steps."""
        per_id, per_pass = self.draft_relative(batch)
        return per_pass + (m - 1) * per_id

    def draft_relative(self, batch: int) -> tuple[float, float]:
        """(a one-id draft step, a drafting pass's fixed part) over a decode step; zeros until measured."""
        base = self._mean.get((batch, 0))
        if not base:
            return 0.0, 0.0
        return self._mean.get((batch, "draft"), 0.0) / base, self._mean.get((batch, "draft pass"), 0.0) / base

    def _update(self, key: tuple, seconds: float) -> None:
        recent = self._recent.setdefault(key, deque(maxlen=self.WINDOW))
        recent.append(seconds)
        self._mean[key] = statistics.median(recent)

    def relative(self, batch: int, width: int) -> float:
        """A verify pass of `width` over a decode step, both at `batch` rows (1.0 for width 0)."""
        base = self._mean.get((batch, 0))
        if width == 0:
            return 1.0
        known = self._mean.get((batch, width))
        if base is None:
            return 1.0 + self.DEFAULT_SLOPE * width
        if known is not None:
            return max(known / base, 1.0)
        measured = sorted(w for (b, w) in self._mean if b == batch and isinstance(w, int) and w > 0)
        below = max((w for w in measured if w < width), default=0)
        above = min((w for w in measured if w > width), default=None)
        low = self._mean.get((batch, below), base) / base
        if above is None:
            slope = (low - 1.0) / below if below else self.DEFAULT_SLOPE
            return max(low + slope * (width - below), 1.0)
        high = self._mean[(batch, above)] / base
        return max(low + (high - low) * (width - below) / (above - below), 1.0)


class Speculation:
    """One request's speculative state: its proposer, its acceptance estimate, the stats.

    How many ids to propose is chosen per pass to maximise expected tokens per unit of time: with a per-id
    acceptance estimate a (each proposal accepted with probability a if the ones before it were), m proposals
    yield 1 + a + .. + a^m tokens for the time of a verify pass of width m (`PassCosts`), against one token per
    decode step. `whole` (a draft model's passes, whose fixed cost per pass and catching up after plain steps
    favour long runs): only m = k, or none, never probing, its yield estimated as the mean accepted per pass
    (decayed per pass, starting at 0.9 k): a draft agrees in runs (a line, or nothing), which a per-id
    geometric estimate, dominated by each pass's one rejection, puts ~35% low. When no m >= 1 beats
    plain decoding the request decodes plainly and probes again (one id) after a wait that doubles up to
    BACKOFF_LIMIT steps, so text that does not repeat its context costs little more than plain decoding; no probe
    when passes cost more than even full acceptance would repay; a proposer with nothing to offer costs nothing.
    """

    PRIOR = (3.0, 4.0)  # (accepted, trials) before any pass: a = 0.75 (proposals are often right when made)
    DRAFT_PRIOR = (9.0, 10.0)  # a draft of the model's family: a = 0.9, so its first passes run and measure it
    DECAY = 0.9         # weight of the past in the estimate, per proposed id scored (a memory of ~10 ids)
    PASS_DECAY = 0.7    # `whole`: weight of the past in the mean accepted per pass, per pass (~3 passes)

    def __init__(self, proposer: Proposer, k: int, whole: bool = False):
        self.proposer, self.k, self.whole = proposer, k, whole
        self.stats = SpeculationStats()
        self._accepted, self._trials = self.DRAFT_PRIOR if whole else self.PRIOR
        prior = self.DRAFT_PRIOR[0] / self.DRAFT_PRIOR[1]
        self._pass_accepted, self._passes = prior * k, 1.0  # `whole`: decayed sums of accepted ids and passes
        self._wait = 0      # decode steps to sit out before proposing again
        self._backoff = 1   # the next wait once plain decoding looks better
        self._probing = False  # the last limit() was a one-id probe

    @property
    def acceptance(self) -> float:
        """The per-id acceptance estimate."""
        return self._accepted / self._trials

    def extend(self, ids) -> None:
        """Ids sampled since the last call (the proposer's context grows)."""
        self.proposer.extend(ids)

    def propose(self, n: int) -> list[int]:
        return self.proposer.propose(n)

    def wants(self) -> bool:
        """Whether to propose this step (False while waiting); counts the step."""
        if self._wait > 0:
            self._wait -= 1
            return False
        return True

    def limit(self, room: int, cost) -> int:
        """How many ids to propose now, at most `room`: the m in 0..min(k, room) with the most expected tokens
        per unit of time, `cost(m)` being a pass of m proposals over a decode step. 0: decode plainly (and
        wait before asking again), except as a one-id probe after a wait."""
        a, best, best_rate, hopeless = self.acceptance, 0, 1.0, True
        tokens, top = 1.0, min(self.k, room)
        for m in range(1, top + 1):
            tokens += a ** m
            if self.whole and m < top:
                continue
            if self.whole:  # the measured yield of a pass, at most what `room` lets it propose
                tokens = 1.0 + min(self._pass_accepted / self._passes, m)
            c = cost(m)
            if tokens / c > best_rate:
                best, best_rate = m, tokens / c
            hopeless = hopeless and m + 1 <= c  # not even accepting everything would pay
        self._probing = False
        if best == 0 and room > 0:
            # a wait has passed: probe the estimate with one id (not with a draft, whose catching up with the
            # plain steps would cost more than a probe tells)
            if self._backoff > 1 and not hopeless and not self.whole:
                best, self._probing = 1, True
            self._wait = self._backoff
            self._backoff = min(2 * self._backoff, BACKOFF_LIMIT)
        return best

    def record(self, proposed: int, accepted: int) -> None:
        """A verify pass scored `proposed` ids of this request and accepted `accepted` of them."""
        self.stats.verifies += 1
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self._pass_accepted = self.PASS_DECAY * self._pass_accepted + accepted
        self._passes = self.PASS_DECAY * self._passes + 1.0
        # each id up to the first rejection is one trial (ids after it were never tested)
        for ok in [1] * accepted + ([0] if accepted < proposed else []):
            self._accepted = self.DECAY * self._accepted + ok
            self._trials = self.DECAY * self._trials + 1
        if accepted and not self._probing:  # (an accepted probe only feeds the estimate: the next limit decides)
            self._backoff = 1


def static_cost(m: int) -> float:
    """A pass of m drafted ids over a decode step when timing must not decide: PassCosts' default slope per
    verified id plus STATIC_DRAFT_COST per drafted one."""
    return 1.0 + PassCosts.DEFAULT_SLOPE * bucket(m, 1 << 30) + STATIC_DRAFT_COST * m


def bucket(n: int, limit: int) -> int:
    """The verify width serving n proposals: the next power of two, at most `limit` (widths 1, 2, 4, 8, 16:
    few step shapes, hence few CUDA graphs)."""
    return min(1 << max(n - 1, 0).bit_length(), limit)
