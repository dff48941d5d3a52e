"""The arguments of `load` / `load_model` checked and resolved: dtype, device, context length, int4 group size,
threads, paths and the quantizer's knobs, each a ValueError naming the argument."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .model.config import ModelArgs

# Meta reports CodeLlama (rope theta 1e6) generating stably with up to 100,000 tokens of context, past the
# 16,384 its config states; other models are limited to their config's context.
LONG_CONTEXT = 100_000
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_QUANTIZE = (None, "nf4", "int4", "int8")


def parse_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} is not supported; expected torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def parse_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is invalid: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r} is not supported; expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def context_limit(args: ModelArgs) -> int:
    """The largest `max_seq_len` a model accepts: its config's context (max_position_embeddings), or
    LONG_CONTEXT for CodeLlama's long-context rotary base (rope_theta >= 1e6) when that is larger."""
    return max(args.max_seq_len, LONG_CONTEXT) if args.rope_theta >= 1e6 else args.max_seq_len


def check_seq_len(max_seq_len: Optional[int], args: ModelArgs) -> int:
    """`max_seq_len` (None: the model's context) checked against `context_limit(args)`."""
    if max_seq_len is None:
        return args.max_seq_len
    limit = context_limit(args)
    if max_seq_len > limit:
        extended = f"; rope theta {args.rope_theta:g} extends it to {limit}" if limit > args.max_seq_len else ""
        raise ValueError(f"max_seq_len={max_seq_len} is invalid: this model supports at most {limit} tokens "
                         f"(its context is {args.max_seq_len}{extended})")
    return max_seq_len


def int4_group_size(args: ModelArgs) -> int:
    """The largest int4 group size (128, 64, 32) dividing every projection's input width (the lm_head's
    is `dim`, so this holds with `quantize_head` too)."""
    from .kernels.int4_format import GROUP_SIZES

    widths = {args.dim, args.q_dim, args.ffn_dim}
    for g in sorted(GROUP_SIZES, reverse=True):
        if all(w % g == 0 for w in widths):
            return g
    raise ValueError(f"int4 needs a group size in {GROUP_SIZES} dividing every projection's input width "
                     f"({sorted(widths)}); none does: use int8 or nf4")


MAX_THREADS = 1024  # threads= above it: an OpenMP team that size fails (or aborts) inside libgomp


def resolve_group_size(group_size: Optional[int], quantize: Optional[str], args: ModelArgs) -> int:
    """The int4 group size a load uses: `group_size` when given, else `int4_group_size` for int4 (128 for
    the other methods, which ignore it)."""
    if group_size is not None:
        return group_size
    return int4_group_size(args) if quantize == "int4" else 128


def check_options(quantize, group_size, max_batch_size, max_seq_len) -> None:
    if quantize not in _QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is invalid; expected one of {_QUANTIZE}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size={group_size!r} is invalid: expected an integer >= 1 (or None: automatic)")
    if quantize == "int4" and group_size is not None:
        from .kernels.int4_format import GROUP_SIZES

        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={group_size} is not supported; expected one of {GROUP_SIZES}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size!r} is invalid: expected an integer >= 1")
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 1):
        raise ValueError(f"max_seq_len={max_seq_len!r} is invalid: expected an integer >= 1")


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise ValueError(f"threads={threads!r} is invalid: expected an integer in 1..{MAX_THREADS} (or None: one "
                         "per core)")


def check_path(name: str, value, also: str = "") -> None:
    """`value` (the `name` argument) must be a model directory (str or path) or None."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name}={value!r} is invalid: expected a model directory (a str or path){also} or None")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{name}='' is invalid: give a model directory (or None for the default model)")


def check_quantizer_knobs(quantize, group_size, quantize_head: bool) -> None:
    """`group_size` is int4's, `quantize_head` needs a method: neither is ever silently ignored."""
    if group_size is not None and quantize != "int4":
        raise ValueError(f"group_size={group_size!r} applies to quantize='int4' only (quantize={quantize!r})")
    if quantize_head and quantize is None:
        raise ValueError("quantize_head=True needs quantize= (the method to quantize the lm_head with)")
