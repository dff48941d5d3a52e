"""Running a handler's requests on the AsyncEngine: submit them all up front (so a full queue or a bad
prompt is an HTTP error before any response starts), merge their events, and frame them as server-sent
events. Every request a handler submits is closed (cancelled if still running) when its response ends,
fails, or the client goes away."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..engine.events import Completion
from ..engine.sampling import SamplingParams
from ..errors import ModelBusyError
from .protocol import APIError, bad, error_body

log = logging.getLogger("codellama_rt.server")


@dataclass
class Job:
    """One engine request of a response (a choice): prompt ids, sampling, stop tokens, logprobs width."""

    ids: list
    params: SamplingParams
    stop_tokens: dict
    logprobs: int = 0


def submit_all(aengine, jobs: list, prompt_param: str = "prompt", count_param: str = "n") -> list:
    """EventStreams of `jobs`, all submitted now, or none: a refusal is raised as an APIError (429 for a full
    queue, 400 for a bad prompt, or for more jobs than the engine's slots and queue hold at once, which no
    retry would admit: named `count_param`)."""
    engine = aengine.engine
    if engine.max_queue is not None and len(jobs) > engine.max_batch + engine.max_queue:
        raise bad(count_param, f"the request asks for {len(jobs)} completions at once (prompts x n); this server "
                  f"holds at most {engine.max_batch + engine.max_queue} ({engine.max_batch} running, "
                  f"{engine.max_queue} waiting)")
    try:
        return aengine.submit_many([(job.ids, job.params, job.stop_tokens, job.logprobs) for job in jobs])
    except ModelBusyError as e:
        raise APIError(429, str(e), type="server_busy", code="queue_full") from None
    except ValueError as e:
        raise bad("speculate" if str(e).startswith("speculate=") else prompt_param, str(e)) from None


def close_all(streams: list) -> None:
    for s in streams:
        s.close()


async def merge(streams: list) -> AsyncIterator[tuple]:
    """(index, event) of every stream as events arrive, until each has sent its Completion; an exception
    a stream raises is raised here. Closing this (or leaving it by an exception) cancels them all."""
    if len(streams) == 1:  # the common case without tasks
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            close_all(streams)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for event in stream:
                queue.put_nowait((i, event))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, event = await queue.get()
            if isinstance(event, BaseException):
                raise event
            yield i, event
            left -= isinstance(event, Completion)
    finally:
        close_all(streams)
        for t in tasks:
            t.cancel()


async def completions(streams: list) -> list:
    """The Completion of each stream, in order (for a response that is not streamed)."""
    done = [None] * len(streams)
    events = merge(streams)
    try:
        async for i, event in events:
            if isinstance(event, Completion):
                done[i] = event
    finally:
        await events.aclose()
    return done


def sse(data) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


async def sse_body(streams: list, render: Callable, *, done: bool = True) -> AsyncIterator[str]:
    """The SSE body of a streamed response: `render(index, event)` gives the chunks (dicts) for each
    event; a failure mid-stream sends one error event and ends the stream. Ends with [DONE] when `done`."""
    events = merge(streams)
    try:
        async for i, event in events:
            for chunk in render(i, event):
                yield sse(chunk)
    except Exception as e:  # noqa: BLE001 - the client gets the error; the server goes on
        log.exception("request failed mid-stream")
        yield sse(error_body(f"{type(e).__name__}: {e}", "server_error"))
        return
    finally:
        await events.aclose()
        close_all(streams)
    if done:
        yield DONE
