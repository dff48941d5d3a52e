"""Checkpoint loading: HF layout (single or sharded safetensors, or .bin) and Meta layout
(params.json + consolidated.NN.pth shards), validated tensor by tensor. Quantized HF checkpoints
(bitsandbytes 4-bit, GPTQ, our own) are read by `quant_checkpoint`; `load_weights` dispatches.

Every failure raises CheckpointError naming the file and tensor. Meta's q/k weights are
permuted from the interleaved RoPE layout to the rotate-half layout the graph uses.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Optional

import torch
from torch import nn

from .config import ModelArgs, generation_eos_ids, read_json
from .errors import CheckpointError
from .model import Linear, Transformer
from .progress import Progress
from .quant import QuantLinear, quantize_model, quantized_modules, set_module
from .quant_checkpoint import _BNB_STATE, Quantization, Tensors, read_projection, read_quantization
from .tensor_files import open_tensor_file

SUPPORTED_SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|rope\.freqs)$")


@dataclass
class Part:
    """One source tensor feeding (part of) a parameter."""

    name: str
    shape: tuple
    cat_dim: Optional[int] = None   # Meta shards: concatenated along this dim; None: replicated
    rope_heads: int = 0             # Meta q/k: heads to permute from interleaved to rotate-half


# ---- locating a checkpoint -----------------------------------------------------------------

def _hub_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def resolve_path(path) -> Path:
    """A model directory, or a hub id ('org/name') found in the local Hugging Face cache.

    Nothing is downloaded.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError("expected a model directory, got a file", file=p)
    name = os.fspath(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        for cache in _hub_cache_dirs():
            repo = cache / ("models--" + name.replace("/", "--"))
            ref = repo / "refs" / "main"
            snapshots = repo / "snapshots"
            if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
                return snapshots / ref.read_text().strip()
            if snapshots.is_dir():
                found = sorted(snapshots.iterdir(), key=lambda d: d.stat().st_mtime)
                if found:
                    return found[-1]
        raise CheckpointError("no such directory, and not in the local Hugging Face cache "
                              "(nothing is downloaded)", file=name)
    raise CheckpointError("no such model directory", file=p)


def detect_layout(directory: Path) -> str:
    if (directory / "config.json").is_file():
        return "hf"
    if (directory / "params.json").is_file():
        return "meta"
    raise CheckpointError("not a model directory: neither config.json (Hugging Face layout) nor "
                          "params.json (Meta layout) found", file=directory)


# ---- tensor sources ------------------------------------------------------------------------

class HFSource:
    """Tensors of an HF-layout directory: model.safetensors, sharded safetensors with
    model.safetensors.index.json, or the same for pytorch_model*.bin."""

    def __init__(self, directory: Path):
        self.directory = directory
        for stem in ("model.safetensors", "pytorch_model.bin"):
            index, single = directory / f"{stem}.index.json", directory / stem
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError("index has no 'weight_map'", file=index)
                _check_weight_map(weight_map, index)
                for name, f in weight_map.items():
                    if not (directory / f).is_file():
                        raise CheckpointError(f"shard file not found (index {index.name} places this tensor in it)",
                                              file=directory / f, tensor=name)
                readers = {f: open_tensor_file(directory / f) for f in sorted(set(weight_map.values()))}
                self.where = {}
                for reader in readers.values():
                    for name in reader.keys():
                        self.where.setdefault(name, reader)
                for name, f in weight_map.items():
                    if name not in readers[f].keys():
                        raise CheckpointError(f"index {index.name} places this tensor here, but the file "
                                              "does not contain it", file=directory / f, tensor=name)
                self.files = list(readers.values())
                self.weights_file = index
                return
            if single.is_file():
                reader = open_tensor_file(single)
                self.where = {name: reader for name in reader.keys()}
                self.files = [reader]
                self.weights_file = single
                return
        raise CheckpointError("no weights found (expected model.safetensors, sharded safetensors with "
                              "model.safetensors.index.json, or pytorch_model.bin)", file=directory)

    def names(self) -> set[str]:
        return set(self.where)

    def file_of(self, name: str) -> Path:
        return self.where[name].path

    def total_bytes(self) -> int:
        return sum(r.path.stat().st_size for r in self.files)

    def check(self, part: Part) -> None:
        """Shape and dtype of `part` against the file's metadata (no data read)."""
        _check(self._reader(part.name), part.name, part.shape)

    def read(self, part: Part) -> torch.Tensor:
        self.check(part)
        return self.where[part.name].get(part.name)

    # raw access for quantized checkpoints (any dtype; the caller validates shapes)
    def has(self, name: str) -> bool:
        return name in self.where

    def _reader(self, name: str):
        reader = self.where.get(name)
        if reader is None:
            raise CheckpointError("missing tensor", file=self.weights_file, tensor=name)
        return reader

    def shape(self, name: str) -> tuple:
        return self._reader(name).shape(name)

    def dtype(self, name: str):
        return self._reader(name).dtype(name)

    def raw(self, name: str) -> torch.Tensor:
        return self._reader(name).get(name)


class MetaSource:
    """Tensors of Meta's layout: consolidated.NN.pth shards split for model parallelism."""

    def __init__(self, directory: Path):
        self.directory = directory
        paths = sorted(directory.glob("consolidated.*.pth"))
        if not paths:
            raise CheckpointError("no consolidated.NN.pth weight files found", file=directory)
        self.shards = [open_tensor_file(p) for p in paths]
        self.files = self.shards
        self.weights_file = paths[0]

    def names(self) -> set[str]:
        return set().union(*(s.keys() for s in self.shards))

    def file_of(self, name: str) -> Path:
        return next(s.path for s in self.shards if name in s.keys())

    def total_bytes(self) -> int:
        return sum(s.path.stat().st_size for s in self.shards)

    # metadata of one shard's copy or slice (the first shard holding it)
    def has(self, name: str) -> bool:
        return any(name in s.keys() for s in self.shards)

    def _shard(self, name: str):
        shard = next((s for s in self.shards if name in s.keys()), None)
        if shard is None:
            raise CheckpointError("missing tensor", file=self.shards[0].path, tensor=name)
        return shard

    def shape(self, name: str) -> tuple:
        return self._shard(name).shape(name)

    def dtype(self, name: str):
        return self._shard(name).dtype(name)

    def _used_shards(self, part: Part) -> list:
        """The shards `part` is read from (all for a split tensor, the first for a replicated one)."""
        return self.shards if part.cat_dim is not None else self.shards[:1]

    def check(self, part: Part) -> None:
        """Shape and dtype of `part`'s slice in each shard it is read from (no data read)."""
        n = len(self.shards)
        if part.cat_dim is None:
            shard_shape = part.shape
        else:
            if part.shape[part.cat_dim] % n:
                raise CheckpointError(f"dimension {part.shape[part.cat_dim]} does not split over {n} shards",
                                      file=self.shards[0].path, tensor=part.name)
            shard_shape = tuple(d // n if i == part.cat_dim else d for i, d in enumerate(part.shape))
        for shard in self._used_shards(part):
            if part.name not in shard.keys():
                raise CheckpointError("missing tensor", file=shard.path, tensor=part.name)
            _check(shard, part.name, shard_shape)

    def read(self, part: Part) -> torch.Tensor:
        self.check(part)
        pieces = [shard.get(part.name) for shard in self._used_shards(part)]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=part.cat_dim)
        return _interleaved_to_rotate_half(t, part.rope_heads) if part.rope_heads else t


def _check(reader, name: str, shape: tuple) -> None:
    got = reader.shape(name)
    if got != tuple(shape):
        raise CheckpointError(f"has shape {list(got)}, the model config implies {list(shape)} "
                              "(config and weights disagree?)", file=reader.path, tensor=name)
    dtype = reader.dtype(name)
    if dtype not in SUPPORTED_SOURCE_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype} (expected float32, float16 or bfloat16)",
                              file=reader.path, tensor=name)


