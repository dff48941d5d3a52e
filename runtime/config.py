"""Model hyper-parameters (`ModelArgs`), read from HF `config.json` or Meta `params.json`, and named presets."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import CheckpointError


MAX_CONTEXT = 2 ** 20  # tokens: a larger max_position_embeddings / max_seq_len is a corrupt config
_MAX_INT = 2 ** 31 - 1  # no real model has a size or token id above this
_REQUIRED = object()


class _Invalid(ValueError):
    """A value's problem that concerns one entry (`key`, holding `value`) inside it."""

    def __init__(self, reason: str, key: str, value):
        super().__init__(reason)
        self.key, self.value = key, value


# ---- value rules, shared by ModelArgs.validate and the readers -------------------------------------
# Each takes a value and returns it normalized, or raises ValueError saying what was expected.

def _integer(minimum: int, reason: str = "", maximum: int = _MAX_INT, too_large: str = "") -> Callable:
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


_count = _integer(1)
_token_id = _integer(0, "expected a token id (an integer >= 0)")


def _vocab_size(value) -> int:
    """An integer >= 1, or -1: Meta's "take it from the embedding"."""
    if not isinstance(value, bool) and value == -1:
        return -1
    return _integer(1, "expected an integer >= 1, or -1 (taken from the embedding)")(value)


_context = _integer(1, maximum=MAX_CONTEXT,
                    too_large=f"larger than any supported context ({MAX_CONTEXT} tokens); corrupt config?")


def _head_dim(value) -> int:
    n = _integer(1, "expected a positive even integer")(value)
    if n % 2:
        raise ValueError("expected a positive even integer (rotary embeddings rotate pairs)")
    return n


def _head_dim_or_zero(value) -> int:
    """ModelArgs.head_dim: 0 means dim // n_heads."""
    return 0 if not isinstance(value, bool) and value == 0 else _head_dim(value)


def _positive(value) -> float:
    """A finite number > 0 (bools and strings refused)."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and 0 < float(value) < math.inf
    except OverflowError:
        ok = False
    if not ok:
        raise ValueError("expected a finite number > 0")
    return float(value)


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _token_ids(value) -> tuple:
    """One token id or a non-empty list of them -> a tuple."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        if not items:
            raise ValueError
        return tuple(_token_id(v) for v in items)
    except ValueError:
        raise ValueError("expected a token id (an integer >= 0) or a non-empty list of them") from None


def _object(value) -> dict:
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _rope_scaling(value) -> Optional[dict]:
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
        raise _Invalid("only 'linear' rope_scaling is supported (or 'default')", key, kind)
    factor = value.get("factor", 1.0)
    try:
        return {"type": "linear", "factor": _positive(factor)}
    except ValueError as e:
        raise _Invalid(str(e), "factor", factor) from None


_FIELD_RULES = {
    "dim": _count, "n_layers": _count, "n_heads": _count, "n_kv_heads": _count, "ffn_dim": _count,
    "vocab_size": _vocab_size, "norm_eps": _positive, "rope_theta": _positive, "rope_scaling": _rope_scaling,
    "max_seq_len": _context, "bos_id": _token_id, "eos_ids": _token_ids, "tie_word_embeddings": _flag,
    "head_dim": _head_dim_or_zero,
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
    if isinstance(err, _Invalid):
        name, value = f"{name}.{err.key}", err.value
    return f"{name}={_show(value)} is invalid: {err}"


def _check_fields(values: dict, names: dict) -> dict:
    """`values` (ModelArgs fields) normalized by their rules, then checked for how heads and sizes fit together.

    Raises ValueError naming each value as `names` does (a field missing from it by its own name)."""
    def name(attr: str) -> str:
        return names.get(attr, attr)

    values = dict(values)
    if values.get("n_kv_heads") is None:
        values["n_kv_heads"] = values["n_heads"]
    for attr, parse in _FIELD_RULES.items():
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


def _get(mapping: dict, key: str, parse: Callable, *, file, default=_REQUIRED, name: Optional[str] = None):
    """mapping[key] normalized by `parse`; `default` when absent or null (an error when required).

    Raises CheckpointError naming `file` and the key (as `name`, when it sits inside another key)."""
    name = name or key
    if key not in mapping or (mapping[key] is None and default is not _REQUIRED):
        if default is _REQUIRED:
            raise CheckpointError(f"missing required key {name!r}", file=file)
        return default
    try:
        return parse(mapping[key])
    except ValueError as e:
        raise CheckpointError(_problem(name, mapping[key], e), file=file) from None


def generation_eos_ids(config: dict, *, file="generation_config.json") -> tuple:
    """The eos token ids a generation_config.json dict names (an id or a list of them); () when none."""
    return _get(config, "eos_token_id", _token_ids, file=file, default=())


# how each file names the ModelArgs fields (in messages about values that must fit together)
_HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
            "max_seq_len": "max_position_embeddings", "bos_id": "bos_token_id", "eos_ids": "eos_token_id"}
