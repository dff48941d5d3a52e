"""Loading a model's weights from a checkpoint source (`sources`): every parameter of the graph filled per
its layout's plan (`layouts`), dense or quantized (the checkpoint's own quantization, read by `quantized`, or
quantized while loading); tensors the plan does not use are reported. Every failure raises CheckpointError
naming the file and tensor.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import CheckpointError
from ..model.config import ModelArgs
from ..model.config_rules import read_json
from ..model.transformer import Linear, Transformer
from ..progress import Progress
from ..quant.linear import QuantLinear, quantize_model, quantize_rows, quantized_modules, set_module
from .layouts import EMBEDDING, hf_plan, meta_plan
from .quantized import _BNB_STATE, Quantization, Tensors, read_projection, read_quantization

_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|rope\.freqs)$")


def fill_vocab_size(args: ModelArgs, source, layout: str) -> None:
    """Meta's params.json may say vocab_size -1: take it from the embedding's rows (in place)."""
    if args.vocab_size <= 0:
        args.vocab_size = source.shape(EMBEDDING[layout])[0]


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
        embedding = EMBEDDING[layout]
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

def load_weights(model: Transformer, source, layout: str, *, quantization: Optional[Quantization] = None,
                 quantize: Optional[str] = None, group_size: int = 128, quantize_head: bool = False,
                 progress: Optional[bool] = None, args: Optional[ModelArgs] = None,
                 shard: Optional[tuple[int, int]] = None) -> None:
    """Fill every parameter of `model` from `source`, converting dtype and device once per tensor.

    quantization: the checkpoint's own (its quantized projections become QuantLinear modules as stored).
    quantize: "nf4" | "int4" quantizes every dense projection of the blocks (and the lm_head with
    `quantize_head`) right after reading it, so the dense model never exists whole; the blocks'
    projections may then be allocated on the meta device (see `Transformer(linear_device=...)`).
    shard: (rank, world) of tensor parallelism: `model` is that rank's (its args the rank's slice of the
    heads and FFN columns), `args` the whole model's; each split tensor is read one at a time and only the
    rank's slice kept (Meta's shards, one per rank: only that rank's file is read for them).
    """
    args = args or model.args
    if shard is not None and quantization is not None:
        raise CheckpointError(f"tensor parallelism over a quantized checkpoint ({quantization.describe()}) is not "
                              "supported yet: load the dense checkpoint with quantize=...", file=source.directory)
    plan = hf_plan(args) if layout == "hf" else meta_plan(args)
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
            quantized = quantize is not None and (module != "output" or quantize_head)
            if quantized and lin.weight.is_meta and shard is None and source.reads_rows:
                _read_quantized(model, module, source, parts, shape, quantize, group_size, consumed, bar)
                continue
            if lin.weight.is_meta:
                lin.weight = nn.Parameter(torch.empty(shape, dtype=model.dtype, device=model.device),
                                          requires_grad=False)
            _read_dense(source, parts, lin.weight, consumed, bar, shard)
            if quantized:
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
        if not _all_finite(p):
            raise CheckpointError("weights contain NaN or Inf", file=source.directory, tensor=name)
    for name, q in quantized_modules(model).items():
        for buf_name, b in q.named_buffers(recurse=False):
            if b.is_floating_point() and not _all_finite(b):
                raise CheckpointError("quantization scales contain NaN or Inf", file=source.directory,
                                      tensor=f"{name}.{buf_name}")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def settle_heap() -> None:
    """glibc only, once a model is loaded: hand back the heap loading freed (read, quantize and repack
    temporaries: ~70 MB of a ~57M-parameter int4 model's ~460 MB), then keep the heap for what inference
    allocates and frees at every step: blocks up to 32 MiB from the heap (glibc's default sends those past 128
    KiB, until its threshold adapts, to fresh mappings zero-filled page by page at every prefill: ~10% of a
    ~300M fp32 model's prefill here) and up to 512 MiB of free heap top kept, not handed back and faulted in again
    each step. (Process-wide settings; peak RSS is unchanged: a step's temporaries exist at its peak either way.)
    Nothing with another C library."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)
    except (OSError, AttributeError, TypeError):  # (TypeError: Windows, where CDLL(None) is not the C library)
        pass


def _stored_bytes(source, part) -> int:
    """Bytes `part` takes in the checkpoint (what the progress bar counts)."""
    return math.prod(part.shape) * getattr(source.dtype(part.name), "itemsize", 2)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t, without a mask of t's size (amax and amin propagate NaN)."""
    return t.numel() == 0 or bool(torch.isfinite(t.amax()) & torch.isfinite(t.amin()))


def _read_dense(source, parts: list, dest: torch.Tensor, consumed: set, bar, shard=None) -> None:
    """Copy `parts` (each whole, or the rank's slice of it under `shard`) into `dest`, stacked along dim 0."""
    offset = 0
    for part in parts:
        if shard is None or part.tp_dim is None:
            rows = part.shape[0] if part.shape else 1
            target = dest[offset:offset + rows] if dest.dim() else dest
            if tuple(target.shape) != tuple(part.shape):
                raise CheckpointError(f"shape {list(part.shape)} does not fit the model's {list(dest.shape)} at "
                                      f"row {offset}", file=source.file_of(part.name), tensor=part.name)
            source.read_into(part, target)
        else:
            t = source.read_shard(part, *shard)
            rows = t.shape[0]
            dest[offset:offset + rows].copy_(t)
        offset += rows
        consumed.add(part.name)
        bar.update(_stored_bytes(source, part))


def _read_quantized(model, module: str, source, parts: list, shape: tuple, method: str, group_size: int,
                    consumed: set, bar) -> None:
    """Projection `module` quantized at load straight from the checkpoint: its rows (`parts` stacked) read and
    converted to the model dtype a chunk at a time as `quantize_rows` asks, so its dense weight never exists
    whole (a 7B lm_head in fp32: 525 MB)."""
    starts = [sum(p.shape[0] for p in parts[:i]) for i in range(len(parts))]

    def rows(a: int, b: int) -> torch.Tensor:
        out = torch.empty(b - a, shape[1], dtype=model.dtype, device=model.device)
        for part, p0 in zip(parts, starts):
            lo, hi = max(a, p0), min(b, p0 + part.shape[0])
            if lo < hi:
                out[lo - a:hi - a].copy_(source.read_rows(part, lo - p0, hi - lo))
        return out

    try:
        q = quantize_rows(rows, shape, method, group_size=group_size)
    except ValueError as e:
        raise CheckpointError(f"cannot quantize to {method}: {module} {list(shape)}: {e}",
                              file=source.file_of(parts[0].name), tensor=parts[0].name) from None
    set_module(model, module, QuantLinear([q]))
    for part in parts:
        consumed.add(part.name)
        bar.update(_stored_bytes(source, part))


def _quantize(model, method, group_size, quantize_head, only, source, parts) -> None:
    try:
        quantize_model(model, method, group_size=group_size, quantize_head=quantize_head, only=only)
    except ValueError as e:
        name = parts[0].name if parts else None
        raise CheckpointError(f"cannot quantize to {method}: {e}",
                              file=source.file_of(name) if name else source.directory, tensor=name) from None
