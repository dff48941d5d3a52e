"""The loading progress bar: tqdm on stderr, by default only for loads of 1 GiB or more on a terminal."""
from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """Bytes loaded of `total_bytes`, shown on `stream` (stderr) as `label: 42%|####  | 1.2G/2.9G [...]`.
    enabled: True shows it, False shows nothing, None shows it for 1 GiB or more when `stream` is a terminal."""

    def __init__(self, total_bytes: int, label: str, *, enabled: bool | None = None, stream=None):
        stream = stream or sys.stderr
        if enabled is None:
            enabled = total_bytes >= (1 << 30) and getattr(stream, "isatty", lambda: False)()
        self.enabled = bool(enabled)
        self._bar = tqdm(total=max(total_bytes, 1), desc=label, file=stream, unit="B", unit_scale=True,
                         unit_divisor=1024, mininterval=0.1, dynamic_ncols=True) if self.enabled else None

    def update(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        """Draw the final state and end the line (nothing when disabled)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
