"""Counters and latency histograms of a serving engine, kept in plain Python (the server renders them
as Prometheus text; library users read `snapshot()`)."""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# seconds; Prometheus' default buckets stretched down for per-token latencies of a small model
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    """Counts of observations <= each upper bound (non-cumulative per bucket; the last slot is +Inf)."""

    bounds: tuple
    counts: list = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list:
        """[(upper bound, observations <= it)], ending with (inf, count): Prometheus' `le` buckets."""
        out, total = [], 0
        for bound, c in zip(self.bounds + (float("inf"),), self.counts):
            total += c
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding the q-quantile (inf past the last bound; 0 when empty)."""
        if not self.count:
            return 0.0
        need, total = q * self.count, 0
        for bound, c in zip(self.bounds + (float("inf"),), self.counts):
            total += c
            if total >= need:
                return bound
        return float("inf")


class EngineMetrics:
    """Updated by the engine's loop thread; read from any thread through `snapshot()`.

    Counters: requests (submitted), finished (by finish_reason), rejected (queue full), failed,
    cancelled, prompt_tokens (of admitted requests), prefilled_tokens (actually computed),
    prefix_reused_tokens (reused from cached K/V instead), generated_tokens, decode_steps, verify_steps
    (speculative passes, run instead of decode steps), speculative_proposed_tokens and
    speculative_accepted_tokens (their ids; accepted / verify_steps is the mean acceptance length).
    Gauges (set by the engine): waiting (queued requests), running (slots in use), slots (capacity).
    Histograms: ttft (submission to first token, s), token_latency (between consecutive tokens, s).
    """

    COUNTERS = ("requests", "rejected", "failed", "cancelled", "prompt_tokens", "prefilled_tokens",
                "prefix_reused_tokens", "generated_tokens", "decode_steps", "verify_steps",
                "speculative_proposed_tokens", "speculative_accepted_tokens")

    def __init__(self, slots: int = 0):
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.finished: dict = {}
        self.waiting = 0
        self.running = 0
        self.slots = slots
        self.ttft = Histogram(TTFT_BUCKETS)
        self.token_latency = Histogram(TOKEN_BUCKETS)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def finish(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_token_latency(self, seconds: float, n: int = 1) -> None:
        """n tokens handed out together `seconds` after the previous one: the first waited that long, the
        others none."""
        with self._lock:
            self.token_latency.observe(seconds)
            for _ in range(n - 1):
                self.token_latency.observe(0.0)

    def set_gauges(self, *, waiting: int, running: int) -> None:
        with self._lock:
            self.waiting, self.running = waiting, running

    def snapshot(self) -> dict:
        """A consistent copy: counters, finished (by reason), gauges and the two histograms."""
        with self._lock:
            def copy(h: Histogram) -> dict:
                return {"buckets": h.cumulative(), "sum": h.sum, "count": h.count}

            return {**self.counters, "finished": dict(self.finished), "waiting": self.waiting,
                    "running": self.running, "slots": self.slots, "ttft": copy(self.ttft),
                    "token_latency": copy(self.token_latency)}
