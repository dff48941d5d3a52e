"""Model hyper-parameters (`ModelArgs`), read from HF `config.json` or Meta `params.json`, and named presets."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import CheckpointError


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
    vocab_size: int = 32016
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None  # {"type": "linear", "factor": f} or None
    max_seq_len: int = 16384
    bos_id: int = 1
    eos_ids: tuple = (2,)
    tie_word_embeddings: bool = False
    head_dim: int = field(init=True, default=0)  # 0: dim // n_heads

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if isinstance(self.eos_ids, int):
            self.eos_ids = (self.eos_ids,)
        self.eos_ids = tuple(int(e) for e in self.eos_ids)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind in (None, "default"):
                self.rope_scaling = None
            elif kind != "linear":
                raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'linear')")
            else:
                factor = float(self.rope_scaling.get("factor", 1.0))
                if not factor > 0:
                    raise ValueError(f"rope_scaling factor must be > 0, got {factor}")
                self.rope_scaling = {"type": "linear", "factor": factor}

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

    @classmethod
    def from_hf_config(cls, config: dict, *, file="config.json") -> "ModelArgs":
        """Read a Hugging Face `LlamaForCausalLM` config.json dict."""
        arch = config.get("architectures") or ["LlamaForCausalLM"]
        model_type = config.get("model_type", "llama")
        if model_type != "llama" or not any(a in ("LlamaForCausalLM", "LlamaModel") for a in arch):
            raise CheckpointError(
                f"unsupported model: model_type={model_type!r}, architectures={arch} "
                "(only Llama-architecture models such as CodeLlama are supported)", file=file)
        try:
            dim = int(config["hidden_size"])
            n_heads = int(config["num_attention_heads"])
            rope = config.get("rope_parameters") or {}
            rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
            scaling = config.get("rope_scaling")
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = rope
            eos = config.get("eos_token_id", 2)
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
            return cls(
                dim=dim,
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                ffn_dim=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                max_seq_len=int(config.get("max_position_embeddings", 2048)),
                bos_id=int(config.get("bos_token_id", 1)),
                eos_ids=eos_ids,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                head_dim=int(config.get("head_dim") or dim // n_heads),
            )
        except KeyError as e:
            raise CheckpointError(f"missing required key {e.args[0]!r}", file=file) from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"invalid config: {e}", file=file) from None

    @classmethod
    def from_meta_params(cls, params: dict, *, file="params.json") -> "ModelArgs":
        """Read Meta's params.json (ffn size derived as in Meta's `FeedForward`)."""
        try:
            dim = int(params["dim"])
            hidden = int(2 * (4 * dim) / 3)
            if params.get("ffn_dim_multiplier") is not None:
                hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
            multiple_of = int(params.get("multiple_of", 256))
            hidden = multiple_of * math.ceil(hidden / multiple_of)
            rope_theta = float(params.get("rope_theta", 10000.0))
            return cls(
                dim=dim,
                n_layers=int(params["n_layers"]),
                n_heads=int(params["n_heads"]),
                n_kv_heads=params.get("n_kv_heads"),
                ffn_dim=hidden,
                vocab_size=int(params.get("vocab_size", -1)),
                norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=rope_theta,
                # params.json carries no context length: CodeLlama (rope_theta 1e6) was trained
                # for 16k tokens, Llama 2 (rope_theta 1e4) for 4k.
                max_seq_len=int(params.get("max_seq_len", 16384 if rope_theta >= 1e6 else 4096)),
            )
        except KeyError as e:
            raise CheckpointError(f"missing required key {e.args[0]!r}", file=file) from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"invalid params: {e}", file=file) from None

    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        """Published shapes of a CodeLlama model, looked up by exact name (e.g. 'CodeLlama-34b-Python')."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name])


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
