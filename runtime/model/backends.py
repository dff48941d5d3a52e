"""The backend table: every op the module graph uses, by backend name.

The graph calls `ops.rms_norm`, `ops.rotary`, ... on the Backend it was given and never
branches on the backend itself, so new kernels plug in by adding a row here. A backend's kernel
options (`KernelOptions`: experiments, PDL) are bound into its ops by `resolve_backend`, so one
model carries one set of them and the graph never passes them.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels import ops as triton_ops
from ..kernels.attention_decode import rotary_attention_decode_ref
from ..kernels.attention_prefill import (attention_prefill_ref, attention_prefill_sdpa, attention_verify_ref,
                                         attention_verify_sdpa)
from ..kernels.gemv import linear_swiglu_ref, norm_linear_ref
from ..kernels.int4 import int4_linear_ref
from ..kernels.cpu_gemm import gemm, linear_swiglu_cpu, norm_linear_cpu
from ..kernels.cpu_native import cpu_layout, int4_cpu_linear_cpu, int8_linear_cpu, nf4_cpu_linear_cpu, nf4_linear_cpu
from ..kernels.int4_cpu_format import int4_cpu_linear_ref, nf4_cpu_linear_ref
from ..kernels.int4_cpu import int4_linear_cpu
from ..kernels.int8_format import int8_linear_ref
from ..kernels.nf4 import nf4_linear_ref
from ..kernels.options import DEFAULT_OPTIONS, KernelOptions
from ..kernels.rms_norm import rms_norm_ref
from ..kernels.rotary import rotary_ref
from ..kernels.swiglu import swiglu_ref
from .native_decoder import native_decoder, no_decoder


def same_part(part):
    """The `held_part` of backends whose kernels take quantized parts as loaded."""
    return part


@dataclass(frozen=True)
class Backend:
    """Signatures are those of the `*_ref` functions in `codellama_rt.kernels`."""

    name: str
    rms_norm: Callable    # (x, weight, eps, residual=None) -> (y, new_residual)
    rotary: Callable      # (q [B,H,T,D], k [B,Hkv,T,D], cos, sin, positions [B,T]) -> (q, k)
    attention_prefill: Callable  # (q [B,H,T,D], k, v [B,Hkv,S,D], start: int) -> [B,H,T,D]
    # speculative decoding's verify step: row b's T queries at positions starts[b] .. (read on the device)
    attention_verify: Callable  # (q [B,H,T,D], k_cache, v_cache [B,Hkv,S,D], starts int64 [B]) -> [B,H,T,D]
    # decode: rotate q and k, write k and v into the caches [B,Hkv,S,D] at slots [B] (= lengths - 1), attend
    rotary_attention_decode: Callable  # (q, k, v [B,*,1,D], cos, sin, positions [B,1], k_cache, v_cache,
    #                                      slots, lengths) -> [B,H,D]
    swiglu: Callable      # (gate, up) -> silu(gate) * up
    linear: Callable      # (x [..., in], weight [out, in]) -> [..., out]
    linear_swiglu: Callable  # (x [..., in], w13 [2F, in] = [gate; up]) -> silu(gate) * up [..., F]
    # a dense projection (swiglu: linear_swiglu) of rms_norm(x + residual) * norm_weight -> (y, new residual)
    norm_linear: Callable  # (x, residual | None, norm_weight [in], eps, weight, swiglu=False)
    linear_nf4: Callable  # (x [..., in], NF4Weight [out, in]) -> [..., out] in x.dtype
    linear_int4: Callable  # (x [..., in], Int4Weight [out, in]) -> [..., out] in x.dtype
    linear_int8: Callable  # (x [..., in], Int8Weight [out, in]) -> [..., out] in x.dtype
    # weights in the native CPU layout (only the cpu backend's `held_part` makes them; elsewhere: the references)
    linear_int4_cpu: Callable = int4_cpu_linear_ref  # (x [..., in], Int4CpuWeight [out, in]) -> [..., out]
    linear_nf4_cpu: Callable = nf4_cpu_linear_ref    # (x [..., in], Nf4CpuWeight [out, in]) -> [..., out]
    # (model) -> a whole decode step (tokens [B], positions [B], cache data) -> logits [B, V], or None: the graph
    decoder: Callable = no_decoder
    # (quantized part) -> the part as this backend's kernels take it, held in its place once weights are loaded
    held_part: Callable = same_part
    options: KernelOptions = DEFAULT_OPTIONS  # the kernel options bound into the ops above


_REFERENCE = Backend(
    name="reference",
    rms_norm=rms_norm_ref,
    rotary=rotary_ref,
    attention_prefill=attention_prefill_ref,
    attention_verify=attention_verify_ref,
    rotary_attention_decode=rotary_attention_decode_ref,
    swiglu=swiglu_ref,
    linear=F.linear,
    linear_swiglu=linear_swiglu_ref,
    norm_linear=norm_linear_ref,
    linear_nf4=nf4_linear_ref,
    linear_int4=int4_linear_ref,
    linear_int8=int8_linear_ref,
)

BACKENDS: dict[str, Backend] = {
    "reference": _REFERENCE,
    # The CPU default: the reference ops, with the native kernels of csrc/ (kernels/cpu_native.py) for int8, int4
    # and NF4 weights (int4 falls back to torch's packed kernel, kernels/int4_cpu.py) and the whole decode step in
    # C++ where the model allows (runtime/model/native_decoder.py); without the extension, the PyTorch path.
    # Prefill and verify attention through torch's fused SDPA. int4 and NF4 weights are held in the native kernels'
    # layout once loaded (`held_part`: kernels/int4_cpu_format.py), not the checkpoint's plus a repack.
    # Dense prefill projections through oneDNN (kernels/cpu_gemm.py); decode-sized ones stay F.linear.
    "cpu": dataclasses.replace(_REFERENCE, name="cpu", attention_prefill=attention_prefill_sdpa,
                               attention_verify=attention_verify_sdpa, linear=gemm, linear_swiglu=linear_swiglu_cpu,
                               norm_linear=norm_linear_cpu, linear_int4=int4_linear_cpu, linear_int8=int8_linear_cpu,
                               linear_nf4=nf4_linear_cpu, linear_int4_cpu=int4_cpu_linear_cpu,
                               linear_nf4_cpu=nf4_cpu_linear_cpu, decoder=native_decoder, held_part=cpu_layout),
    # Triton kernels; on CPU tensors they run in Triton's interpreter (how the tests check them).
    # Dense projections: the GEMV kernel for one row on CUDA (batch-1 decode; w13's with the SwiGLU fused
    # in, and with the experiment "norm_gemv" the pre-norm ones with the RMSNorm fused in), torch (cuBLAS)
    # otherwise; 4-bit weights use the fused dequant-matmul kernels. Each op goes through its
    # `torch.library` custom op (`codellama_rt::<op>`, kernels/ops.py): torch.compile sees one op each.
    "triton": Backend(
        name="triton",
        rms_norm=triton_ops.rms_norm,
        rotary=triton_ops.rotary,
        attention_prefill=triton_ops.attention_prefill,
        attention_verify=triton_ops.attention_verify,
        rotary_attention_decode=triton_ops.rotary_attention_decode,
        swiglu=triton_ops.swiglu,
        linear=triton_ops.linear,
        linear_swiglu=triton_ops.linear_swiglu,
        norm_linear=triton_ops.norm_linear,
        linear_nf4=triton_ops.linear_nf4,
        linear_int4=triton_ops.linear_int4,
        linear_int8=triton_ops.linear_int8,  # dequantize, then cuBLAS
    ),
}


def resolve_backend(name: str, device: torch.device, options: KernelOptions = DEFAULT_OPTIONS) -> Backend:
    """Pick the Backend for `name` ("auto", "reference", "cpu", "triton") on `device`, its ops bound to `options`
    (the reference ops take none: that backend is returned as it is)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend={name!r}; expected one of: {', '.join(['auto', *BACKENDS])}")
    if not isinstance(options, KernelOptions):
        raise ValueError(f"options must be a KernelOptions, got {type(options).__name__}")
    return _bound(BACKENDS[name], options)


_OPS = tuple(f.name for f in dataclasses.fields(Backend) if f.name not in ("name", "options", "decoder",
                                                                          "held_part"))


@functools.lru_cache(maxsize=None)  # one Backend per (table row, options): models with equal options share it
def _bound(backend: Backend, options: KernelOptions) -> Backend:
    """`backend` with every op that takes an `options` keyword bound to `options` (unchanged without any)."""
    ops = {op: getattr(backend, op) for op in _OPS}
    bound = {op: functools.partial(fn, options=options) for op, fn in ops.items() if _takes_options(fn)}
    return dataclasses.replace(backend, options=options, **bound) if bound else backend


def _takes_options(fn: Callable) -> bool:
    try:
        return "options" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature (F.linear)
        return False
