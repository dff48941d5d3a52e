"""int4 group-wise asymmetric weights in GPTQ's layout: the `Int4Weight` format, packing, round-to-nearest
quantization, dequantization and the reading of GPTQ checkpoints' tensors (no Triton: the loader and the
quantizer need none).

Conventions: a weight w [out, in] is cut along the input dim into groups of g consecutive columns; group
i // g of output o has a scale s and a zero point z in 0..15, and w[o, i] = (q[o, i] - z) * s with q in
0..15. Dequantization computes (q - z) * s in fp32 and rounds once to the target dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Int4Weight:
    """A weight [out, in] quantized per group of `group_size` consecutive input columns:
    w[o, i] = (q[o, i] - zero[i // g, o]) * scale[i // g, o], q and zero in 0..15.

    Stored in GPTQ's layout (desc_act=False), so GPTQ checkpoints load as they are:
    qweight: int32 [in // 8, out], eight 4-bit q along the input dim per int32 (lowest nibble first);
    qzeros: int32 [in // g, out // 8], eight 4-bit zeros along the output dim per int32 (lowest first),
        holding the zero point itself (GPTQ "v1" files store zero - 1; the loader converts);
    scales: [in // g, out] in the model dtype.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    shape: tuple
    group_size: int = 128

    format = "int4"

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Int4Weight":
        """A copy on `device` (default: where it is) with scales in `dtype` (default: as they are);
        the packed integers are moved, never changed."""
        return Int4Weight(qweight=self.qweight.to(device), qzeros=self.qzeros.to(device),
                          scales=self.scales.to(device=device, dtype=dtype or self.scales.dtype),
                          shape=tuple(self.shape), group_size=self.group_size)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q uint8 [out, in], zero uint8 [in // g, out]): the 4-bit values, unpacked."""
        q = _unpack_nibbles(self.qweight.t(), dim=1)  # [out, in] (unpacked along in: no transposed copy)
        z = _unpack_nibbles(self.qzeros, dim=1)       # [in // g, out]
        return q, z

    def check(self, who: str = "Int4Weight") -> None:
        """ValueError unless the fields are a consistent GPTQ-layout weight (dtypes, shapes, group size)."""
        _check_layout(self.qweight, self.qzeros, self.scales, tuple(self.shape), self.group_size, who)


# ---- packing ---------------------------------------------------------------------------------

_SHIFTS = tuple(4 * j for j in range(8))


def _pack_nibbles(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Integers 0..15, `dim` of length 8n -> int32 with that dim n: value 8r + j goes to bits 4j..4j+3
    of int32 r (lowest nibble first), as GPTQ packs (the top nibble may make the int32 negative)."""
    v = v.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=v.device)
    packed = (v << shifts).sum(-1)                        # 0 .. 2**32 - 1
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # as int32 bits
    return packed.to(torch.int32).movedim(-1, dim).contiguous()


def _unpack_nibbles(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `_pack_nibbles`: int32 -> uint8 0..15, `dim` eight times longer. One nibble plane at a
    time, so the temporaries are int32 planes the size of p (a byte a weight in all), not int64 per weight."""
    p = p.movedim(dim, -1)
    v = torch.empty(*p.shape, 8, dtype=torch.uint8, device=p.device)
    for j, shift in enumerate(_SHIFTS):
        v[..., j] = (p >> shift) & 0xF  # (an arithmetic shift: the mask keeps the nibble)
    return v.reshape(*p.shape[:-1], p.shape[-1] * 8).movedim(-1, dim).contiguous()


# ---- quantize / dequantize -------------------------------------------------------------------

GROUP_SIZES = (32, 64, 128)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _round_up_to(s64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive float64 values -> `dtype`, rounded up (never below s64), so 15 steps of the stored scale
    span the group's range exactly, not just up to a rounding."""
    s = s64.to(dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    up = (s.view(bits) + 1).view(dtype)  # the next representable value up (s is positive and finite)
    return torch.where(s.double() < s64, up, s)


def quantize_int4(w: torch.Tensor, *, group_size: int = 128, dtype: Optional[torch.dtype] = None) -> Int4Weight:
    """Round-to-nearest asymmetric int4 of w [out, in] per group of `group_size` input columns.

    group_size: 32, 64 or 128, dividing in; out a multiple of 8 (GPTQ packs zeros along out).
    Per group, in fp32: lo = min(w, 0), hi = max(w, 0) (the range includes 0, as GPTQ's quantizer
    does, so zero is exact and an all-positive group cannot overflow the 16 levels);
    scale = (hi - lo) / 15 (1 for an all-zero group), stored in `dtype` (default w.dtype) rounded up,
    so 15 stored steps span the range; zero = clamp(round(-lo / scale), 0, 15);
    q = clamp(round(w / scale) + zero, 0, 15), with the stored scale. round is half-to-even.
    Then |dequantize_int4(.) - w| <= scale / 2 per element (plus the rounding to w's dtype), and a
    weight already on such a grid (q spanning 0..15 in each group) comes back exactly.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_int4: w must be [out, in], got shape {tuple(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_int4: w dtype {w.dtype} is not supported; expected float32, float16 or bfloat16")
    out_f, in_f = w.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quantize_int4: group_size={group_size} is not supported; expected one of {GROUP_SIZES}")
    if in_f % group_size:
        raise ValueError(f"quantize_int4: group_size={group_size} does not divide in_features={in_f}")
    if out_f % 8 or out_f == 0:
        raise ValueError(f"quantize_int4: out_features={out_f} must be a positive multiple of 8 "
                         f"(GPTQ packs eight zero points per int32 along the output dim)")
    dtype = dtype or w.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_int4: scales dtype {dtype} is not supported")
    if not torch.isfinite(w).all():
        raise ValueError("quantize_int4: w has non-finite values")

    wg = w.detach().float().reshape(out_f, in_f // group_size, group_size)  # [out, groups, g]
    scales, zero = int4_group_params(wg, dtype)
    s = scales.float()
    q = (torch.round(wg / s[..., None]) + zero[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(out_f, in_f), zero, scales, group_size)


def int4_group_params(wg: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int4`'s grid of each group: wg fp32 [..., g] -> (scale [...] in `dtype`, rounded up; zero
    fp32 [...], an integer 0..15). ValueError if a scale overflows `dtype`."""
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    s64 = (hi.double() - lo.double()) / 15
    s64 = torch.where(s64 > 0, s64, torch.ones_like(s64))
    scales = _round_up_to(s64, dtype)
    if not torch.isfinite(scales).all():
        raise ValueError(f"quantize_int4: a scale overflows {dtype}")
    return scales, torch.round(-lo / scales.float()).clamp(0, 15)


def pack_int4(q: torch.Tensor, zero: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
    """An `Int4Weight` from q [out, in] and zero [out, in // g] (integers 0..15, any dtype) and scales
    [out, in // g] (its dtype is the weight's)."""
    out_f, in_f = q.shape
    return Int4Weight(qweight=_pack_nibbles(q.to(torch.uint8).t(), dim=0),
                      qzeros=_pack_nibbles(zero.to(torch.uint8).t(), dim=1),
                      scales=scales.t().contiguous(), shape=(out_f, in_f), group_size=group_size)


def dequantize_int4(w: Int4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[out, in] in `dtype` (default w.dtype): (q - zero) * scale in fp32, rounded once to dtype."""
    w.check("dequantize_int4")
    q, z = w.unpack()                                       # [out, in], [groups, out]
    g = w.group_size
    zf = z.t().float().repeat_interleave(g, dim=1)          # [out, in]
    sf = w.scales.t().float().repeat_interleave(g, dim=1)   # [out, in]
    return ((q.float() - zf) * sf).to(dtype or w.dtype)


# ---- GPTQ checkpoints ------------------------------------------------------------------------

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _check_layout(qweight, qzeros, scales, shape, group_size, who):
    """The shared shape/dtype checks of a GPTQ-layout weight; ValueError with the expected layout."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{who}: {name} must be a 2-d int32 tensor, got "
                             f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{who}: scales must be a 2-d float32/float16/bfloat16 tensor, got "
                         f"{(scales.dtype, tuple(scales.shape)) if isinstance(scales, torch.Tensor) else scales}")
    out_f, in_f = shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        raise ValueError(f"{who}: group_size={group_size} must be a positive multiple of 8")
    if in_f % group_size or out_f % 8 or out_f <= 0 or in_f <= 0:
        raise ValueError(f"{who}: shape {shape} needs in_features a multiple of group_size={group_size} and "
                         f"out_features a positive multiple of 8")
    groups = in_f // group_size
    want = {"qweight": (in_f // 8, out_f), "qzeros": (groups, out_f // 8), "scales": (groups, out_f)}
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{who}: {name} has shape {tuple(t.shape)}, expected {want[name]} for a "
                             f"[{out_f}, {in_f}] weight in groups of {group_size}")
    if len({qweight.device, qzeros.device, scales.device}) != 1:
        raise ValueError(f"{who}: qweight, qzeros and scales are on different devices")


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
                *, group_size: int, checkpoint_format: str) -> Int4Weight:
    """An Int4Weight from a GPTQ checkpoint's tensors of one linear layer (4 bits, desc_act=False).

    qweight int32 [in // 8, out]; qzeros int32 [in // g, out // 8]; scales [in // g, out] (kept in
    their dtype; `Int4Weight.to(dtype=...)` casts); g_idx int [in] or None (it must be i // g: an
    act-order permutation is refused). group_size: the config's; -1 (one group per row) means in.
    checkpoint_format: "gptq" (AutoGPTQ v1: qzeros hold zero - 1, dequant w = scale * (q - (nibble + 1)))
    or "gptq_v2" (qzeros hold the zero point itself). v1 nibbles are converted by +1; a v1 nibble 15
    (zero point 16, which 4 bits cannot hold; written by v1 packers for zero 0) raises ValueError.
    Shape errors raise ValueError naming the field (the caller adds the tensor's checkpoint name).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"unpack_gptq: checkpoint_format {checkpoint_format!r} is not supported; "
                         f"expected one of {CHECKPOINT_FORMATS}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise ValueError(f"unpack_gptq: qweight must be a 2-d int32 tensor [in // 8, out], got "
                         f"{tuple(qweight.shape) if isinstance(qweight, torch.Tensor) else type(qweight).__name__}")
    in_f, out_f = qweight.shape[0] * 8, qweight.shape[1]
    if group_size == -1:
        group_size = in_f
    _check_layout(qweight, qzeros, scales, (out_f, in_f), group_size, "unpack_gptq")
    if g_idx is not None:
        if not isinstance(g_idx, torch.Tensor) or g_idx.shape != (in_f,) or g_idx.is_floating_point():
            raise ValueError(f"unpack_gptq: g_idx must be an integer tensor of shape ({in_f},), got "
                             f"{(g_idx.dtype, tuple(g_idx.shape)) if isinstance(g_idx, torch.Tensor) else g_idx}")
        trivial = torch.arange(in_f, device=g_idx.device) // group_size
        if not torch.equal(g_idx.to(torch.int64), trivial):
            raise ValueError("desc_act/act-order checkpoints are not supported "
                             f"(g_idx is not i // group_size for group_size={group_size})")
    if checkpoint_format == "gptq":
        nib = _unpack_nibbles(qzeros, dim=1)
        if (nib == 15).any():
            raise ValueError("unpack_gptq: a GPTQ v1 zero nibble is 15 (zero point 16, or a zero of 0 packed as -1), "
                             "which a 4-bit zero point cannot hold")
        qzeros = _pack_nibbles(nib + 1, dim=1)
    return Int4Weight(qweight=qweight.contiguous(), qzeros=qzeros.contiguous(), scales=scales.contiguous(),
                      shape=(out_f, in_f), group_size=group_size)
