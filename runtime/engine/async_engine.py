"""An asyncio front over the engine: many coroutines submit requests at once and iterate their events."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Union

from .events import Completion, Delta
from .sampling import SamplingParams


class AsyncEngine:
    """Thread-safe, asyncio-friendly access to one `Engine` (its loop thread does the work).

    `stream()` submits a request and yields its `Delta`s then its `Completion`; closing the iterator
    early (a client that went away, `aclose()`, a cancelled task) cancels the request, which frees its
    slot within one decode step.
    """

    def __init__(self, engine):
        self.engine = engine

    @property
    def metrics(self):
        return self.engine.metrics

    async def stream(self, ids: list, params: SamplingParams, stop_tokens: dict, *,
                     logprobs: int = 0) -> AsyncIterator[Union[Delta, Completion]]:
        """Events of one request: Delta... then Completion. Raises at submission what the engine raises
        (ValueError for a bad prompt, ModelBusyError when the queue is full), and later the request's
        own failure (e.g. FloatingPointError)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        request = self.engine.submit(ids, params, stop_tokens, logprobs=logprobs, sink=sink)
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Completion):
                    return
        finally:
            self.engine.cancel(request)  # a no-op once finished

    async def complete(self, ids: list, params: SamplingParams, stop_tokens: dict, *, logprobs: int = 0) -> Completion:
        """The request's Completion (its deltas consumed)."""
        async for event in self.stream(ids, params, stop_tokens, logprobs=logprobs):
            if isinstance(event, Completion):
                return event
        raise RuntimeError("the engine ended a request without a completion")  # not reached
