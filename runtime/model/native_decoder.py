"""The whole decode step in C++ on the CPU (`kernels.cpu_native.Decoder`): the "cpu" backend's `decoder`.

A batch decode step of the module graph costs hundreds of torch ops, each a Python call and a dispatch; on a
small model that overhead, not arithmetic, sets the pace. `native_decoder(model)` hands the model's weights
to one C++ object, once per model, and returns a function doing the step in one call:
(tokens int64 [B], positions int64 [B], cache data fp32 [layers, 2, max_batch, Hkv, S, D], slots int64 [B] or
None) -> fp32 logits [B, V], with the module graph's semantics (`Decode`: K/V written at the positions, each row
attending to 0 .. its position). Row b uses cache row slots[b] (None: row b); every row's K/V is written before
any row attends, so T rows of one slot at positions p .. p + T - 1 score a speculative block causally (`Verify`).
`out_rows`: logits of the last rows only (0: all); `prompt=True`: the rows are a prompt chunk's (the engine's
prefill), from 16 rows on their projections a packed GEMM (int8 / int4 / NF4 in bf16 with
`KernelOptions.cpu_bf16_prefill` on CPUs with AVX512-BF16) and their attention over transposed keys: logits within
fp32 (bf16) rounding of, not bitwise, decode steps', as the module graph's prefill is.
It returns None where the native step does not apply, and the graph runs: no extension built, not a CPU fp32
model, tensor parallelism, or a projection in another format than dense fp32, int8, int4 with groups of
multiples of 32 (in the native layout already, `Int4CpuWeight`, or GPTQ's, repacked), or NF4 (as table-lookup
int4: codes in chunk order, fp32 absmax per block, the codebook as the levels) with blocks that allow it. A
projection of several parts (a checkpoint's q, k, v) runs them side by side into one output, no stacked copy.
A decode row reads dense weights one row at a time (one sequential stream), int8 weights too where they outgrow
the last-level cache on AVX-512 builds (`int8_one_row`); the logits are the same bits either way.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ..kernels import cpu_native
from .cpu_cache import last_level_cache_bytes, one_row_int8  # noqa: F401 (last_level_cache_bytes: re-exported)

_ATTR = "_native_decoder"  # the model attribute holding its decoder (or False: not applicable)
_DENSE, _INT8, _INT4, _INT8_X16, _INT4_X8 = 0, 1, 2, 3, 4  # csrc's Kind
_EMPTY = torch.empty(0)
_NO_SLOTS = torch.empty(0, dtype=torch.long)  # row b of a step is cache row b


def native_decoder(model) -> Optional[Callable]:
    """The native decode step of `model` (a Transformer), built on first use and kept on it; None where it does
    not apply (see the module docstring)."""
    found = model.__dict__.get(_ATTR)
    if found is None:
        found = _build(model) or False
        model.__dict__[_ATTR] = found
        model.weights_in_use = model.weights_in_use or bool(found)  # (it holds pointers to the weights)
    return found or None


def _projection(module, integer: bool) -> Optional[list]:
    """add_linear's arguments for each weight of one projection module (a Linear, or a QuantLinear's parts:
    their outputs side by side), or None if one is unsupported."""
    parts = getattr(module, "parts", None)
    if parts is None:
        w = module.weight
        return [(_DENSE, w.detach().contiguous(), _EMPTY, _EMPTY, w.shape[0], w.shape[1], 0, _EMPTY)]
    args = [_part(p, integer) for p in parts]
    return None if any(a is None for a in args) else args


def _part(p, integer: bool) -> Optional[tuple]:
    # integer: decode rows rounded to int16 (int8 weights) / int8 (int4) blocks, `cpu_native.integer_activations`
    if p.format == "int8":
        return (_INT8_X16 if integer else _INT8, p.qweight, cpu_native.int8_scales_f32(p).contiguous(), _EMPTY,
                p.shape[0], p.shape[1], 0, _EMPTY)
    if (p.format == "int4" and cpu_native.int4_supported(p)) or (p.format == "nf4" and cpu_native.nf4_supported(p)):
        p = cpu_native.native_copy(p)  # (a weight held in its checkpoint layout: its repack, kept on it)
    if p.format == "int4_cpu":
        return (_INT4_X8 if integer else _INT4, p.codes, p.scales, p.zs, p.shape[0], p.shape[1], p.group_size, _EMPTY)
    if p.format == "nf4_cpu":  # the int4 kind with the codebook as its levels
        return (_INT4, p.codes, p.scales, _EMPTY, p.shape[0], p.shape[1], p.group_size, p.levels)
    return None


class DecoderParts(NamedTuple):
    """What a native decoder is made of (the Decoder constructor's and add_linear's arguments), fp32 CPU tensors:
    dims (dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size), eps, embedding [V, dim], norms [dim] each
    (per layer attention then MLP), final_norm [dim], rope_cos / rope_sin [positions, head_dim / 2], and per
    projection (per layer wqkv, wo, w13, w2, then the lm_head) its parts' add_linear arguments, less `continues`."""
    dims: tuple
    eps: float
    embedding: torch.Tensor
    norms: list
    final_norm: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    projections: list


