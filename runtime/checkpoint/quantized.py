"""Quantized checkpoints: reading bitsandbytes 4-bit (as transformers saves it), GPTQ, and this
project's own format (written by `writer`).

All three are Hugging Face layout with a `quantization_config` in config.json:
- bitsandbytes (`quant_method: "bitsandbytes"`, load_in_4bit, nf4): per projection `<name>.weight`
  (packed uint8), `.weight.absmax`, `.weight.quant_map`, with double quant `.weight.nested_absmax`,
  `.weight.nested_quant_map`, and `.weight.quant_state.bitsandbytes__nf4` (uint8 bytes of a JSON with
  quant_type, blocksize, shape, nested_blocksize, nested_offset). Read without bitsandbytes.
- GPTQ (`quant_method: "gptq"`, bits 4, desc_act false): `<prefix>.qweight`, `.qzeros`, `.scales`,
  `.g_idx`; `checkpoint_format` "gptq" (v1: stored zero = zero - 1) or "gptq_v2".
- codellama-rt (`quant_method: "codellama-rt"`, method nf4|int4|int8): dense tensors under their Hugging Face
  names; each quantized projection of the graph `M` (e.g. `layers.0.attn.wqkv`) as parts k = 0, 1, ...:
  nf4 stored exactly as bitsandbytes stores one weight, under the base name `M.k.weight`; int4 as
  GPTQ v2 (`M.k.qweight`, `M.k.qzeros` holding the zero point itself, `M.k.scales`); int8 as `M.k.qweight`
  (int8 [out, in]) and `M.k.scales` ([out], one per row).
Every failure is a CheckpointError naming the file and tensor.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError
from ..kernels.int4_format import Int4Weight, unpack_gptq
from ..kernels.int8_format import Int8Weight
from ..kernels.nf4_format import NF4Weight
from ..quant.linear import merge_int4

OWN_METHOD = "codellama-rt"
OWN_FORMAT_VERSION = 1
_BNB_STATE = ".quant_state.bitsandbytes__nf4"
CHECKPOINT_METHODS = ("nf4", "int4", "int8")  # the own format's methods
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Quantization:
    """What a checkpoint's `quantization_config` says."""

    kind: str                  # "bitsandbytes" | "gptq" | "codellama-rt"
    method: str                # "nf4" | "int4" | "int8"
    file: Path                 # the config.json it came from
    group_size: int = 128      # int4; -1 in GPTQ: one group over the whole input dim
    checkpoint_format: str = "gptq_v2"  # int4 zero convention: "gptq" (v1, zero - 1 stored) or "gptq_v2"
    quantize_head: bool = False  # codellama-rt: the lm_head is quantized too
    gptq: Optional[dict] = None  # codellama-rt: how GPTQ chose the codes (None: rounded to nearest)

    def describe(self) -> str:
        extra = f", group_size={self.group_size}" if self.method == "int4" else ""
        if self.gptq:
            g = self.gptq
            extra += (f", GPTQ on {g.get('rows', '?')} x {g.get('seq_len', '?')} tokens of "
                      f"{g.get('calibration', '?')}")
        return f"{self.method} ({self.kind}{extra})"


