"""Quantized weights in the module graph: `QuantLinear` and `quantize_model`, the one place that swaps
a projection `Linear` for its quantized form, plus weight-memory accounting (measured and from shapes).

Formats (containers and kernels in `codellama_rt.kernels.nf4` / `.int4` / `.int8_format`):
- "nf4": bitsandbytes' NF4, blocks of 64 values, absmax double-quantized to 8 bits (blocks of 256);
- "int4": asymmetric 4-bit per group of `group_size` input columns, GPTQ's layout (desc_act=False);
- "int8": symmetric 8-bit, one scale per output row (`codellama_rt.kernels.int8_format`).
Embeddings, norms and (by default) the lm_head stay in the model dtype.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..kernels.int4_cpu_format import Int4CpuWeight, Nf4CpuWeight
from ..kernels.int4_format import Int4Weight, quantize_int4
from ..kernels.int8_format import Int8Weight, quantize_int8
from ..kernels.nf4_format import NF4Weight, quantize_nf4, quantize_nf4_rows
from ..model.backends import Backend
from ..model.config import ModelArgs
from ..model.transformer import Linear, Transformer

METHODS = ("nf4", "int4", "int8")
# what QuantLinear holds: a method's parts, or 4-bit in the native CPU layout (a cpu-backend model's, `hold_parts`)
PART_FORMATS = METHODS + ("int4_cpu", "nf4_cpu")
QuantPart = Union[NF4Weight, Int4Weight, Int8Weight, Int4CpuWeight, Nf4CpuWeight]

NF4_BLOCKSIZE = 64         # bitsandbytes' default for 4-bit weights
NF4_NESTED_BLOCKSIZE = 256  # double quant: absmax quantized to 8 bits in blocks of 256
QUANTIZE_CHUNK = 1 << 20   # weights quantized at a time (int4, int8): 4 MiB of each fp32 temporary


class QuantLinear(nn.Module):
    """y = x @ W^T with W [out, in] held as quantized parts stacked along the output dim.

    One part when our quantizer made it (the fused wqkv / w13 quantized as one weight); several when
    the checkpoint quantized q, k, v (or gate, up) separately, each with its own quant state
    (bitsandbytes). Each part's tensors are buffers `p{i}_{field}`, so they move with the model.
    """

    def __init__(self, parts: list):
        super().__init__()
        if not parts:
            raise ValueError("QuantLinear needs at least one part")
        self.in_features = parts[0].shape[1]
        for p in parts:
            if p.format not in PART_FORMATS:
                raise ValueError(f"unknown quantized part format {p.format!r}")
            if p.shape[1] != self.in_features:
                raise ValueError(f"parts disagree on in_features: {[q.shape for q in parts]}")
        self.out_features = sum(p.shape[0] for p in parts)
        self._fields = []  # per part: names of its tensor fields
        for i, p in enumerate(parts):
            names = [f.name for f in dataclasses.fields(p) if isinstance(getattr(p, f.name), torch.Tensor)]
            for name in names:
                self.register_buffer(f"p{i}_{name}", getattr(p, name))
            self._fields.append(names)
        self.parts = list(parts)
        self._ops = ["linear_" + p.format for p in parts]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # moves / converts the buffers; rebuild the part views on them
        self.parts = [dataclasses.replace(p, **{n: getattr(self, f"p{i}_{n}") for n in self._fields[i]})
                      for i, p in enumerate(self.parts)]
        return self

    @property
    def format(self) -> str:
        return self.parts[0].format if len({p.format for p in self.parts}) == 1 else "mixed"

    def forward(self, ops: Backend, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return getattr(ops, self._ops[0])(x, self.parts[0])
        return torch.cat([getattr(ops, op)(x, p) for op, p in zip(self._ops, self.parts)], dim=-1)

    def swiglu(self, ops: Backend, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the output (rows [gate; up], as `Linear.swiglu`); not fused for quantized weights."""
        gate, up = self(ops, x).chunk(2, dim=-1)
        return ops.swiglu(gate, up)

    def normed(self, ops: Backend, x, residual, norm_weight, eps: float, swiglu: bool = False):
        """`Linear.normed`: the `rms_norm` op, then this projection (quantized weights have no fused prologue)."""
        h, residual = ops.rms_norm(x, norm_weight, eps, residual)
        return (self.swiglu(ops, h) if swiglu else self(ops, h)), residual

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, parts={[(p.format, p.shape) for p in self.parts]}"


# ---- the module swap -----------------------------------------------------------------------