def decoder_parts(model, integer: bool = False) -> Optional[DecoderParts]:
    """`model`'s DecoderParts, or None where the native step does not apply to it (the module docstring's list,
    less the extension's presence). integer: int8 / int4 weights multiply integer-rounded activations."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return None
    layers = list(model.layers)
    if any(layer.attn.reduce is not None or layer.mlp.reduce is not None for layer in layers):
        return None  # tensor parallelism: the ranks' partial sums are reduced by the graph
    modules = [m for layer in layers for m in (layer.attn.wqkv, layer.attn.wo, layer.mlp.w13, layer.mlp.w2)]
    projections = [_projection(m, integer) for m in modules + [model.output]]
    if any(p is None for p in projections):
        return None
    a = model.args
    return DecoderParts((a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.vocab_size), float(a.norm_eps),
                        model.tok_embeddings.detach().contiguous(),
                        [t.detach().contiguous() for layer in layers for t in (layer.attn_norm, layer.mlp_norm)],
                        model.norm.detach().contiguous(), model.rope_cos.contiguous(), model.rope_sin.contiguous(),
                        projections)


def _build(model) -> Optional[Callable]:
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return None
    if not cpu_native.available():
        cpu_native.notice()
        return None
    parts = decoder_parts(model, cpu_native.integer_activations(model.ops.options))
    if parts is None:
        return None
    decoder = cpu_native.extension().Decoder(*parts.dims, parts.eps, parts.embedding, parts.norms, parts.final_norm,
                                             parts.rope_cos, parts.rope_sin)
    for projection in parts.projections:
        for i, part in enumerate(projection):
            decoder.add_linear(*part, i > 0)  # (a later part continues the projection's output)
    every = [part for projection in parts.projections for part in projection]
    decoder.one_row_int8(int8_one_row(every, cpu_native.extension().isa()))
    decoder.bf16_prompt(model.ops.options.cpu_bf16_prefill)

    def step(tokens: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
             slots: Optional[torch.Tensor] = None, *, out_rows: int = 0, prompt: bool = False) -> torch.Tensor:
        return decoder.forward(tokens, positions, cache, _NO_SLOTS if slots is None else slots, out_rows, prompt)

    return step


def int8_one_row(parts: list, isa: str, cache_bytes: Optional[int] = None) -> bool:
    """Whether decode rows of int8 weights (fp32 products, add_linear's kind 1) should read one weight row at a
    time (`Decoder.one_row_int8`): `cpu_cache.one_row_int8` for `parts` (add_linear's arguments)."""
    weights = sum(t.numel() * t.element_size() for p in parts for t in (p[1], p[2], p[3]))
    return one_row_int8(isa, any(p[0] == _INT8 for p in parts), weights, cache_bytes)


def no_decoder(model) -> None:
    """The `decoder` of backends without a native step: the module graph always runs."""
    return None
