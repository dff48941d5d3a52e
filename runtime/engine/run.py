"""Synchronous generation on the serving engine: a `Run` submits its prompts as requests and yields
their text as it becomes final (the library's generate/stream/infill/chat)."""
from __future__ import annotations

import queue
from typing import Iterator, Optional

from .events import Completion, Delta
from .sampling import SamplingParams

__all__ = ["Run"]


class Run:
    """One call's prompts, each its own request (they batch with every other request on the engine).
    Iterating yields (row, text piece) as text becomes final; `completions` holds the results once
    iteration ends. Nothing is submitted before the first piece is asked for; closing the iterator (or
    an error in any row) cancels the rows still running.

    Each row samples with `params` as a call of its own would (same seed: same tokens). The iterations
    run on the iterating thread (while no other thread runs them): a Run left unconsumed advances only as
    part of other callers' batches.
    """

    def __init__(self, engine, prompts: list[list[int]], params: SamplingParams, stop_tokens: dict):
        self.engine, self.prompts, self.params, self.stop_tokens = engine, prompts, params, stop_tokens
        self.completions: list[Optional[Completion]] = [None] * len(prompts)
        self._iterated, self._cancelled, self._requests = False, False, []

    def cancel(self) -> None:
        """Cancel the rows (from any thread, e.g. while another iterates): the iteration ends once their
        Completions ("cancelled") arrive."""
        self._cancelled = True
        for request in self._requests:
            self.engine.cancel(request)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self._iterated:
            raise RuntimeError("a generation can be iterated only once")
        self._iterated = True
        return self._pieces()

    def _pieces(self) -> Iterator[tuple[int, str]]:
        events: queue.SimpleQueue = queue.SimpleQueue()
        requests, remaining = [], 0
        try:
            requests = self.engine.submit_many(
                self.prompts, self.params, self.stop_tokens, background=False,
                sinks=[lambda event, row=row: events.put((row, event)) for row in range(len(self.prompts))])
            remaining, self._requests = len(requests), requests
            if self._cancelled:  # (cancelled between the submission and here)
                self.cancel()
            while remaining:
                row, event = self.engine.next_event(events)
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Delta):
                    if event.text:
                        yield row, event.text
                elif isinstance(event, Completion):
                    self.completions[row] = event
                    remaining -= 1
        finally:
            for request in requests:
                self.engine.cancel(request)
            if remaining:  # left early: free their slots now unless another thread is driving anyway
                self.engine.driver.drive(block=False)
