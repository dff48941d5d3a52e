"""The Triton backend's ops as `torch.library` custom ops (namespace `codellama_rt`), so torch.compile and
torch.export see each backend op as one opaque op with a fake (meta) implementation, not the launcher's
Python. One custom op per backend entry point; together they launch every Triton kernel:

    rms_norm(x, weight, eps, residual?, experiments, pdl) -> (y, h)          kernels/rms_norm.py
    rotary(q!, k!, cos, sin, positions, experiments, pdl) -> ()               kernels/rotary.py
    attention_prefill(q, k, v, start) -> out                                  kernels/attention_prefill.py
    attention_verify(q, k_cache, v_cache, starts) -> out                      kernels/attention_prefill.py
    rotary_attention_decode(q!, k, v, cos, sin, positions, k_cache!, v_cache!, slots, lengths,
                            experiments, pdl) -> out                          kernels/attention_decode.py
    swiglu(gate, up, experiments, pdl) -> out                                 kernels/swiglu.py
    linear(x, w, experiments, pdl) -> out                                     kernels/gemv.py (or F.linear)
    linear_swiglu(x, w13, experiments, pdl) -> out                            kernels/gemv.py + swiglu.py
    norm_linear(x, residual?, norm_weight, eps, w, swiglu, experiments, pdl) -> (y, h)
    nf4_linear(x, codes, absmax, code, nested_absmax?, nested_code?, out_features, in_features, dtype,
               blocksize, nested_blocksize, nested_offset) -> out             kernels/nf4.py
    nf4_dequant_linear(<nf4_linear's arguments>) -> out                       kernels/nf4_dequant.py
    nf4_frag_linear(x, codes, scales, code, values, pairs, out_features, in_features, pdl) -> out
                                                                              kernels/nf4_frag.py
    int4_linear(x, qweight, qzeros, scales, out_features, in_features, group_size, experiments,
                pdl) -> out                                                   kernels/int4.py
    int4_frag_linear(x, codes, scales, out_features, in_features, group_size, pdl) -> out
                                                                              kernels/int4_frag.py
    int8_linear(x, qweight, scales) -> out                                    kernels/int8_format.py (torch)

(`!`: mutated in place, declared in `mutates_args`; `?`: optional tensor.) The functions below the ops
(`rms_norm`, `rotary`, ...) are what `codellama_rt.model.backends` puts in the triton row: they keep the
launchers' contracts (signatures of the `*_ref` functions plus `options=`) and call the ops while
torch.compile or torch.export traces, the launchers directly otherwise (`_eager`: no dispatch cost).

Kernel options: a custom op's schema takes no KernelOptions, so the ops whose kernels use them take the
options as two schema values, `experiments` (the experiment names, sorted and comma-joined: "" for none)
and `pdl` (bool), and rebuild the KernelOptions inside (`_options`, cached). The backend binds `options=`
into the functions below (`resolve_backend`), so a model's options are constants of every call: a
compiled graph bakes them in and a captured CUDA graph replays the kernels they chose.

Aliasing: a custom op may not return its inputs. Where the launchers do (rms_norm / norm_linear without a
residual return x itself as h; rotary returns its rotated q and k; rotary_to_cache its q), the op returns
a 0-element tensor instead of h, or nothing, and the function below returns the input, as the launcher
did. The kernels launched and their arguments are the launchers' own, unchanged.

Hidden state: the split-K ticket counters (`_triton.tickets`) are a process-wide buffer, not an op
argument; every launch leaves them zero, so they carry nothing from one op call to the next.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import attention_decode as _attention_decode
from . import attention_prefill as _attention_prefill
from . import gemv as _gemv
from . import int4 as _int4
from . import int4_frag as _int4_frag
from . import nf4 as _nf4
from . import nf4_dequant as _nf4_dequant
from . import nf4_frag as _nf4_frag
from . import rms_norm as _rms_norm
from . import rotary as _rotary
from . import swiglu as _swiglu
from .int4_format import Int4Weight
from .int4_frag_format import Int4FragWeight
from .int8_format import Int8Weight, int8_linear_ref
from .nf4_format import NF4Weight
from .nf4_frag_format import Nf4FragWeight
from .options import DEFAULT_OPTIONS, KernelOptions, parse_experiments

NAMESPACE = "codellama_rt"


def encode_options(options: KernelOptions) -> tuple[str, bool]:
    """KernelOptions -> the ops' (experiments, pdl) arguments: sorted names comma-joined, the pdl flag
    (not cached: torch.compile traces it, and `lru_cache` wrappers make dynamo warn)."""
    return ",".join(sorted(options.experiments)), options.pdl


@functools.lru_cache(maxsize=None)
def _options(experiments: str, pdl: bool) -> KernelOptions:
    """The ops' (experiments, pdl) arguments -> KernelOptions (inverse of `encode_options`)."""
    return KernelOptions(experiments=parse_experiments(experiments), pdl=pdl)