def _check_weight_map(weight_map: dict, index: Path) -> None:
    """Every entry names a tensor and a file inside the model directory, judged lexically: symlinks are
    not resolved (the Hugging Face cache links each snapshot file into ../../blobs)."""
    for name, f in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"weight_map key {name!r} is not a tensor name (expected a string)", file=index)
        if not isinstance(f, str) or not f or PurePath(f).is_absolute() or ".." in PurePath(f).parts:
            raise CheckpointError(f"weight_map places this tensor in {f!r}: refused, expected a file name inside "
                                  "the model directory (not absolute, no '..')", file=index, tensor=name)


def _interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k rows pair (2i, 2i+1) within each head; HF's pair (i, i + D/2)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ---- what feeds each parameter -------------------------------------------------------------

def hf_plan(args: ModelArgs) -> dict[str, list[Part]]:
    d, q, kv, f, V = args.dim, args.q_dim, args.kv_dim, args.ffn_dim, args.vocab_size
    plan = {"tok_embeddings": [Part("model.embed_tokens.weight", (V, d))],
            "norm": [Part("model.norm.weight", (d,))]}
    if not args.tie_word_embeddings:
        plan["output.weight"] = [Part("lm_head.weight", (V, d))]
    for i in range(args.n_layers):
        p, a, m = f"layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        plan[f"{p}.attn_norm"] = [Part(f"model.layers.{i}.input_layernorm.weight", (d,))]
        plan[f"{p}.attn.wqkv.weight"] = [Part(f"{a}.q_proj.weight", (q, d)), Part(f"{a}.k_proj.weight", (kv, d)),
                                  Part(f"{a}.v_proj.weight", (kv, d))]
        plan[f"{p}.attn.wo.weight"] = [Part(f"{a}.o_proj.weight", (d, q))]
        plan[f"{p}.mlp_norm"] = [Part(f"model.layers.{i}.post_attention_layernorm.weight", (d,))]
        plan[f"{p}.mlp.w13.weight"] = [Part(f"{m}.gate_proj.weight", (f, d)), Part(f"{m}.up_proj.weight", (f, d))]
        plan[f"{p}.mlp.w2.weight"] = [Part(f"{m}.down_proj.weight", (d, f))]
    return plan


