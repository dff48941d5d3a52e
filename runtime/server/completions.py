"""POST /v1/completions: OpenAI's (legacy) completions API over the engine.

`prompt`: a string, a list of token ids, or a list of several of either (one choice group each).
`suffix`: the prompt becomes CodeLlama's infilling prompt (prefix = prompt) and generation stops at <EOT>.
`max_tokens` defaults to 16 and `temperature` to 1.0, as OpenAI's (0 is greedy); `top_k` and
`repetition_penalty` are accepted as extensions. `n` choices per prompt; with `seed`, choice i samples
with seed + i. `logprobs` (0..5), `echo`, `stop`, `stream` (with `stream_options.include_usage`).
"""
from __future__ import annotations

import asyncio

from fastapi.responses import StreamingResponse

from ..engine.events import Completion
from .logprobs import TextOffsets, completion_logprobs, text_offsets
from .protocol import (bad, check_absent, check_context, check_model, check_zero, choice_seed, finish_reason, get_bool,
                       get_int, get_str, new_id, now, sampling_params, usage, wants_usage)
from .streams import Job, completions, sse_body, submit_all

MAX_LOGPROBS = 5  # OpenAI's limit for the completions API
MAX_N = 16


def parse_prompts(body: dict, tokenizer) -> list:
    """[(ids or None, text or None)]: the request's prompts, each as ids or as text (encoded later)."""
    prompt = body.get("prompt")

    def one(p):
        if isinstance(p, str):
            return None, p
        if isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            return list(p), None
        raise bad("prompt", "prompt must be a string, a non-empty list of token ids, or a list of those")

    if prompt is None:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [one(p) for p in prompt]
    return [one(prompt)]


def _ids(model, ids, text, suffix):
    """Prompt ids and stop-token mode of one prompt."""
    tok = model.tokenizer
    if suffix is not None:
        if text is None:
            raise bad("suffix", "suffix needs a string prompt (the prefix)")
        try:
            return tok.encode_infill(text, suffix), "infill"
        except ValueError as e:
            raise bad("suffix", str(e)) from None
    if ids is not None:
        return ids, "text"
    try:  # ("" is BOS alone, as in Model.generate(""))
        return tok.encode(text, add_bos=True), "text"
    except ValueError as e:
        raise bad("prompt", str(e)) from None


async def create(body: dict, server):
    """The handler: a JSON response, or an SSE stream when `stream` is true."""
    model, tok = server.model, server.model.tokenizer
    check_model(body, server.name)
    check_zero(body, "presence_penalty", "frequency_penalty")
    check_absent(body, "logit_bias")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of", "best_of is not supported by this server (only 1)")
    prompts = parse_prompts(body, tok)
    suffix = get_str(body, "suffix")
    max_tokens = get_int(body, "max_tokens", 16, lo=0)
    n = get_int(body, "n", 1, lo=1, hi=MAX_N)
    seed = get_int(body, "seed", lo=0)
    k = get_int(body, "logprobs", lo=0, hi=MAX_LOGPROBS)
    echo, stream = get_bool(body, "echo"), get_bool(body, "stream")
    if echo and suffix is not None:
        raise bad("echo", "echo is not supported together with suffix")
    if echo and k is not None:
        raise bad("logprobs", "logprobs of the echoed prompt are not supported (echo with logprobs)")
    sampling_params(body, max_tokens=max_tokens, temperature_default=1.0, seed=seed)  # checks before encoding
    jobs, prompt_info = [], []
    for ids, text in prompts:
        ids, mode = await asyncio.to_thread(_ids, model, ids, text, suffix)  # (a long prompt: not on the loop)
        check_context(len(ids), max_tokens, model.max_seq_len)
        echoed = (text if text is not None else tok.decode(ids)) if echo else ""
        prompt_info.append((len(ids), echoed))
        for i in range(n):
            params = sampling_params(body, max_tokens=max_tokens, temperature_default=1.0,
                                     seed=choice_seed(seed, i))
            jobs.append(Job(ids, params, model.stop_tokens(mode), 0 if k is None else max(k, 1)))
    include_usage = wants_usage(body)  # (every check before anything is submitted)
    streams = submit_all(server.aengine, jobs, count_param="n" if n > 1 else "prompt")
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": server.name}
    prompt_tokens = sum(p for p, _ in prompt_info)
    if stream:
        render = _Renderer(tok, head, [prompt_info[i // n][1] for i in range(len(jobs))], k, prompt_tokens,
                           include_usage, n)
        return StreamingResponse(sse_body(streams, render), media_type="text/event-stream")
    done = await completions(streams)
    choices = []
    for i, c in enumerate(done):
        echoed = prompt_info[i // n][1]
        lps = None
        if k is not None:
            ids = [lp.token_id for lp in c.logprobs]
            lps = completion_logprobs(tok, c.logprobs, k, text_offsets(tok, ids, len(echoed)))
        choices.append({"index": i, "text": echoed + c.text, "logprobs": lps,
                        "finish_reason": finish_reason(c.finish_reason)})
    return {**head, "choices": choices,
            "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in done),
                           sum(c.cached_tokens for c in done[::n]))}  # a prompt's cache hit counted once


class _Renderer:
    """Chunks of a streamed completion: the echoed prompt first (when asked), a chunk per text delta,
    one with the finish reason per choice, then the usage (with `stream_options.include_usage`)."""

    def __init__(self, tok, head: dict, echoed: list, k, prompt_tokens: int, include_usage: bool, n: int):
        self.tok, self.head, self.echoed, self.k, self.n = tok, head, echoed, k, n
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage
        # per choice, offsets in the whole text (a stop string's partial match may hold text back from a chunk)
        self.offsets = [TextOffsets(tok, len(e)) for e in echoed]
        self.started, self.finished, self.generated, self.cached = set(), 0, 0, 0

    def chunk(self, i: int, text: str, logprobs=None, reason=None) -> dict:
        return {**self.head, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                          "finish_reason": reason}]}

    def __call__(self, i: int, event) -> list:
        out = []
        if i not in self.started:
            self.started.add(i)
            if self.echoed[i]:
                out.append(self.chunk(i, self.echoed[i]))
        if isinstance(event, Completion):
            self.finished += 1
            self.generated += len(event.token_ids)
            self.cached += event.cached_tokens if i % self.n == 0 else 0
            out.append(self.chunk(i, "", None, finish_reason(event.finish_reason)))
            if self.finished == len(self.echoed) and self.include_usage:
                out.append({**self.head, "choices": [],
                            "usage": usage(self.prompt_tokens, self.generated, self.cached)})
            return out
        if not event.text and not event.token_ids:
            return out
        lps = None
        if self.k is not None and event.logprobs:
            lps = completion_logprobs(self.tok, event.logprobs, self.k,
                                      self.offsets[i].extend([lp.token_id for lp in event.logprobs]))
        out.append(self.chunk(i, event.text, lps))
        return out
