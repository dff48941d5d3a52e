"""Rules for the values a checkpoint's config files hold, shared by `ModelArgs.validate` and the readers.

Each rule takes a value and returns it normalized, or raises ValueError saying what was expected; `get`
reads one key with a rule and names the file and key in a CheckpointError.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Callable, Optional

from ..errors import CheckpointError


MAX_CONTEXT = 2 ** 20  # tokens: a larger max_position_embeddings / max_seq_len is a corrupt config
MAX_INT = 2 ** 31 - 1  # no real model has a size or token id above this
REQUIRED = object()


class Invalid(ValueError):
    """A value's problem that concerns one entry (`key`, holding `value`) inside it."""

    def __init__(self, reason: str, key: str, value):
        super().__init__(reason)
        self.key, self.value = key, value


# ---- value rules, shared by ModelArgs.validate and the readers -------------------------------------
# Each takes a value and returns it normalized, or raises ValueError saying what was expected.

def integer(minimum: int, reason: str = "", maximum: int = MAX_INT, too_large: str = "") -> Callable:
    """An integer from `minimum` to `maximum` (an integral float is one; a bool is not)."""
    reason = reason or f"expected an integer >= {minimum}"
    too_large = too_large or f"larger than {maximum}; corrupt config?"

    def parse(value) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(reason)
        if value > maximum:
            raise ValueError(too_large)
        return int(value)
    return parse


count = integer(1)
token_id = integer(0, "expected a token id (an integer >= 0)")


def vocab_size(value) -> int:
    """An integer >= 1, or -1: Meta's "take it from the embedding"."""
    if not isinstance(value, bool) and value == -1:
        return -1
    return integer(1, "expected an integer >= 1, or -1 (taken from the embedding)")(value)


context = integer(1, maximum=MAX_CONTEXT,
                    too_large=f"larger than any supported context ({MAX_CONTEXT} tokens); corrupt config?")


def head_dim(value) -> int:
    n = integer(1, "expected a positive even integer")(value)
    if n % 2:
        raise ValueError("expected a positive even integer (rotary embeddings rotate pairs)")
    return n


def head_dim_or_zero(value) -> int:
    """ModelArgs.head_dim: 0 means dim // n_heads."""
    return 0 if not isinstance(value, bool) and value == 0 else head_dim(value)


def positive(value) -> float:
    """A finite number > 0 (bools and strings refused)."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and 0 < float(value) < math.inf
    except OverflowError:
        ok = False
    if not ok:
        raise ValueError("expected a finite number > 0")
    return float(value)


def flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def token_ids(value) -> tuple:
    """One token id or a non-empty list of them -> a tuple."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        if not items:
            raise ValueError
        return tuple(token_id(v) for v in items)
    except ValueError:
        raise ValueError("expected a token id (an integer >= 0) or a non-empty list of them") from None


def json_object(value) -> dict:
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def rope_scaling(value) -> Optional[dict]:
    """None, or {"type" | "rope_type": "linear", "factor": f} -> {"type": "linear", "factor": f};
    type "default" -> None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError('expected an object such as {"type": "linear", "factor": 2.0}, or null')
    key = "type" if value.get("type") is not None else "rope_type"
    kind = value.get(key)
    if kind is None or kind == "default":
        return None
    if kind != "linear":
        raise Invalid("only 'linear' rope_scaling is supported (or 'default')", key, kind)
    factor = value.get("factor", 1.0)
    try:
        return {"type": "linear", "factor": positive(factor)}
    except ValueError as e:
        raise Invalid(str(e), "factor", factor) from None


FIELD_RULES = {
    "dim": count, "n_layers": count, "n_heads": count, "n_kv_heads": count, "ffn_dim": count,
    "vocab_size": vocab_size, "norm_eps": positive, "rope_theta": positive, "rope_scaling": rope_scaling,
    "max_seq_len": context, "bos_id": token_id, "eos_ids": token_ids, "tie_word_embeddings": flag,
    "head_dim": head_dim_or_zero,
}


def _show(value, limit: int = 60) -> str:
    """`value` as its JSON text (repr when it has none), shortened to one short line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _problem(name: str, value, err: ValueError) -> str:
    """'<name>=<value> is invalid: <why>', naming the entry inside the value when the problem is there."""
    if isinstance(err, Invalid):
        name, value = f"{name}.{err.key}", err.value
    return f"{name}={_show(value)} is invalid: {err}"


def check_fields(values: dict, names: dict) -> dict:
    """`values` (ModelArgs fields) normalized by their rules, then checked for how heads and sizes fit together.

    Raises ValueError naming each value as `names` does (a field missing from it by its own name)."""
    def name(attr: str) -> str:
        return names.get(attr, attr)

    values = dict(values)
    if values.get("n_kv_heads") is None:
        values["n_kv_heads"] = values["n_heads"]
    for attr, parse in FIELD_RULES.items():
        try:
            values[attr] = parse(values[attr])
        except ValueError as e:
            raise ValueError(_problem(name(attr), values[attr], e)) from None
    dim, n_heads, n_kv_heads, head_dim = (values[f] for f in ("dim", "n_heads", "n_kv_heads", "head_dim"))
    if not head_dim and dim % n_heads:
        raise ValueError(f"{name('dim')}={dim} is not divisible by {name('n_heads')}={n_heads}")
    if n_heads % n_kv_heads:
        raise ValueError(f"{name('n_heads')}={n_heads} is not a multiple of {name('n_kv_heads')}={n_kv_heads}")
    if not head_dim and dim // n_heads % 2:
        raise ValueError(f"{name('dim')}={dim} / {name('n_heads')}={n_heads} gives head_dim {dim // n_heads}, "
                         "which must be even for rotary embeddings")
    return values


def get(mapping: dict, key: str, parse: Callable, *, file, default=REQUIRED, name: Optional[str] = None):
    """mapping[key] normalized by `parse`; `default` when absent or null (an error when required).

    Raises CheckpointError naming `file` and the key (as `name`, when it sits inside another key)."""
    name = name or key
    if key not in mapping or (mapping[key] is None and default is not REQUIRED):
        if default is REQUIRED:
            raise CheckpointError(f"missing required key {name!r}", file=file)
        return default
    try:
        return parse(mapping[key])
    except ValueError as e:
        raise CheckpointError(_problem(name, mapping[key], e), file=file) from None


def generation_eos_ids(config: dict, *, file="generation_config.json") -> tuple:
    """The eos token ids a generation_config.json dict names (an id or a list of them); () when none."""
    return get(config, "eos_token_id", token_ids, file=file, default=())



def read_json(path: Path) -> dict:
    """Read a JSON file, raising CheckpointError naming it when it is missing or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError("file not found", file=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read JSON: {e}", file=path) from None
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", file=path)
    return data