def meta_plan(args: ModelArgs) -> dict[str, list[Part]]:
    d, q, kv, f, V = args.dim, args.q_dim, args.kv_dim, args.ffn_dim, args.vocab_size
    plan = {"tok_embeddings": [Part("tok_embeddings.weight", (V, d), cat_dim=1)],
            "norm": [Part("norm.weight", (d,))],
            "output.weight": [Part("output.weight", (V, d), cat_dim=0)]}
    for i in range(args.n_layers):
        p, a, m = f"layers.{i}", f"layers.{i}.attention", f"layers.{i}.feed_forward"
        plan[f"{p}.attn_norm"] = [Part(f"layers.{i}.attention_norm.weight", (d,))]
        plan[f"{p}.attn.wqkv.weight"] = [Part(f"{a}.wq.weight", (q, d), 0, rope_heads=args.n_heads),
                                  Part(f"{a}.wk.weight", (kv, d), 0, rope_heads=args.n_kv_heads),
                                  Part(f"{a}.wv.weight", (kv, d), 0)]
        plan[f"{p}.attn.wo.weight"] = [Part(f"{a}.wo.weight", (d, q), 1)]
        plan[f"{p}.mlp_norm"] = [Part(f"layers.{i}.ffn_norm.weight", (d,))]
        plan[f"{p}.mlp.w13.weight"] = [Part(f"{m}.w1.weight", (f, d), 0), Part(f"{m}.w3.weight", (f, d), 0)]
        plan[f"{p}.mlp.w2.weight"] = [Part(f"{m}.w2.weight", (d, f), 1)]
    return plan


# ---- loading -------------------------------------------------------------------------------

def read_args(directory: Path, layout: str) -> ModelArgs:
    if layout == "hf":
        config = read_json(directory / "config.json")
        read_quantization(config, directory / "config.json")  # an unsupported quantization fails here
        args = ModelArgs.from_hf_config(config, file=directory / "config.json")
        gen = directory / "generation_config.json"
        if gen.is_file():
            extra = generation_eos_ids(read_json(gen), file=gen)
            args.eos_ids = tuple(dict.fromkeys([*args.eos_ids, *extra]))
        return args
    return ModelArgs.from_meta_params(read_json(directory / "params.json"), file=directory / "params.json")


_EMBEDDING = {"hf": "model.embed_tokens.weight", "meta": "tok_embeddings.weight"}


def fill_vocab_size(args: ModelArgs, source, layout: str) -> None:
    """Meta's params.json may say vocab_size -1: take it from the embedding's rows (in place)."""
    if args.vocab_size <= 0:
        args.vocab_size = source.shape(_EMBEDDING[layout])[0]


def check_shapes(source, layout: str, args: ModelArgs) -> None:
    """Check the shape and dtype of every tensor of the model's plan that `source` holds densely, from
    tensor metadata alone (no data is read), so that a config disagreeing with the weights fails before
    the model is allocated; each failure is the CheckpointError `load_weights` would raise.

    Quantized projections (stored under other names, as integers, or with a bitsandbytes quant state)
    are left to the loader, and so are missing tensors, except each layer's first norm: layers the
    weights lack are reported before a plan for a corrupt n_layers is built.
    """
    norm = "model.layers.{}.input_layernorm.weight" if layout == "hf" else "layers.{}.attention_norm.weight"
    layers = {m.group(1) for n in source.names() if (m := re.match(r"(?:model\.)?layers\.(\d+)\.", n))}
    for i in range(min(args.n_layers, len(layers) + 1)):  # bounded: a corrupt n_layers must not build a huge plan
        if not source.has(norm.format(i)):
            raise CheckpointError("missing tensor", file=source.weights_file, tensor=norm.format(i))
    if args.vocab_size < 1:  # Meta's -1: the loader takes it from the embedding
        embedding = _EMBEDDING[layout]
        if not source.has(embedding) or len(source.shape(embedding)) != 2:
            return  # the loader reports it
        args = dataclasses.replace(args)
        fill_vocab_size(args, source, layout)
    plan = hf_plan(args) if layout == "hf" else meta_plan(args)
    for parts in plan.values():
        for part in parts:
            if source.has(part.name) and not _stored_quantized(source, part.name):
                source.check(part)