def projection_names(transformer: Transformer, *, head: bool) -> list[str]:
    """Module names of the blocks' projections (and `output` when `head`), in graph order."""
    names = [f"layers.{i}.{p}" for i in range(len(transformer.layers))
             for p in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2")]
    return names + (["output"] if head else [])


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_weight(w: torch.Tensor, method: str, *, group_size: int = 128) -> QuantPart:
    """A dense [out, in] weight -> one quantized part (dequantizing to w.dtype), QUANTIZE_CHUNK elements' worth
    of rows at a time (`quantize_rows`; the same part as at once), so the quantizers' fp32 temporaries stay
    bounded however large the weight (an lm_head, a 70B w13)."""
    if w.dim() != 2 or method == "nf4":
        return _quantizer(method, group_size)[0](w)  # (the quantizer names what is wrong; NF4's streams itself)
    return quantize_rows(lambda a, b: w[a:b], tuple(w.shape), method, group_size=group_size)


def quantize_rows(rows: Callable[[int, int], torch.Tensor], shape: tuple, method: str, *,
                  group_size: int = 128) -> QuantPart:
    """`quantize_weight` of the [out, in] weight whose rows a .. b - 1 `rows(a, b)` gives (dense, its dtype),
    asked for about QUANTIZE_CHUNK elements' worth of rows at a time (NF4: whole blocks,
    `nf4_format.quantize_nf4_rows`), so the dense weight need never exist whole (the loader reads each chunk
    from the checkpoint)."""
    if method == "nf4":
        return quantize_nf4_rows(rows, shape, blocksize=NF4_BLOCKSIZE, double_quant=True)
    quantize, merge, multiple = _quantizer(method, group_size)
    out_f, in_f = shape
    step = max(multiple, QUANTIZE_CHUNK // max(in_f, 1) // multiple * multiple)
    if out_f <= step or out_f % multiple:
        return quantize(rows(0, out_f))
    return merge([quantize(rows(r, min(r + step, out_f))) for r in range(0, out_f, step)])[0]


def _quantizer(method: str, group_size: int) -> tuple:
    """(quantize: dense [out, in] -> part, merge of row chunks' parts, row multiple of a chunk)."""
    if method == "nf4":
        return (lambda t: quantize_nf4(t, blocksize=NF4_BLOCKSIZE, double_quant=True)), None, 1
    if method == "int4":
        return (lambda t: quantize_int4(t, group_size=group_size)), merge_int4, 8
    if method == "int8":
        return quantize_int8, merge_int8, 1
    raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")


def quantize_model(transformer: Transformer, method: str, *, group_size: int = 128, quantize_head: bool = False,
                   only: Optional[Iterable[str]] = None) -> Transformer:
    """Swap every dense `Linear` of the blocks (and `output` only with `quantize_head`) for a QuantLinear
    quantized with `method` ("nf4" | "int4" | "int8"); projections already quantized are left as they are.

    Embeddings and norms stay in the model dtype; a tied lm_head gets its own quantized copy while the
    embedding stays dense. `only`: restrict to these module names (the loader quantizes each projection
    right after reading it, so a dense copy of the whole model never exists).
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    wanted = None if only is None else set(only)
    for name in projection_names(transformer, head=quantize_head):
        if wanted is not None and name not in wanted:
            continue
        module = transformer.get_submodule(name)
        if not isinstance(module, Linear):
            continue
        try:
            part = quantize_weight(module.weight.detach(), method, group_size=group_size)
        except ValueError as e:
            raise ValueError(f"{name} {list(module.weight.shape)}: {e}") from None
        set_module(transformer, name, QuantLinear([part]))
    return transformer


def merge_int4(parts: list) -> list:
    """Int4 parts with one group size, each with out % 8 == 0, concatenated into one (exact: GPTQ's
    layout keeps output columns independent). Anything else is returned as it is."""
    if len(parts) < 2 or any(p.format != "int4" for p in parts) or len({p.group_size for p in parts}) != 1 \
            or any(p.shape[0] % 8 for p in parts) or len({p.scales.dtype for p in parts}) != 1:
        return parts
    return [Int4Weight(qweight=torch.cat([p.qweight for p in parts], 1), qzeros=torch.cat([p.qzeros for p in parts], 1),
                       scales=torch.cat([p.scales for p in parts], 1),
                       shape=(sum(p.shape[0] for p in parts), parts[0].shape[1]), group_size=parts[0].group_size)]


def merge_int8(parts: list) -> list:
    """Int8 parts with one scales dtype concatenated into one (rows are independent)."""
    if len(parts) < 2 or any(p.format != "int8" for p in parts) or len({p.scales.dtype for p in parts}) != 1:
        return parts
    return [Int8Weight(qweight=torch.cat([p.qweight for p in parts]), scales=torch.cat([p.scales for p in parts]),
                       shape=(sum(p.shape[0] for p in parts), parts[0].shape[1]))]


def hold_parts(transformer: Transformer, held_part: Callable) -> None:
    """Every QuantLinear's parts replaced by `held_part(part)` (a backend's: the layout its kernels take, e.g.
    the native CPU kernels', `cpu_native.cpu_layout`), once the weights are loaded."""
    for name in list(quantized_modules(transformer)):  # (names: the old modules go as each is replaced)
        old = transformer.get_submodule(name).parts
        parts = [held_part(p) for p in old]
        if any(new is not p for new, p in zip(parts, old)):
            set_module(transformer, name, QuantLinear(parts))
        del old, parts


def quantized_modules(transformer: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in transformer.named_modules() if isinstance(m, QuantLinear)}


# ---- memory accounting ---------------------------------------------------------------------

def weight_bytes(module: nn.Module) -> int:
    """Bytes the weights occupy: dense parameters (a tied embedding counted once) plus every
    QuantLinear's buffers (codes, scales, absmax, code books). RoPE tables are not weights."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for q in quantized_modules(module).values():
        total += sum(b.numel() * b.element_size() for b in q.buffers(recurse=False))
    return total


def nf4_bytes(out: int, inn: int, *, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True,
              nested_blocksize: int = NF4_NESTED_BLOCKSIZE) -> int:
    """One NF4 part: codes (2 per byte) + absmax (uint8 with double quant, else fp32) + code books."""
    n = out * inn
    blocks = math.ceil(n / blocksize)
    if not double_quant:
        return (n + 1) // 2 + 4 * blocks + 4 * 16
    return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / nested_blocksize) + 4 * 16 + 4 * 256


def int4_bytes(out: int, inn: int, *, group_size: int = 128, scale_bytes: int = 2) -> int:
    """One int4 part: qweight (2 per byte) + packed zeros + scales in the model dtype
    (group_size -1, as GPTQ configs say it: one group per row)."""
    groups = 1 if group_size == -1 else inn // group_size
    return out * inn // 2 + groups * (out // 8) * 4 + groups * out * scale_bytes


def int4_cpu_bytes(out: int, inn: int, *, group_size: int = 128) -> int:
    """One int4 part as a cpu-backend model holds it (`Int4CpuWeight`): codes (2 per byte) + fp32 scales and
    zero x scale per group."""
    return out * inn // 2 + 2 * 4 * (inn // group_size) * out


def int8_bytes(out: int, inn: int, *, scale_bytes: int = 2) -> int:
    """One int8 part: a byte per weight plus a scale per output row."""
    return out * inn + out * scale_bytes


def model_weight_bytes(args: ModelArgs, *, bytes_per_elem: int, method: Optional[str] = None,
                       group_size: int = 128, quantize_head: bool = False, cpu_layout: bool = False) -> int:
    """Weight bytes from shapes: dense (`method=None`) or quantized as `quantize_model` does it
    (one part per fused projection), dense tensors in the model dtype (`bytes_per_elem`); 4-bit in the
    checkpoint layouts, or with `cpu_layout` as a cpu-backend model holds it (`cpu_native.cpu_layout`)."""
    if method is None:
        return args.param_count() * bytes_per_elem

    def q(out, inn):
        if method == "nf4":  # (the native layout: the same codes and state, plus fp32 absmax per group)
            return nf4_bytes(out, inn) + (4 * out * inn // (NF4_BLOCKSIZE if inn % NF4_BLOCKSIZE == 0 else 32)
                                          if cpu_layout else 0)
        if method == "int4":
            if group_size != -1 and (group_size < 1 or inn % group_size):
                raise ValueError(f"group_size={group_size} does not divide in_features={inn}")
            if cpu_layout:
                return int4_cpu_bytes(out, inn, group_size=group_size)
            return int4_bytes(out, inn, group_size=group_size, scale_bytes=bytes_per_elem)
        if method == "int8":
            return int8_bytes(out, inn, scale_bytes=bytes_per_elem)
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")

    V, d = args.vocab_size, args.dim
    total = args.n_layers * (sum(q(o, i) for o, i in args.projection_shapes().values()) + 2 * d * bytes_per_elem)
    total += (V * d + d) * bytes_per_elem                       # embedding, final norm
    if quantize_head:
        total += q(V, d)
    elif not args.tie_word_embeddings:
        total += V * d * bytes_per_elem
    return total
