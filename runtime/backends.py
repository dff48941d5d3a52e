"""The backend table: every op the module graph uses, by backend name.

The graph calls `ops.rms_norm`, `ops.rotary`, ... on the Backend it was given and never
branches on the backend itself, so new kernels plug in by adding a row here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .kernels.attention_decode import rotary_attention_decode, rotary_attention_decode_ref
from .kernels.attention_prefill import attention_prefill, attention_prefill_ref
from .kernels.gemv import linear as gemv_or_matmul, linear_swiglu, linear_swiglu_ref, norm_linear, norm_linear_ref
from .kernels.int4 import int4_linear, int4_linear_ref
from .kernels.nf4 import nf4_linear, nf4_linear_ref
from .kernels.rms_norm import rms_norm, rms_norm_ref
from .kernels.rotary import rotary, rotary_ref
from .kernels.swiglu import swiglu, swiglu_ref


@dataclass(frozen=True)
class Backend:
    """Signatures are those of the `*_ref` functions in `codellama_rt.kernels`."""

    name: str
    rms_norm: Callable    # (x, weight, eps, residual=None) -> (y, new_residual)
    rotary: Callable      # (q [B,H,T,D], k [B,Hkv,T,D], cos, sin, positions [B,T]) -> (q, k)
    attention_prefill: Callable  # (q [B,H,T,D], k, v [B,Hkv,S,D], start: int) -> [B,H,T,D]
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


BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        name="reference",
        rms_norm=rms_norm_ref,
        rotary=rotary_ref,
        attention_prefill=attention_prefill_ref,
        rotary_attention_decode=rotary_attention_decode_ref,
        swiglu=swiglu_ref,
        linear=F.linear,
        linear_swiglu=linear_swiglu_ref,
        norm_linear=norm_linear_ref,
        linear_nf4=nf4_linear_ref,
        linear_int4=int4_linear_ref,
    ),
    # Triton kernels; on CPU tensors they run in Triton's interpreter (how the tests check them).
    # Dense projections: the GEMV kernel for one row on CUDA (batch-1 decode; w13's with the SwiGLU fused
    # in, and with the experiment "norm_gemv" the pre-norm ones with the RMSNorm fused in), torch (cuBLAS)
    # otherwise; 4-bit weights use the fused dequant-matmul kernels.
    "triton": Backend(
        name="triton",
        rms_norm=rms_norm,
        rotary=rotary,
        attention_prefill=attention_prefill,
        rotary_attention_decode=rotary_attention_decode,
        swiglu=swiglu,
        linear=gemv_or_matmul,
        linear_swiglu=linear_swiglu,
        norm_linear=norm_linear,
        linear_nf4=nf4_linear,
        linear_int4=int4_linear,
    ),
}


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Pick the Backend for `name` ("auto", "reference", "triton") on `device`."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "reference"
    if name in BACKENDS:
        return BACKENDS[name]
    raise ValueError(f"unknown backend={name!r}; expected one of: {', '.join(['auto', *BACKENDS])}")