def read_quantization(config: dict, file) -> Optional[Quantization]:
    """The checkpoint's quantization from its config.json dict; None when it has none."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError("quantization_config must be a JSON object", file=file)
    method = qc.get("quant_method")

    def bad(msg):
        return CheckpointError(f"quantization_config (quant_method={method!r}): {msg}", file=file)

    if method == "bitsandbytes":
        if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
            raise bad("only 4-bit bitsandbytes checkpoints (load_in_4bit) are supported, not 8-bit")
        if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
            raise bad(f"bnb_4bit_quant_type={qc.get('bnb_4bit_quant_type', 'fp4')!r} is not supported (only 'nf4')")
        return Quantization("bitsandbytes", "nf4", Path(file))
    if method == "gptq":
        if qc.get("bits") != 4:
            raise bad(f"bits={qc.get('bits')!r} is not supported (only 4)")
        if qc.get("desc_act"):
            raise bad("desc_act=true (act-order) is not supported")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise bad(f"checkpoint_format={fmt!r} is not supported (expected 'gptq' or 'gptq_v2')")
        return Quantization("gptq", "int4", Path(file), group_size=_group_size(qc, bad), checkpoint_format=fmt)
    if method == OWN_METHOD:
        if qc.get("format_version") != OWN_FORMAT_VERSION:
            raise bad(f"format_version={qc.get('format_version')!r} is not supported "
                      f"(this build reads {OWN_FORMAT_VERSION})")
        if qc.get("method") not in CHECKPOINT_METHODS:
            raise bad(f"method={qc.get('method')!r} is not one of {list(CHECKPOINT_METHODS)}")
        return Quantization(OWN_METHOD, qc["method"], Path(file),
                            group_size=_group_size(qc, bad) if qc["method"] == "int4" else 0,
                            quantize_head=bool(qc.get("quantize_head", False)),
                            gptq=qc["gptq"] if isinstance(qc.get("gptq"), dict) else None)
    raise bad("unknown quantization method (supported: 'bitsandbytes' 4-bit nf4, 'gptq' 4-bit, "
              f"and this project's {OWN_METHOD!r})")


def _group_size(qc: dict, bad) -> int:
    g = qc.get("group_size")
    if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
        raise bad(f"group_size={g!r} is invalid: expected a positive integer or -1")
    return g


# ---- reading ---------------------------------------------------------------------------------

class Tensors:
    """The loader's view of a source for quantized tensors: raw reads (any dtype), each name
    recorded as consumed and counted on the progress bar."""

    def __init__(self, source, consumed: set, bar, device):
        self.source, self.consumed, self.bar, self.device = source, consumed, bar, device

    def has(self, name: str) -> bool:
        return self.source.has(name)

    def file_of(self, name: str):
        return self.source.file_of(name) if self.source.has(name) else self.source.weights_file

    def get(self, name: str, *, numel=None, shape=None, dtypes=None) -> torch.Tensor:
        """Read `name` after checking its dtype (one of `dtypes`) and shape or element count."""
        got_dtype, got_shape = self.source.dtype(name), tuple(self.source.shape(name))
        if dtypes is not None and got_dtype not in dtypes:
            raise CheckpointError(f"has dtype {got_dtype}, expected {' or '.join(map(str, dtypes))}",
                                  file=self.file_of(name), tensor=name)
        if shape is not None and got_shape != tuple(shape):
            raise CheckpointError(f"has shape {list(got_shape)}, expected {list(shape)} "
                                  "(config and weights disagree?)", file=self.file_of(name), tensor=name)
        if numel is not None and math.prod(got_shape) != numel:
            raise CheckpointError(f"has {math.prod(got_shape)} elements (shape {list(got_shape)}), expected {numel}",
                                  file=self.file_of(name), tensor=name)
        t = self.source.raw(name)
        self.consumed.add(name)
        self.bar.update(t.numel() * t.element_size())
        return t.to(self.device)

    def error(self, name: str, msg: str) -> CheckpointError:
        return CheckpointError(msg, file=self.file_of(name), tensor=name)


def read_nf4(ts: Tensors, base: str, shape: Optional[tuple], dtype: torch.dtype) -> NF4Weight:
    """One weight stored as bitsandbytes stores it under `base` (e.g. `...q_proj.weight`).
    shape: the [out, in] the model expects (None: take the quant state's)."""
    state_name = base + _BNB_STATE
    if not ts.has(state_name):
        fp4 = base + ".quant_state.bitsandbytes__fp4"
        if ts.has(fp4):
            raise ts.error(fp4, "bitsandbytes fp4 weights are not supported (only nf4)")
        raise ts.error(state_name, "missing tensor (the bitsandbytes quant state of a 4-bit weight)")
    raw = ts.get(state_name, dtypes=(torch.uint8,))
    try:
        state = json.loads(bytes(raw.cpu().reshape(-1).tolist()).decode("utf-8"))
        quant_type = state["quant_type"]
        blocksize = int(state["blocksize"])
        state_shape = tuple(int(d) for d in state["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise ts.error(state_name, f"cannot read the quant state JSON: {e}") from None
    if quant_type != "nf4":
        raise ts.error(state_name, f"quant_type={quant_type!r} is not supported (only 'nf4')")
    if shape is not None and state_shape != tuple(shape):
        raise ts.error(state_name, f"quant state says shape {list(state_shape)}, the model config implies "
                       f"{list(shape)} (config and weights disagree?)")
    if len(state_shape) != 2 or blocksize <= 0:
        raise ts.error(state_name, f"invalid quant state: shape {list(state_shape)}, blocksize {blocksize}")
    n = math.prod(state_shape)
    blocks = math.ceil(n / blocksize)
    codes = ts.get(base, numel=None)
    if codes.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: the same bytes
        codes = codes.contiguous().view(-1).view(torch.uint8)
    codes = codes.reshape(-1)
    if codes.numel() != (n + 1) // 2:
        raise ts.error(base, f"has {codes.numel()} bytes of 4-bit codes, "
                             f"shape {list(state_shape)} needs {(n + 1) // 2}")
    code = ts.get(base + ".quant_map", numel=16, dtypes=_FLOATS).float()
    nested = "nested_blocksize" in state or ts.has(base + ".nested_absmax")
    if nested:
        try:
            nested_blocksize, nested_offset = int(state["nested_blocksize"]), float(state["nested_offset"])
        except (KeyError, TypeError, ValueError) as e:
            raise ts.error(state_name, f"double-quantized weight without a valid nested state: {e}") from None
        absmax = ts.get(base + ".absmax", numel=blocks, dtypes=(torch.uint8,)).reshape(-1)
        nested_absmax = ts.get(base + ".nested_absmax", numel=math.ceil(blocks / nested_blocksize),
                               dtypes=_FLOATS).reshape(-1).float()
        nested_code = ts.get(base + ".nested_quant_map", numel=256, dtypes=_FLOATS).float()
        return NF4Weight(codes=codes, absmax=absmax, code=code, shape=state_shape, dtype=dtype, blocksize=blocksize,
                         nested_absmax=nested_absmax, nested_code=nested_code, nested_blocksize=nested_blocksize,
                         nested_offset=nested_offset)
    absmax = ts.get(base + ".absmax", numel=blocks, dtypes=_FLOATS).reshape(-1).float()
    return NF4Weight(codes=codes, absmax=absmax, code=code, shape=state_shape, dtype=dtype, blocksize=blocksize)


def read_int4(ts: Tensors, prefix: str, shape: tuple, q: Quantization, dtype: torch.dtype) -> Int4Weight:
    """One GPTQ-layout weight `prefix.qweight/.qzeros/.scales[/.g_idx]` of [out, in] = `shape`."""
    out, inn = shape
    qname = prefix + ".qweight"
    g = inn if q.group_size == -1 else q.group_size
    if inn % g:
        raise ts.error(qname, f"group_size={q.group_size} ({q.file.name}) does not divide in_features={inn}")
    if inn % 8 or out % 8:
        raise ts.error(qname, f"shape [{out}, {inn}]: int4 needs in and out features that are multiples of 8")
    qweight = ts.get(qname, shape=(inn // 8, out), dtypes=(torch.int32,))
    qzeros = ts.get(prefix + ".qzeros", shape=(inn // g, out // 8), dtypes=(torch.int32,))
    scales = ts.get(prefix + ".scales", shape=(inn // g, out), dtypes=_FLOATS).to(dtype)
    g_idx = ts.get(prefix + ".g_idx", shape=(inn,), dtypes=(torch.int32, torch.int64)) \
        if ts.has(prefix + ".g_idx") else None
    if ts.has(prefix + ".bias"):
        bias = ts.get(prefix + ".bias", shape=(out,), dtypes=_FLOATS)
        if bias.any():
            raise ts.error(prefix + ".bias", "a non-zero bias is not supported (Llama projections have none)")
    try:
        return unpack_gptq(qweight, qzeros, scales, g_idx, group_size=g, checkpoint_format=q.checkpoint_format)
    except (ValueError, AssertionError) as e:
        name = prefix + (".g_idx" if g_idx is not None else ".qzeros")
        raise ts.error(name, f"cannot use this GPTQ weight: {e}") from None


def read_projection(ts: Tensors, q: Quantization, module: str, parts: list, shape: tuple,
                    dtype: torch.dtype) -> Optional[list]:
    """The quantized parts of projection `module` ([out, in] = `shape`) whose dense source tensors
    would be `parts` (checkpoint Part objects); None when the checkpoint keeps it dense."""
    if q.kind == OWN_METHOD:
        if module == "output" and not q.quantize_head:
            return None
        return _read_own(ts, q, module, shape, dtype)
    if q.kind == "bitsandbytes":
        quantized = [p for p in parts if ts.has(p.name + _BNB_STATE)
                     or (ts.has(p.name) and ts.source.dtype(p.name) == torch.uint8)]
        if not quantized:
            return None
        _all_or_none(ts, parts, quantized)
        return [read_nf4(ts, p.name, p.shape, dtype) for p in parts]
    # gptq
    prefixes = [p.name[:-len(".weight")] for p in parts]
    quantized = [p for p, pre in zip(parts, prefixes) if ts.has(pre + ".qweight")]
    if not quantized:
        return None
    _all_or_none(ts, parts, quantized)
    return merge_int4([read_int4(ts, pre, p.shape, q, dtype) for p, pre in zip(parts, prefixes)])


def _all_or_none(ts: Tensors, parts: list, quantized: list) -> None:
    if len(quantized) != len(parts):
        dense = next(p for p in parts if p not in quantized)
        raise ts.error(dense.name, f"is dense while {quantized[0].name} is quantized: the parts of one fused "
                       "projection must be quantized alike")


def _read_own(ts: Tensors, q: Quantization, module: str, shape: tuple, dtype: torch.dtype) -> list:
    out, inn = shape
    parts, rows, k = [], 0, 0
    while True:
        probe = f"{module}.{k}.weight" if q.method == "nf4" else f"{module}.{k}.qweight"
        if not ts.has(probe):
            if k == 0:
                raise ts.error(probe, f"missing tensor (the {q.method} weight of projection {module})")
            break
        if q.method == "nf4":
            part = read_nf4(ts, probe, None, dtype)
        elif q.method == "int8":
            part = _read_own_int8(ts, f"{module}.{k}", dtype)
        else:
            qshape = ts.source.shape(probe)
            if len(qshape) != 2:
                raise ts.error(probe, f"has shape {list(qshape)}, expected [in // 8, out]")
            part = read_int4(ts, f"{module}.{k}", (qshape[1], qshape[0] * 8), q, dtype)
        if part.shape[1] != inn:
            raise ts.error(probe, f"has in_features {part.shape[1]}, the model config implies {inn}")
        parts.append(part)
        rows += part.shape[0]
        k += 1
    if rows != out:
        raise ts.error(f"{module}.0.{'weight' if q.method == 'nf4' else 'qweight'}",
                       f"the parts of projection {module} have {rows} output rows, the model config implies {out}")
    return parts


def _read_own_int8(ts: Tensors, prefix: str, dtype: torch.dtype) -> Int8Weight:
    qshape = ts.source.shape(prefix + ".qweight")
    if len(qshape) != 2:
        raise ts.error(prefix + ".qweight", f"has shape {list(qshape)}, expected [out, in]")
    qweight = ts.get(prefix + ".qweight", shape=tuple(qshape), dtypes=(torch.int8,))
    scales = ts.get(prefix + ".scales", shape=(qshape[0],), dtypes=_FLOATS)
    if not (torch.isfinite(scales).all() and (scales > 0).all()):
        raise ts.error(prefix + ".scales", "must be positive and finite")
    if (qweight == -128).any():
        raise ts.error(prefix + ".qweight", "holds -128 (int8 codes are -127..127)")
    return Int8Weight(qweight=qweight, scales=scales.to(dtype), shape=tuple(qshape))
