"""POST /infill: llama.cpp server's fill-in-the-middle endpoint (what llama.vscode and llama.vim call).

The prefix CodeLlama sees is, in order: each `input_extra` chunk ({filename, text}: other files the
editor thinks relevant) as `# <filename>\\n<text>` ending in a newline, then `input_prefix`, then `prompt`
(llama.cpp appends it to the prefix: editors send the cursor line's start there). The suffix is
`input_suffix`. Generation stops at <EOT>, a `stop` string, or `n_predict` tokens (-1, the default: the
rest of the context). Sampling defaults are llama.cpp's: temperature 0.8, top_k 40, top_p 0.95
(`temperature: 0` is greedy); `repeat_penalty`, `seed` (-1: random) and `stream` as in llama.cpp.
Fields llama.cpp accepts that have no meaning here (cache_prompt, samplers, t_max_*) are ignored:
prefix reuse is always on.

The response: {"content", "stop": true, "model", "tokens_predicted", "tokens_evaluated", "tokens_cached",
"stop_type", "stopped_eos", "stopped_word", "stopped_limit", "truncated", "timings"}; streamed, one
`data: {"content": piece, "stop": false}` event per piece, then that final object with content "".
"""
from __future__ import annotations

import asyncio
import time

from fastapi.responses import StreamingResponse

from ..engine.events import Completion
from .protocol import bad, check_context, get_int, get_bool, get_str, sampling_params
from .streams import Job, completions, sse_body, submit_all

_NAMES = {"max_new_tokens": "n_predict", "repetition_penalty": "repeat_penalty"}
_STOP_TYPE = {"eos": "eos", "eot": "eos", "stop": "word", "length": "limit"}


def extra_context(body: dict) -> str:
    """`input_extra` chunks as the text put before the prefix."""
    extra = body.get("input_extra") or []
    if not isinstance(extra, list):
        raise bad("input_extra", "input_extra must be a list of {filename, text} objects")
    parts = []
    for i, chunk in enumerate(extra):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text", ""), str) \
                or not isinstance(chunk.get("filename", ""), str):
            raise bad("input_extra", f"input_extra[{i}]: expected an object with string filename and text")
        text = chunk.get("text", "")
        parts.append(f"# {chunk.get('filename', '')}\n{text}" + ("" if text.endswith("\n") else "\n"))
    return "".join(parts)


async def create(body: dict, server):
    """The handler: llama.cpp's JSON response, or its event stream when `stream` is true."""
    model, tok = server.model, server.model.tokenizer
    prefix = extra_context(body) + get_str(body, "input_prefix", "") + get_str(body, "prompt", "")
    suffix = get_str(body, "input_suffix", "")
    n_predict = get_int(body, "n_predict", -1, lo=-1)
    seed = get_int(body, "seed", -1, lo=-1)
    stream = get_bool(body, "stream")
    try:
        ids = await asyncio.to_thread(tok.encode_infill, prefix, suffix)  # (a long prompt: not on the loop)
    except ValueError as e:
        raise bad("input_prefix", str(e)) from None
    check_context(len(ids), None if n_predict < 0 else n_predict, model.max_seq_len, prompt_param="input_prefix",
                  tokens_param="n_predict")
    budget = model.max_seq_len - len(ids) if n_predict < 0 else n_predict
    fields = {**body, "repetition_penalty": body.get("repeat_penalty")}
    params = sampling_params(fields, max_tokens=budget, temperature_default=0.8, top_p_default=0.95,
                             top_k_default=40, seed=None if seed < 0 else seed, names=_NAMES)
    streams = submit_all(server.aengine, [Job(ids, params, model.stop_tokens("infill"))], prompt_param="input_prefix")
    started = time.perf_counter()
    if stream:
        def render(_, event):
            if isinstance(event, Completion):
                return [_final(event, server.name, len(ids), started, "")]
            return [{"content": event.text, "stop": False}] if event.text else []

        return StreamingResponse(sse_body(streams, render, done=False), media_type="text/event-stream")
    (done,) = await completions(streams)
    return _final(done, server.name, len(ids), started, done.text)


def _final(c: Completion, name: str, prompt_tokens: int, started: float, content: str) -> dict:
    elapsed_ms = (time.perf_counter() - started) * 1000
    stop_type = _STOP_TYPE.get(c.finish_reason, "none")
    return {"content": content, "stop": True, "model": name, "tokens_predicted": len(c.token_ids),
            "tokens_evaluated": prompt_tokens, "tokens_cached": c.cached_tokens, "stop_type": stop_type,
            "stopped_eos": stop_type == "eos", "stopped_word": stop_type == "word",
            "stopped_limit": stop_type == "limit", "truncated": False,
            "timings": {"prompt_n": prompt_tokens - c.cached_tokens, "predicted_n": len(c.token_ids),
                        "total_ms": elapsed_ms}}