def _stored_quantized(source, name: str) -> bool:
    dtype = source.dtype(name)
    integer = isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex)
    return integer or source.has(name + _BNB_STATE)  # bnb_4bit_quant_storage may be a float dtype


def checkpoint_quantization(directory: Path, layout: str) -> Optional[Quantization]:
    """How the checkpoint's weights are quantized (its config.json's quantization_config), or None."""
    if layout != "hf":
        return None
    return read_quantization(read_json(directory / "config.json"), directory / "config.json")


def open_source(directory: Path, layout: str):
    return HFSource(directory) if layout == "hf" else MetaSource(directory)


def load_weights(model: Transformer, source, layout: str, *, quantization: Optional[Quantization] = None,
                 quantize: Optional[str] = None, group_size: int = 128, quantize_head: bool = False,
                 progress: Optional[bool] = None) -> None:
    """Fill every parameter of `model` from `source`, converting dtype and device once per tensor.

    quantization: the checkpoint's own (its quantized projections become QuantLinear modules as stored).
    quantize: "nf4" | "int4" quantizes every dense projection of the blocks (and the lm_head with
    `quantize_head`) right after reading it, so the dense model never exists whole; the blocks'
    projections may then be allocated on the meta device (see `Transformer(linear_device=...)`).
    """
    plan = hf_plan(model.args) if layout == "hf" else meta_plan(model.args)
    params = dict(model.named_parameters(remove_duplicate=False))
    linears = {name for name, m in model.named_modules() if isinstance(m, Linear)}
    bar = Progress(source.total_bytes(), f"loading {source.directory.name}", enabled=progress)
    consumed = set()
    tensors = Tensors(source, consumed, bar, model.device) if quantization is not None else None
    try:
        for target, parts in plan.items():
            module, _, leaf = target.rpartition(".")
            if leaf != "weight" or module not in linears:
                _read_dense(source, parts, params[target], consumed, bar)
                continue
            lin = model.get_submodule(module)
            shape = tuple(lin.weight.shape)
            if tensors is not None:
                qparts = read_projection(tensors, quantization, module, parts, shape, model.dtype)
                if qparts is not None:
                    set_module(model, module, QuantLinear(qparts))
                    continue
            if lin.weight.is_meta:
                lin.weight = nn.Parameter(torch.empty(shape, dtype=model.dtype, device=model.device),
                                          requires_grad=False)
            _read_dense(source, parts, lin.weight, consumed, bar)
            if quantize is not None and (module != "output" or quantize_head):
                _quantize(model, quantize, group_size, quantize_head, [module], source, parts)
        if tensors is not None and quantization.quantize_head and "output.weight" not in plan:
            # tied embeddings, quantized head: the head's parts are stored on their own
            set_module(model, "output", QuantLinear(read_projection(
                tensors, quantization, "output", [], (model.args.vocab_size, model.args.dim), model.dtype)))
        if quantize is not None:  # what the plan does not name (a tied head)
            _quantize(model, quantize, group_size, quantize_head, None, source, [])
    finally:
        bar.close()
    unexpected = sorted(n for n in source.names() - consumed if not _IGNORED.search(n))
    if unexpected:
        raise CheckpointError(f"unexpected tensor: not part of a Llama model with n_layers={model.args.n_layers}"
                              f"{' and tied embeddings' if model.args.tie_word_embeddings else ''} "
                              f"(config and weights disagree?); {len(unexpected)} such tensor(s)",
                              file=source.file_of(unexpected[0]), tensor=unexpected[0])
    for name, p in model.named_parameters():
        if p.is_meta:
            raise CheckpointError("no weights for this parameter", file=source.directory, tensor=name)
        if not torch.isfinite(p).all():
            raise CheckpointError("weights contain NaN or Inf", file=source.directory, tensor=name)
    for name, q in quantized_modules(model).items():
        for buf_name, b in q.named_buffers(recurse=False):
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise CheckpointError("quantization scales contain NaN or Inf", file=source.directory,
                                      tensor=f"{name}.{buf_name}")


def _read_dense(source, parts: list, dest: torch.Tensor, consumed: set, bar) -> None:
    offset = 0
    for part in parts:
        t = source.read(part)
        dest[offset:offset + part.shape[0]].copy_(t)
        offset += part.shape[0]
        consumed.add(part.name)
        bar.update(t.numel() * t.element_size())


def _quantize(model, method, group_size, quantize_head, only, source, parts) -> None:
    try:
        quantize_model(model, method, group_size=group_size, quantize_head=quantize_head, only=only)
    except ValueError as e:
        name = parts[0].name if parts else None
        raise CheckpointError(f"cannot quantize to {method}: {e}",
                              file=source.file_of(name) if name else source.directory, tensor=name) from None