def _eager() -> bool:
    """True outside torch.compile / torch.export tracing. The functions below then call the launcher directly,
    exactly as the backend did before the ops existed: a custom op's dispatch costs ~20 us of host time per
    call (~4 ms per eager decode step of a 32-layer model), while a traced graph and a captured CUDA graph pay
    nothing for it. Tracing goes through the op, so compiled and exported graphs hold it whole."""
    return not torch.compiler.is_compiling()


def _no_tensor(like: Tensor) -> Tensor:
    """The 0-element tensor an op returns where its launcher returned an input itself."""
    return like.new_empty(0)


def _rows_out(x: Tensor, n: int) -> Tensor:
    """A new contiguous [..., n] tensor of x's dtype and device (the linears' outputs)."""
    return x.new_empty(*x.shape[:-1], n)


# ---- rms_norm -------------------------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor], experiments: str,
                 pdl: bool) -> tuple[Tensor, Tensor]:
    y, h = _rms_norm.rms_norm(x, weight, eps, residual, options=_options(experiments, pdl))
    return y, (h if residual is not None else _no_tensor(x))


@_rms_norm_op.register_fake
def _(x, weight, eps, residual, experiments, pdl):
    y = x.new_empty(x.shape)
    return y, (torch.empty_like(y) if residual is not None else _no_tensor(x))


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor] = None, *,
             options: KernelOptions = DEFAULT_OPTIONS) -> tuple[Tensor, Tensor]:
    """`kernels.rms_norm.rms_norm` through the op: (y, h), h = x itself without a residual."""
    if _eager():
        return _rms_norm.rms_norm(x, weight, eps, residual, options=options)
    y, h = _rms_norm_op(x, weight, eps, residual, *encode_options(options))
    return y, (h if residual is not None else x)


# ---- rotary ---------------------------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::rotary", mutates_args=("q", "k"))
def _rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, experiments: str,
               pdl: bool) -> None:
    _rotary.rotary(q, k, cos, sin, positions, options=_options(experiments, pdl))


@_rotary_op.register_fake
def _(q, k, cos, sin, positions, experiments, pdl):
    return None


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, *,
           options: KernelOptions = DEFAULT_OPTIONS) -> tuple[Tensor, Tensor]:
    """`kernels.rotary.rotary` through the op: q and k rotated in place and returned."""
    if _eager():
        return _rotary.rotary(q, k, cos, sin, positions, options=options)
    _rotary_op(q, k, cos, sin, positions, *encode_options(options))
    return q, k


