"""POST /v1/chat/completions: OpenAI's chat API over CodeLlama's Instruct format (`encode_chat`).

`messages`: system (or developer) / user / assistant turns, content a string or a list of text parts.
`max_tokens` (or `max_completion_tokens`) defaults to the rest of the context, as OpenAI's; `temperature`
to 1.0. `n` (with `seed`, choice i samples with seed + i), `stop`, `seed`, `logprobs` + `top_logprobs`
(0..20), `stream` (the first chunk carries the role, then content deltas, then the finish reason).
Tools are not supported (400).
"""
from __future__ import annotations

import asyncio

from fastapi.responses import StreamingResponse

from ..engine.events import Completion
from ..engine.row_sampling import LOGPROB_WIDTH
from .logprobs import chat_logprobs
from .protocol import (bad, check_absent, check_context, check_model, check_zero, choice_seed, finish_reason, get_bool,
                       get_int, new_id, now, sampling_params, usage, wants_usage)
from .streams import Job, completions, sse_body, submit_all

MAX_N = 16
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_messages(body: dict) -> list:
    """[{'role', 'content'}] in the tokenizer's terms (text parts joined, developer as system)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
            raise bad("messages", f"messages[{i}]: expected an object with a role in {sorted(_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad("messages", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad("messages", f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": _ROLES[m["role"]], "content": content})
    return out


async def create(body: dict, server):
    """The handler: a JSON response, or an SSE stream when `stream` is true."""
    model, tok = server.model, server.model.tokenizer
    check_model(body, server.name)
    check_zero(body, "presence_penalty", "frequency_penalty")
    check_absent(body, "tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias")
    messages = parse_messages(body)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get_int(body, "max_tokens", lo=0)  # (both checked; the newer name wins)
    max_tokens = get_int(body, "max_completion_tokens", max_tokens, lo=0)
    n = get_int(body, "n", 1, lo=1, hi=MAX_N)
    seed = get_int(body, "seed", lo=0)
    want_logprobs, stream = get_bool(body, "logprobs"), get_bool(body, "stream")
    k = get_int(body, "top_logprobs", 0, lo=0, hi=LOGPROB_WIDTH)
    if k and not want_logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    names = {"max_new_tokens": name}
    sampling_params(body, max_tokens=max_tokens or 0, temperature_default=1.0, seed=seed, names=names)
    try:
        ids = await asyncio.to_thread(tok.encode_chat, messages)  # (a long prompt: not on the event loop)
    except ValueError as e:
        raise bad("messages", str(e)) from None
    check_context(len(ids), max_tokens, model.max_seq_len, prompt_param="messages", tokens_param=name)
    budget = max_tokens if max_tokens is not None else model.max_seq_len - len(ids)
    jobs = [Job(ids, sampling_params(body, max_tokens=budget, temperature_default=1.0, names=names,
                                     seed=choice_seed(seed, i)),
                model.stop_tokens("chat"), max(k, 1) if want_logprobs else 0) for i in range(n)]
    include_usage = wants_usage(body)  # (every check before anything is submitted)
    streams = submit_all(server.aengine, jobs, prompt_param="messages", count_param="n")
    head = {"id": new_id("chatcmpl"), "created": now(), "model": server.name}
    if stream:
        render = _Renderer(tok, head, n, k if want_logprobs else None, len(ids), include_usage)
        return StreamingResponse(sse_body(streams, render), media_type="text/event-stream")
    done = await completions(streams)
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(tok, c.logprobs if want_logprobs else None, k),
                "finish_reason": finish_reason(c.finish_reason)} for i, c in enumerate(done)]
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": usage(len(ids), sum(len(c.token_ids) for c in done), done[0].cached_tokens)}


class _Renderer:
    """Chunks of a streamed chat completion: per choice the role, content deltas, the finish reason; then
    the usage (with `stream_options.include_usage`)."""

    def __init__(self, tok, head: dict, n: int, k, prompt_tokens: int, include_usage: bool):
        self.tok, self.head, self.n, self.k = tok, {**head, "object": "chat.completion.chunk"}, n, k
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage
        self.started, self.finished, self.generated, self.cached = set(), 0, 0, 0

    def chunk(self, i: int, delta: dict, logprobs=None, reason=None) -> dict:
        return {**self.head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": reason}]}

    def __call__(self, i: int, event) -> list:
        out = []
        if i not in self.started:
            self.started.add(i)
            out.append(self.chunk(i, {"role": "assistant", "content": ""}))
        if isinstance(event, Completion):
            self.finished += 1
            self.generated += len(event.token_ids)
            self.cached += event.cached_tokens if i == 0 else 0  # the one prompt's cache hit
            out.append(self.chunk(i, {}, None, finish_reason(event.finish_reason)))
            if self.finished == self.n and self.include_usage:
                out.append({**self.head, "choices": [],
                            "usage": usage(self.prompt_tokens, self.generated, self.cached)})
            return out
        if not event.text and not event.token_ids:
            return out
        lps = chat_logprobs(self.tok, event.logprobs, self.k) if self.k is not None else None
        out.append(self.chunk(i, {"content": event.text}, lps))
        return out