_META_KEYS = {"ffn_dim": "ffn_dim (from dim, multiple_of, ffn_dim_multiplier)"}


@dataclass
class ModelArgs:
    """Shapes and numerics of a Llama-2-architecture model.

    Every value a checkpoint carries is read from it; presets only exist to
    describe published models without their weights (benchmarks, `info`).
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (MHA)
    ffn_dim: int = 11008
    vocab_size: int = 32016  # -1: not known yet (Meta's params.json); the loader takes it from the embedding
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None  # {"type": "linear", "factor": f} or None
    max_seq_len: int = 16384
    bos_id: int = 1
    eos_ids: tuple = (2,)
    tie_word_embeddings: bool = False
    head_dim: int = field(init=True, default=0)  # 0: dim // n_heads

    def __post_init__(self):
        self.validate()
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads

    def validate(self) -> None:
        """Check every field and how heads and sizes fit together, raising ValueError naming the field.

        Values are normalized in place: 4096.0 -> 4096, an eos id -> a tuple, n_kv_heads None -> n_heads,
        rope_scaling -> {"type": "linear", "factor": f} or None. The readers apply the same rules to the
        keys of config.json / params.json and name those instead.
        """
        values = _check_fields({f: getattr(self, f) for f in _FIELD_RULES}, {})
        for f, v in values.items():
            setattr(self, f, v)

    @property
    def rope_factor(self) -> float:
        return 1.0 if self.rope_scaling is None else self.rope_scaling["factor"]

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of one block's projections as the graph holds them: fused wqkv, wo, fused w13
        (gate + up), w2."""
        return {"wqkv": (self.q_dim + 2 * self.kv_dim, self.dim), "wo": (self.dim, self.q_dim),
                "w13": (2 * self.ffn_dim, self.dim), "w2": (self.dim, self.ffn_dim)}

    def param_count(self) -> int:
        """Number of parameters, computed from shapes."""
        per_layer = sum(o * i for o, i in self.projection_shapes().values()) + 2 * self.dim  # + two norms
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    def kv_cache_bytes(self, batch: int, seq_len: int, bytes_per_elem: int) -> int:
        """Bytes of a static KV cache for `batch` sequences of `seq_len` tokens."""
        return 2 * self.n_layers * batch * self.n_kv_heads * seq_len * self.head_dim * bytes_per_elem

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- readers -------------------------------------------------------------------------
    # Each key is parsed on its own (CheckpointError naming the file and key), then the values that must
    # fit together are checked by the rules ModelArgs.validate uses, naming the file's keys.

    @classmethod
    def from_hf_config(cls, config: dict, *, file="config.json") -> "ModelArgs":
        """Read a Hugging Face `LlamaForCausalLM` config.json dict."""
        arch = config.get("architectures") or ["LlamaForCausalLM"]
        model_type = config.get("model_type", "llama")
        if model_type != "llama" or not isinstance(arch, list) or \
                not any(a in ("LlamaForCausalLM", "LlamaModel") for a in arch):
            raise CheckpointError(
                f"unsupported model: model_type={model_type!r}, architectures={arch} "
                "(only Llama-architecture models such as CodeLlama are supported)", file=file)
        get = functools.partial(_get, config, file=file)
        # transformers 5 moved rope_theta and the scaling into rope_parameters
        rope = get("rope_parameters", _object, default={})
        if config.get("rope_theta") is not None:
            rope_theta = get("rope_theta", _positive)
        else:
            rope_theta = _get(rope, "rope_theta", _positive, file=file, default=10000.0,
                              name="rope_parameters.rope_theta")
        if config.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
            rope_scaling = get("rope_parameters", _rope_scaling)
        else:
            rope_scaling = get("rope_scaling", _rope_scaling, default=None)
        values = dict(
            dim=get("hidden_size", _count),
            n_layers=get("num_hidden_layers", _count),
            n_heads=get("num_attention_heads", _count),
            n_kv_heads=get("num_key_value_heads", _count, default=None),
            ffn_dim=get("intermediate_size", _count),
            vocab_size=get("vocab_size", _count),
            norm_eps=get("rms_norm_eps", _positive, default=1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=get("max_position_embeddings", _context, default=2048),
            bos_id=get("bos_token_id", _token_id, default=1),
            eos_ids=get("eos_token_id", _token_ids, default=(2,)),
            tie_word_embeddings=get("tie_word_embeddings", _flag, default=False),
            head_dim=get("head_dim", _head_dim, default=0),
        )
        return cls._from_file(values, _HF_KEYS, file)

    @classmethod
    def from_meta_params(cls, params: dict, *, file="params.json") -> "ModelArgs":
        """Read Meta's params.json (ffn size derived as in Meta's `FeedForward`)."""
        get = functools.partial(_get, params, file=file)
        dim = get("dim", _count)
        multiple_of = get("multiple_of", _count, default=256)
        multiplier = get("ffn_dim_multiplier", _positive, default=None)
        ffn_dim = _meta_ffn_dim(dim, multiple_of, multiplier)
        if ffn_dim > _MAX_INT:
            raise CheckpointError(f"dim={dim}, multiple_of={multiple_of} and ffn_dim_multiplier={multiplier} give "
                                  f"a feed-forward size of {ffn_dim}, larger than {_MAX_INT}; corrupt config?",
                                  file=file)
        rope_theta = get("rope_theta", _positive, default=10000.0)
        values = dict(
            dim=dim,
            n_layers=get("n_layers", _count),
            n_heads=get("n_heads", _count),
            n_kv_heads=get("n_kv_heads", _count, default=None),
            ffn_dim=ffn_dim,
            vocab_size=get("vocab_size", _vocab_size, default=-1),
            norm_eps=get("norm_eps", _positive, default=1e-5),
            rope_theta=rope_theta,
            # params.json carries no context length: CodeLlama (rope_theta 1e6) was trained
            # for 16k tokens, Llama 2 (rope_theta 1e4) for 4k.
            max_seq_len=get("max_seq_len", _context, default=16384 if rope_theta >= 1e6 else 4096),
        )
        return cls._from_file(values, _META_KEYS, file)

    @classmethod
    def _from_file(cls, values: dict, keys: dict, file) -> "ModelArgs":
        """ModelArgs of a file's parsed values; CheckpointError naming the file and `keys` when they do not fit."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        try:
            return cls(**_check_fields({**defaults, **values}, keys))
        except ValueError as e:
            raise CheckpointError(str(e), file=file) from None

    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        """Published shapes of a CodeLlama model, looked up by exact name (e.g. 'CodeLlama-34b-Python')."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name])


def _meta_ffn_dim(dim: int, multiple_of: int, multiplier: Optional[float]) -> int:
    """Meta's FeedForward size: 2/3 of 4 * dim, times ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(min(multiplier * hidden, 2.0 ** 62))  # min: a huge multiplier must not overflow int()
    return multiple_of * math.ceil(hidden / multiple_of)


def _codellama(dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size):
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                     vocab_size=vocab_size, rope_theta=1e6, max_seq_len=16384, norm_eps=1e-5)


_BASE_SHAPES = {
    "7b": _codellama(4096, 32, 32, 32, 11008, 32016),
    "13b": _codellama(5120, 40, 40, 40, 13824, 32016),
    "34b": _codellama(8192, 48, 64, 8, 22016, 32000),
    "70b": _codellama(8192, 80, 64, 8, 28672, 32016),
}

PRESETS: dict[str, ModelArgs] = {
    f"CodeLlama-{size}{variant}": shape
    for size, shape in _BASE_SHAPES.items()
    for variant in ("", "-Python", "-Instruct")
}


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
