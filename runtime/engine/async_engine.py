"""An asyncio front over the engine: many coroutines submit requests at once and iterate their events."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Union

from .events import Completion, Delta
from .sampling import SamplingParams


class EventStream:
    """The events of one submitted request, as an async iterator: Delta... then the Completion (or the
    exception that ended the request, raised). `close()` cancels the request (a no-op once finished)."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop):
        self._engine, self._queue, self._done = engine, asyncio.Queue(), False
        self.request = None  # set once submitted (`AsyncEngine.submit_many`)

        def sink(event) -> None:  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        self.sink = sink

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Union[Delta, Completion]:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, BaseException):
            self._done = True
            raise event
        self._done = isinstance(event, Completion)
        return event

    def close(self) -> None:
        self._done = True
        self._engine.cancel(self.request)


class AsyncEngine:
    """Thread-safe, asyncio-friendly access to one `Engine` (its loop thread does the work).

    `submit()` queues a request now (raising at once what the engine raises) and returns its
    `EventStream`; `stream()` submits at its first iteration, and closing it early (a client that
    went away, `aclose()`, a cancelled task) cancels the request, which frees its slot within one
    decode step.
    """

    def __init__(self, engine):
        self.engine = engine

    @property
    def metrics(self):
        return self.engine.metrics

    def submit(self, ids: list, params: SamplingParams, stop_tokens: dict, *, logprobs: int = 0) -> EventStream:
        """Queue one request from a coroutine; raises ValueError for a bad prompt, ModelBusyError when
        the queue is full. The caller closes the stream it gets (`close()`) unless it iterates it to
        the end."""
        return self.submit_many([(ids, params, stop_tokens, logprobs)])[0]

    def submit_many(self, jobs: list) -> list[EventStream]:
        """Queue one request per (ids, params, stop_tokens, logprobs) of `jobs` from a coroutine, all or none
        (`Engine.submit_many`): a response's choices are admitted together or refused together."""
        loop = asyncio.get_running_loop()
        streams = [EventStream(self.engine, loop) for _ in jobs]
        ids, params, stops, logprobs = (list(field) for field in zip(*jobs)) if jobs else ([], [], [], [])
        requests = self.engine.submit_many(ids, params, stops, logprobs=logprobs, sinks=[s.sink for s in streams])
        for stream, request in zip(streams, requests):
            stream.request = request
        return streams

    async def stream(self, ids: list, params: SamplingParams, stop_tokens: dict, *,
                     logprobs: int = 0) -> AsyncIterator[Union[Delta, Completion]]:
        """Events of one request: Delta... then Completion. Raises at submission what the engine raises
        (ValueError for a bad prompt, ModelBusyError when the queue is full), and later the request's
        own failure (e.g. FloatingPointError)."""
        events = self.submit(ids, params, stop_tokens, logprobs=logprobs)
        try:
            async for event in events:
                yield event
        finally:
            events.close()

    async def complete(self, ids: list, params: SamplingParams, stop_tokens: dict, *, logprobs: int = 0) -> Completion:
        """The request's Completion (its deltas consumed)."""
        async for event in self.stream(ids, params, stop_tokens, logprobs=logprobs):
            if isinstance(event, Completion):
                return event
        raise RuntimeError("the engine ended a request without a completion")  # not reached
