"""The edge of the server: reading a JSON body, checking its fields, building SamplingParams, and OpenAI's
error shape `{"error": {"message", "type", "param", "code"}}` for whatever goes wrong.

Fields a handler does not know are ignored (clients send many, e.g. `user`); a known field with a value
the server cannot honour is a 400 naming it, never silently dropped.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Optional

from ..engine.sampling import SEED_LIMIT, SamplingParams

DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes of a request body (413 past it)


class APIError(Exception):
    """An error answered to the client: HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: Optional[str], message: str) -> APIError:
    """A 400 naming `param`."""
    return APIError(400, message, param=param, code="invalid_value" if param else None)


async def read_json(request, limit: int) -> dict:
    """The request body as a JSON object; 413 past `limit` bytes, 400 if it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON here: it nests too deeply",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


# ---- fields -------------------------------------------------------------------------------------

def get_int(body: dict, name: str, default=None, *, lo: Optional[int] = None, hi: Optional[int] = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"{name}={value!r} is invalid: expected an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = " and".join(b for b in ("" if lo is None else f" >= {lo}", "" if hi is None else f" <= {hi}") if b)
        raise bad(name, f"{name}={value!r} is invalid: expected an integer{bounds}")
    return value


def get_number(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"{name}={value!r} is invalid: expected a number")
    return value


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"{name}={value!r} is invalid: expected true or false")
    return value


def get_str(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad(name, f"{name} is invalid: expected a string")
    return value


def wants_usage(body: dict) -> bool:
    """`stream_options.include_usage`: a last chunk with the usage and no choices."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad("stream_options", "stream_options must be an object")
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise bad("stream_options", "stream_options.include_usage must be true or false")
    return bool(value)


def check_model(body: dict, served: str) -> None:
    """`model`, when given, must name the served model (404 like OpenAI otherwise)."""
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise bad("model", "model must be a string")
    if name is not None and name != served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def check_zero(body: dict, *names: str) -> None:
    """OpenAI parameters without an equivalent here: accepted only at their neutral value."""
    for name in names:
        if get_number(body, name, 0) != 0:
            raise bad(name, f"{name} is not supported by this server (only 0)")


def check_absent(body: dict, *names: str) -> None:
    """OpenAI parameters this server cannot honour (tools, logit_bias, response formats): a 400 unless absent or
    at their neutral value (null, empty, "none", {"type": "text"})."""
    for name in names:
        value = body.get(name)
        if value in (None, "none", [], {}) or value == {"type": "text"}:
            continue
        raise bad(name, f"{name} is not supported by this server")


# SamplingParams' names -> the request's
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


def choice_seed(seed: Optional[int], i: int) -> Optional[int]:
    """Choice i's seed of a request with `seed` (None: unseeded): seed + i, wrapping past 2**64 - 1."""
    return None if seed is None else (seed + i) % SEED_LIMIT


def sampling_params(body: dict, *, max_tokens: int, temperature_default: float, top_p_default: float = 1.0,
                    top_k_default: int = 0, seed: Optional[int] = None, names: Optional[dict] = None) -> SamplingParams:
    """SamplingParams of the request's temperature, top_p, top_k, repetition_penalty, stop, `seed`, and the
    extensions speculate ("lookup" | "draft") and num_speculative_tokens (max_tokens already resolved by the
    caller). A bad value is a 400 naming the request's field (`names` maps SamplingParams' names to the
    endpoint's own, e.g. max_new_tokens -> n_predict)."""
    names = {**_PARAM_NAMES, **(names or {})}
    stop = body.get("stop")
    try:
        return SamplingParams(max_new_tokens=max_tokens,
                              temperature=get_number(body, "temperature", temperature_default),
                              top_p=get_number(body, "top_p", top_p_default),
                              top_k=get_int(body, "top_k", top_k_default),
                              repetition_penalty=get_number(body, "repetition_penalty", 1.0),
                              stop=stop if stop != [] else None, seed=seed,
                              speculate=body.get("speculate"),
                              num_speculative_tokens=get_int(body, "num_speculative_tokens", 8))
    except APIError as e:  # (a field of the wrong type, named as the endpoint names it)
        shown = names.get(e.param, e.param)
        raise bad(shown, e.message.replace(f"{e.param}=", f"{shown}=", 1)) from None
    except ValueError as e:
        name = re.match(r"(\w+)=", str(e))
        param = name.group(1) if name else None
        shown = names.get(param, param)
        message = str(e).replace(f"{param}=", f"{shown}=", 1) if param else str(e)
        raise bad(shown, message) from None


def check_context(n_prompt: int, max_tokens: Optional[int], context: int, *, prompt_param: str = "prompt",
                  tokens_param: str = "max_tokens") -> None:
    """A prompt over the context, or one that leaves no room for `max_tokens` (None: not asked), is a 400
    (OpenAI: "This model's maximum context length is ...")."""
    if n_prompt > context:
        raise bad(prompt_param, f"This model's maximum context length is {context} tokens. However, your "
                  f"prompt is {n_prompt} tokens.")
    if max_tokens is not None and n_prompt + max_tokens > context:
        raise bad(tokens_param, f"This model's maximum context length is {context} tokens. However, you "
                  f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                  f"completion). Please reduce the prompt or {tokens_param}.")


def finish_reason(reason: str) -> str:
    """The engine's finish reason as OpenAI's: "length", else "stop" (a stop string, EOS or EOT)."""
    return "length" if reason == "length" else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
