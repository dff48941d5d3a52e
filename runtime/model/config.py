"""Model hyper-parameters (`ModelArgs`), read from HF `config.json` or Meta `params.json`, and named presets."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import CheckpointError
from . import config_rules as rules


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
        values = rules.check_fields({f: getattr(self, f) for f in rules.FIELD_RULES}, {})
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
        act = config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # (anything else would run as SiLU: silently another model)
            raise CheckpointError(f"hidden_act={act!r} is not supported (Llama's MLP is SiLU-gated: 'silu')", file=file)
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key) not in (None, False):
                raise CheckpointError(f"{key}={config[key]!r} is not supported (Llama's projections have no "
                                      "biases)", file=file)
        get = functools.partial(rules.get, config, file=file)
        # transformers 5 moved rope_theta and the scaling into rope_parameters
        rope = get("rope_parameters", rules.json_object, default={})
        if config.get("rope_theta") is not None:
            rope_theta = get("rope_theta", rules.positive)
        else:
            rope_theta = rules.get(rope, "rope_theta", rules.positive, file=file, default=10000.0,
                              name="rope_parameters.rope_theta")
        if config.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
            rope_scaling = get("rope_parameters", rules.rope_scaling)
        else:
            rope_scaling = get("rope_scaling", rules.rope_scaling, default=None)
        values = dict(
            dim=get("hidden_size", rules.count),
            n_layers=get("num_hidden_layers", rules.count),
            n_heads=get("num_attention_heads", rules.count),
            n_kv_heads=get("num_key_value_heads", rules.count, default=None),
            ffn_dim=get("intermediate_size", rules.count),
            vocab_size=get("vocab_size", rules.count),
            norm_eps=get("rms_norm_eps", rules.positive, default=1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=get("max_position_embeddings", rules.context, default=2048),
            bos_id=get("bos_token_id", rules.token_id, default=1),
            eos_ids=get("eos_token_id", rules.token_ids, default=(2,)),
            tie_word_embeddings=get("tie_word_embeddings", rules.flag, default=False),
            head_dim=get("head_dim", rules.head_dim, default=0),
        )
        return cls._from_file(values, _HF_KEYS, file)

    @classmethod
    def from_meta_params(cls, params: dict, *, file="params.json") -> "ModelArgs":
        """Read Meta's params.json (ffn size derived as in Meta's `FeedForward`)."""
        get = functools.partial(rules.get, params, file=file)
        dim = get("dim", rules.count)
        multiple_of = get("multiple_of", rules.count, default=256)
        multiplier = get("ffn_dim_multiplier", rules.positive, default=None)
        ffn_dim = _meta_ffn_dim(dim, multiple_of, multiplier)
        if ffn_dim > rules.MAX_INT:
            raise CheckpointError(f"dim={dim}, multiple_of={multiple_of} and ffn_dim_multiplier={multiplier} give "
                                  f"a feed-forward size of {ffn_dim}, larger than {rules.MAX_INT}; corrupt config?",
                                  file=file)
        rope_theta = get("rope_theta", rules.positive, default=10000.0)
        values = dict(
            dim=dim,
            n_layers=get("n_layers", rules.count),
            n_heads=get("n_heads", rules.count),
            n_kv_heads=get("n_kv_heads", rules.count, default=None),
            ffn_dim=ffn_dim,
            vocab_size=get("vocab_size", rules.vocab_size, default=-1),
            norm_eps=get("norm_eps", rules.positive, default=1e-5),
            rope_theta=rope_theta,
            # params.json carries no context length: CodeLlama (rope_theta 1e6) was trained
            # for 16k tokens, Llama 2 (rope_theta 1e4) for 4k.
            max_seq_len=get("max_seq_len", rules.context, default=16384 if rope_theta >= 1e6 else 4096),
        )
        return cls._from_file(values, _META_KEYS, file)

    @classmethod
    def _from_file(cls, values: dict, keys: dict, file) -> "ModelArgs":
        """ModelArgs of a file's parsed values; CheckpointError naming the file and `keys` when they do not fit."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        try:
            return cls(**rules.check_fields({**defaults, **values}, keys))
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
