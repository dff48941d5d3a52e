"""int8 per-channel symmetric weights: the `Int8Weight` format, round-to-nearest quantization, dequantization
and the reference matmul `int8_linear_ref` (no Triton).

Conventions: a weight w [out, in] keeps one scale per output row: w[o, i] = q[o, i] * scale[o], q in
-127..127 (-128 unused, so the grid is symmetric). Dequantization computes q * s in fp32 and rounds once to
the target dtype. The CPU runs it through csrc's native kernel (`cpu_native.int8_linear_cpu`); other devices
dequantize and multiply (`int8_linear_ref`).

The native kernels' faster decode arithmetic (`KernelOptions.cpu_integer_activations`) also rounds the
activations: to int16 in blocks of X16_BLOCK along the input against int8 weights (`quantize_x16`;
`int8_linear_x16_ref` is that kernel's reference), to int8 in blocks of X8_BLOCK against int4 weights
(`quantize_x8`, as llama.cpp's q8_0), so the products are integers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QMAX = 127
X16_BLOCK, X16_MAX = 64, 32767  # quantize_x16: inputs per block, the largest code
X8_BLOCK = 32  # quantize_x8: inputs per block (codes up to QMAX)


@dataclass
class Int8Weight:
    """A weight [out, in] as int8 codes and one scale per output row: w[o, i] = qweight[o, i] * scales[o].

    qweight: int8 [out, in], values in -127..127; scales: [out] in the model dtype (positive, finite).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    shape: tuple

    format = "int8"

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Int8Weight":
        """A copy on `device` with scales in `dtype` (default: as they are); the codes are moved, never changed."""
        return Int8Weight(qweight=self.qweight.to(device),
                          scales=self.scales.to(device=device, dtype=dtype or self.scales.dtype),
                          shape=tuple(self.shape))

    def check(self, who: str = "Int8Weight") -> None:
        """ValueError unless the fields are a consistent int8 weight (dtypes, shapes, device)."""
        out_f, in_f = self.shape
        q, s = self.qweight, self.scales
        if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or tuple(q.shape) != (out_f, in_f):
            raise ValueError(f"{who}: qweight must be int8 [{out_f}, {in_f}], got "
                             f"{(q.dtype, tuple(q.shape)) if isinstance(q, torch.Tensor) else type(q).__name__}")
        if not isinstance(s, torch.Tensor) or s.dtype not in _FLOAT_DTYPES or tuple(s.shape) != (out_f,):
            raise ValueError(f"{who}: scales must be a float32/float16/bfloat16 tensor [{out_f}], got "
                             f"{(s.dtype, tuple(s.shape)) if isinstance(s, torch.Tensor) else type(s).__name__}")
        if q.device != s.device:
            raise ValueError(f"{who}: qweight and scales are on different devices")


def quantize_int8(w: torch.Tensor, *, dtype: Optional[torch.dtype] = None) -> Int8Weight:
    """Round-to-nearest symmetric int8 of w [out, in] per output row.

    Per row, in fp32: scale = max|w| / 127 stored in `dtype` (default w.dtype) rounded up, so |q| <= 127
    (1 for an all-zero row); q = clamp(round(w / scale), -127, 127), half to even. Then
    |dequantize_int8(.) - w| <= scale / 2 per element (plus the rounding to w's dtype).
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"quantize_int8: w must be a 2-d tensor [out, in], got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_int8: w dtype {w.dtype} is not supported; expected float32, float16 or bfloat16")
    dtype = dtype or w.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_int8: scales dtype {dtype} is not supported")
    if not torch.isfinite(w).all():
        raise ValueError("quantize_int8: w has non-finite values")
    wf = w.detach().float()
    s64 = wf.abs().amax(dim=1).double() / QMAX
    s64 = torch.where(s64 > 0, s64, torch.ones_like(s64))
    scales = s64.to(dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    scales = torch.where(scales.double() < s64, (scales.view(bits) + 1).view(dtype), scales)  # round up
    if not torch.isfinite(scales).all():
        raise ValueError(f"quantize_int8: a scale overflows {dtype}")
    q = torch.round(wf / scales.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return Int8Weight(qweight=q.contiguous(), scales=scales.contiguous(), shape=tuple(w.shape))


def dequantize_int8(w: Int8Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[out, in] in `dtype` (default w.dtype): q * scale in fp32, rounded once to dtype."""
    w.check("dequantize_int8")
    return (w.qweight.float() * w.scales.float()[:, None]).to(dtype or w.dtype)


def int8_linear_ref(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype: F.linear(x, dequantize_int8(w, x.dtype))."""
    return F.linear(x, dequantize_int8(w, x.dtype))


def _quantize_blocks(x: torch.Tensor, block: int, qmax: int, dtype: torch.dtype, who: str):
    """x fp32 [..., K] -> (q [..., Kp] in dtype, s fp32 [..., Kp / block]), Kp = K rounded up to `block` (q is 0 past
    K): x[..., k] ~ q[..., k] * s[..., k // block]. Each block's s = max|x| / qmax and q = x / s rounded half to
    even; an all-zero block has s = 1, a block holding a NaN or an infinity s = NaN (and q = 0), so what
    multiplies it is NaN. csrc's quantize_block gives the same bits."""
    if x.dtype != torch.float32:
        raise TypeError(f"{who}: x must be float32, got {x.dtype}")
    K = x.shape[-1]
    Kp = -(-K // block) * block
    blocks = F.pad(x, (0, Kp - K)).reshape(*x.shape[:-1], Kp // block, block)
    amax = blocks.abs().amax(-1)
    finite = torch.isfinite(amax)
    s = torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, qmax))
    q = torch.round(blocks / s[..., None]).clamp(-qmax, qmax)
    q = torch.where(finite[..., None], q, torch.zeros_like(q)).to(dtype)
    s = torch.where(finite, s, torch.full_like(s, float("nan")))
    return q.reshape(*x.shape[:-1], Kp), s


def quantize_x16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [..., K] -> (q int16 [..., Kp], s fp32 [..., Kp / X16_BLOCK]): `_quantize_blocks` with blocks of
    X16_BLOCK and codes up to 32767 (the rounding int8 weights' decode rows take)."""
    return _quantize_blocks(x, X16_BLOCK, X16_MAX, torch.int16, "quantize_x16")


def quantize_x8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [..., K] -> (q int8 [..., Kp], s fp32 [..., Kp / X8_BLOCK]): `_quantize_blocks` with blocks of
    X8_BLOCK and codes up to 127 (the rounding int4 weights' decode rows take; llama.cpp's q8_0 of activations)."""
    return _quantize_blocks(x, X8_BLOCK, QMAX, torch.int8, "quantize_x8")


def rounded(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The fp32 values [..., K] that x's codes q [..., Kp] and block scales s stand for: q * s, past K dropped."""
    block = q.shape[-1] // s.shape[-1]
    return (q.reshape(*s.shape, block).float() * s[..., None]).reshape(q.shape)[..., :x.shape[-1]]


def int8_linear_x16_ref(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x fp32 [..., in] -> fp32 [..., out]: int8_linear_ref of x as `quantize_x16` rounds it (q * s in fp32)."""
    return F.linear(rounded(x, *quantize_x16(x)), dequantize_int8(w, torch.float32))
