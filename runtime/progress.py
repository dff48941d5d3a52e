"""A minimal progress bar on stderr for long loads (no dependency; shown only on a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_bytes: int, label: str, *, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = total_bytes >= (1 << 30) and getattr(self.stream, "isatty", lambda: False)()
        self.enabled, self.total, self.label = enabled, max(total_bytes, 1), label
        self.done, self.t0, self._last = 0, time.monotonic(), 0.0

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            rate = self.done / max(now - self.t0, 1e-9) / 2**20
            self.stream.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {self.done / 2**30:.2f}/"
                              f"{self.total / 2**30:.2f} GiB {rate:.0f} MiB/s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