# ---- attention ------------------------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::attention_prefill", mutates_args=())
def _attention_prefill_op(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    return _attention_prefill.attention_prefill(q, k, v, start)


@_attention_prefill_op.register_fake
def _(q, k, v, start):
    return q.new_empty(q.shape)


def attention_prefill(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """`kernels.attention_prefill.attention_prefill` through the op (no kernel options)."""
    if _eager():
        return _attention_prefill.attention_prefill(q, k, v, start)
    return _attention_prefill_op(q, k, v, start)


@torch.library.custom_op(f"{NAMESPACE}::attention_verify", mutates_args=())
def _attention_verify_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, starts: Tensor) -> Tensor:
    return _attention_prefill.attention_verify(q, k_cache, v_cache, starts)


@_attention_verify_op.register_fake
def _(q, k_cache, v_cache, starts):
    return q.new_empty(q.shape)


def attention_verify(q: Tensor, k_cache: Tensor, v_cache: Tensor, starts: Tensor) -> Tensor:
    """`kernels.attention_prefill.attention_verify` through the op (no kernel options)."""
    if _eager():
        return _attention_prefill.attention_verify(q, k_cache, v_cache, starts)
    return _attention_verify_op(q, k_cache, v_cache, starts)


@torch.library.custom_op(f"{NAMESPACE}::rotary_attention_decode", mutates_args=("q", "k_cache", "v_cache"))
def _rotary_attention_decode_op(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                                k_cache: Tensor, v_cache: Tensor, slots: Tensor, lengths: Tensor, experiments: str,
                                pdl: bool) -> Tensor:
    out = _attention_decode.rotary_attention_decode(q, k, v, cos, sin, positions, k_cache, v_cache, slots, lengths,
                                                    options=_options(experiments, pdl))
    return out


@_rotary_attention_decode_op.register_fake
def _(q, k, v, cos, sin, positions, k_cache, v_cache, slots, lengths, experiments, pdl):
    B, H, _, D = q.shape
    return q.new_empty(B, H, D)


def rotary_attention_decode(q, k, v, cos, sin, positions, k_cache, v_cache, slots, lengths, *,
                            options: KernelOptions = DEFAULT_OPTIONS) -> Tensor:
    """`kernels.attention_decode.rotary_attention_decode` through the op: the KV caches written in place
    (q may be rotated in place), attention out [B, H, D] a new tensor."""
    if _eager():
        return _attention_decode.rotary_attention_decode(q, k, v, cos, sin, positions, k_cache, v_cache, slots,
                                                         lengths, options=options)
    return _rotary_attention_decode_op(q, k, v, cos, sin, positions, k_cache, v_cache, slots, lengths,
                                       *encode_options(options))


# ---- SwiGLU and the dense projections -------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor, experiments: str, pdl: bool) -> Tensor:
    return _swiglu.swiglu(gate, up, options=_options(experiments, pdl))


@_swiglu_op.register_fake
def _(gate, up, experiments, pdl):
    return gate.new_empty(gate.shape)


def swiglu(gate: Tensor, up: Tensor, *, options: KernelOptions = DEFAULT_OPTIONS) -> Tensor:
    """`kernels.swiglu.swiglu` through the op."""
    if _eager():
        return _swiglu.swiglu(gate, up, options=options)
    return _swiglu_op(gate, up, *encode_options(options))


@torch.library.custom_op(f"{NAMESPACE}::linear", mutates_args=())
def _linear_op(x: Tensor, w: Tensor, experiments: str, pdl: bool) -> Tensor:
    return _gemv.linear(x, w, options=_options(experiments, pdl))


@_linear_op.register_fake
def _(x, w, experiments, pdl):
    return _rows_out(x, w.shape[0])


def linear(x: Tensor, w: Tensor, *, options: KernelOptions = DEFAULT_OPTIONS) -> Tensor:
    """`kernels.gemv.linear` (the GEMV for one row on CUDA, else F.linear) through the op."""
    if _eager():
        return _gemv.linear(x, w, options=options)
    return _linear_op(x, w, *encode_options(options))


@torch.library.custom_op(f"{NAMESPACE}::linear_swiglu", mutates_args=())
def _linear_swiglu_op(x: Tensor, w13: Tensor, experiments: str, pdl: bool) -> Tensor:
    return _gemv.linear_swiglu(x, w13, options=_options(experiments, pdl))


@_linear_swiglu_op.register_fake
def _(x, w13, experiments, pdl):
    return _rows_out(x, w13.shape[0] // 2)


def linear_swiglu(x: Tensor, w13: Tensor, *, options: KernelOptions = DEFAULT_OPTIONS) -> Tensor:
    """`kernels.gemv.linear_swiglu` through the op."""
    if _eager():
        return _gemv.linear_swiglu(x, w13, options=options)
    return _linear_swiglu_op(x, w13, *encode_options(options))


@torch.library.custom_op(f"{NAMESPACE}::norm_linear", mutates_args=())
def _norm_linear_op(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, eps: float, w: Tensor, swiglu: bool,
                    experiments: str, pdl: bool) -> tuple[Tensor, Tensor]:
    y, h = _gemv.norm_linear(x, residual, norm_weight, eps, w, swiglu, options=_options(experiments, pdl))
    return y, (h if residual is not None else _no_tensor(x))


@_norm_linear_op.register_fake
def _(x, residual, norm_weight, eps, w, swiglu, experiments, pdl):
    y = _rows_out(x, w.shape[0] // 2 if swiglu else w.shape[0])
    return y, (x.new_empty(x.shape) if residual is not None else _no_tensor(x))


def norm_linear(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, eps: float, w: Tensor,
                swiglu: bool = False, *, options: KernelOptions = DEFAULT_OPTIONS) -> tuple[Tensor, Tensor]:
    """`kernels.gemv.norm_linear` through the op: (y, h), h = x itself without a residual."""
    if _eager():
        return _gemv.norm_linear(x, residual, norm_weight, eps, w, swiglu, options=options)
    y, h = _norm_linear_op(x, residual, norm_weight, eps, w, swiglu, *encode_options(options))
    return y, (h if residual is not None else x)


# ---- 4-bit projections: the weight dataclasses passed as their tensors and scalars ----------------

def _nf4_weight(codes, absmax, code, nested_absmax, nested_code, out_features, in_features, dtype, blocksize,
                nested_blocksize, nested_offset) -> NF4Weight:
    """The NF4Weight the NF4 ops' schema arguments spell out (`_nf4_fields` in order)."""
    return NF4Weight(codes=codes, absmax=absmax, code=code, shape=(out_features, in_features), dtype=dtype,
                     blocksize=blocksize, nested_absmax=nested_absmax, nested_code=nested_code,
                     nested_blocksize=nested_blocksize, nested_offset=nested_offset)


def _nf4_fields(w: NF4Weight) -> tuple:
    """An NF4Weight as the NF4 ops' schema arguments after x."""
    out_f, in_f = w.shape
    return (w.codes, w.absmax, w.code, w.nested_absmax, w.nested_code, out_f, in_f, w.dtype, w.blocksize,
            w.nested_blocksize, float(w.nested_offset))


@torch.library.custom_op(f"{NAMESPACE}::nf4_linear", mutates_args=())
def _nf4_linear_op(x: Tensor, codes: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                   nested_code: Optional[Tensor], out_features: int, in_features: int, dtype: torch.dtype,
                   blocksize: int, nested_blocksize: int, nested_offset: float) -> Tensor:
    return _nf4.nf4_linear(x, _nf4_weight(codes, absmax, code, nested_absmax, nested_code, out_features, in_features,
                                          dtype, blocksize, nested_blocksize, nested_offset))


@_nf4_linear_op.register_fake
def _(x, codes, absmax, code, nested_absmax, nested_code, out_features, in_features, dtype, blocksize,
      nested_blocksize, nested_offset):
    return _rows_out(x, out_features)


@torch.library.custom_op(f"{NAMESPACE}::nf4_dequant_linear", mutates_args=())
def _nf4_dequant_linear_op(x: Tensor, codes: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                           nested_code: Optional[Tensor], out_features: int, in_features: int, dtype: torch.dtype,
                           blocksize: int, nested_blocksize: int, nested_offset: float) -> Tensor:
    return _nf4_dequant.nf4_dequant_linear(x, _nf4_weight(codes, absmax, code, nested_absmax, nested_code,
                                                          out_features, in_features, dtype, blocksize,
                                                          nested_blocksize, nested_offset))


@_nf4_dequant_linear_op.register_fake
def _(x, codes, absmax, code, nested_absmax, nested_code, out_features, in_features, dtype, blocksize,
      nested_blocksize, nested_offset):
    return _rows_out(x, out_features)


@torch.library.custom_op(f"{NAMESPACE}::nf4_frag_linear", mutates_args=())
def _nf4_frag_linear_op(x: Tensor, codes: Tensor, scales: Tensor, code: Tensor, values: Tensor, pairs: Tensor,
                        out_features: int, in_features: int, pdl: bool) -> Tensor:
    fw = Nf4FragWeight(codes=codes, scales=scales, code=code, values=values, pairs=pairs,
                       shape=(out_features, in_features), dtype=x.dtype)
    return _nf4_frag.nf4_frag_linear(x, fw, options=_options("", pdl))


@_nf4_frag_linear_op.register_fake
def _(x, codes, scales, code, values, pairs, out_features, in_features, pdl):
    return _rows_out(x, out_features)


def linear_nf4(x: Tensor, w: NF4Weight, *, options: KernelOptions = DEFAULT_OPTIONS) -> Tensor:
    """`kernels.nf4.nf4_linear` through the op; w: an NF4Weight. With the experiment "nf4_frag", rows it serves
    (`nf4_frag.nf4_frag_eligible`) go to `nf4_frag.nf4_frag_linear` on the weight's fragment-order copy
    (`nf4_frag_of`, made on the first such call); with "nf4_dequant_gemm", calls of more than
    `nf4_dequant.NF4_DEQUANT_MIN_M` rows (prefill) to `nf4_dequant.nf4_dequant_linear`."""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"nf4_linear: w must be an NF4Weight, got {type(w).__name__}")
    if options.has("nf4_frag") and _nf4_frag.nf4_frag_eligible(x, w):
        fw = _nf4_frag.nf4_frag_of(w)
        if _eager():
            return _nf4_frag.nf4_frag_linear(x, fw, options=options)
        out_f, in_f = fw.shape
        return _nf4_frag_linear_op(x, fw.codes, fw.scales, fw.code, fw.values, fw.pairs, out_f, in_f, options.pdl)
    dequant = options.has("nf4_dequant_gemm") and x.numel() // max(x.shape[-1], 1) > _nf4_dequant.NF4_DEQUANT_MIN_M
    if _eager():
        return _nf4_dequant.nf4_dequant_linear(x, w) if dequant else _nf4.nf4_linear(x, w)
    return (_nf4_dequant_linear_op if dequant else _nf4_linear_op)(x, *_nf4_fields(w))


@torch.library.custom_op(f"{NAMESPACE}::int4_linear", mutates_args=())
def _int4_linear_op(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, out_features: int,
                    in_features: int, group_size: int, experiments: str, pdl: bool) -> Tensor:
    w = Int4Weight(qweight=qweight, qzeros=qzeros, scales=scales, shape=(out_features, in_features),
                   group_size=group_size)
    return _int4.int4_linear(x, w, options=_options(experiments, pdl))


@_int4_linear_op.register_fake
def _(x, qweight, qzeros, scales, out_features, in_features, group_size, experiments, pdl):
    return _rows_out(x, out_features)


@torch.library.custom_op(f"{NAMESPACE}::int4_frag_linear", mutates_args=())
def _int4_frag_linear_op(x: Tensor, codes: Tensor, scales: Tensor, out_features: int, in_features: int,
                         group_size: int, pdl: bool) -> Tensor:
    fw = Int4FragWeight(codes=codes, scales=scales, shape=(out_features, in_features), group_size=group_size)
    return _int4_frag.int4_frag_linear(x, fw, options=_options("", pdl))


@_int4_frag_linear_op.register_fake
def _(x, codes, scales, out_features, in_features, group_size, pdl):
    return _rows_out(x, out_features)


def linear_int4(x: Tensor, w: Int4Weight, *, options: KernelOptions = DEFAULT_OPTIONS) -> Tensor:
    """`kernels.int4.int4_linear` through the op; w: an Int4Weight. With the experiment "int4_frag", rows it
    serves (`int4_frag.frag_eligible`) go to `int4_frag.int4_frag_linear` on the weight's fragment-order copy
    (`frag_of`, made on the first such call)."""
    if not isinstance(w, Int4Weight):
        raise TypeError(f"int4_linear: w must be an Int4Weight, got {type(w).__name__}")
    if options.has("int4_frag") and _int4_frag.frag_eligible(x, w):
        fw = _int4_frag.frag_of(w)
        if _eager():
            return _int4_frag.int4_frag_linear(x, fw, options=options)
        out_f, in_f = fw.shape
        return _int4_frag_linear_op(x, fw.codes, fw.scales, out_f, in_f, fw.group_size, options.pdl)
    if _eager():
        return _int4.int4_linear(x, w, options=options)
    out_f, in_f = w.shape
    return _int4_linear_op(x, w.qweight, w.qzeros, w.scales, out_f, in_f, w.group_size, *encode_options(options))


@torch.library.custom_op(f"{NAMESPACE}::int8_linear", mutates_args=())
def _int8_linear_op(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    return int8_linear_ref(x, Int8Weight(qweight=qweight, scales=scales, shape=tuple(qweight.shape)))


@_int8_linear_op.register_fake
def _(x, qweight, scales):
    return _rows_out(x, qweight.shape[0])


def linear_int8(x: Tensor, w: Int8Weight) -> Tensor:
    """`kernels.int8_format.int8_linear_ref` (dequantize, then torch's matmul) through the op; w: an Int8Weight."""
    if not isinstance(w, Int8Weight):
        raise TypeError(f"int8_linear: w must be an Int8Weight, got {type(w).__name__}")
    if _eager():
        return int8_linear_ref(x, w)
    return _int8_linear_op(x, w.qweight, w.scales)
