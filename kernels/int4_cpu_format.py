"""int4 weights in the native CPU kernels' layout (csrc/cpu_linear.h's INT4 kind): what a cpu-backend model
holds in place of GPTQ's layout, so each weight is stored once (GPTQ's tensors plus the kernels' repack of
them held it twice). Lossless both ways (`from_int4`, `to_int4`): checkpoints are written in GPTQ's layout.

Layout. codes uint8 [out, in / 2] in chunks of 32 inputs: byte j of a chunk holds input j in its low nibble
and input 16 + j in its high one. scales and zs fp32 [out, in / g] (zs = zero x scale):
W[n, k] = q[n, k] s[n, k / g] - zs[n, k / g].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .int4_format import Int4Weight, _pack_nibbles

CHUNK = 32  # inputs per 16 code bytes


@dataclass
class Int4CpuWeight:
    """An int4 weight [out, in] in the native CPU layout (module doc). `scale_dtype`: the dtype of the GPTQ
    scales it came from (restored by `to_int4`; the dequantized weight's dtype)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zs: torch.Tensor
    shape: tuple
    group_size: int
    scale_dtype: torch.dtype

    format = "int4_cpu"

    @property
    def dtype(self) -> torch.dtype:
        return self.scale_dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def check(self, who: str = "Int4CpuWeight") -> None:
        """ValueError unless the fields fit together (dtypes, shapes, group size)."""
        n, k = self.shape
        g = self.group_size
        if k % CHUNK or g % CHUNK or g <= 0 or k % g:
            raise ValueError(f"{who}: in_features {k} and group_size {g} must be multiples of {CHUNK}, the group "
                             "dividing in_features")
        want = {"codes": ((n, k // 2), torch.uint8), "scales": ((n, k // g), torch.float32),
                "zs": ((n, k // g), torch.float32)}
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
                raise ValueError(f"{who}: {name} must be contiguous {dtype} {list(shape)}, got {t.dtype} "
                                 f"{list(t.shape)}")

    @classmethod
    def from_int4(cls, w: Int4Weight) -> "Int4CpuWeight":
        """`w` in this layout (its codes moved, its scales and zero points as fp32 s and z s)."""
        w.check("Int4CpuWeight.from_int4")
        if w.shape[1] % CHUNK or w.group_size % CHUNK:
            raise ValueError(f"Int4CpuWeight.from_int4: in_features={w.shape[1]} and group_size={w.group_size} "
                             f"must be multiples of {CHUNK}")
        q, z = w.unpack()  # uint8 [out, in], [in / g, out]
        s = w.scales.t().float().contiguous()
        return cls(codes=chunk_order(q), scales=s, zs=(z.t().float() * s).contiguous(), shape=tuple(w.shape),
                   group_size=w.group_size, scale_dtype=w.scales.dtype)

    def to_int4(self) -> Int4Weight:
        """The GPTQ-layout weight this one came from, bit for bit (z = zs / s rounds back exactly: z <= 15)."""
        q = codes_of(self.codes)
        z = torch.round(self.zs / self.scales).to(torch.uint8)  # [out, in / g]
        return Int4Weight(qweight=_pack_nibbles(q.t(), dim=0), qzeros=_pack_nibbles(z.t(), dim=1),
                          scales=self.scales.t().to(self.scale_dtype).contiguous(), shape=self.shape,
                          group_size=self.group_size)


def chunk_order(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [out, in] (0..15) -> uint8 [out, in / 2] in chunk order."""
    out_f, in_f = q.shape
    chunks = q.view(out_f, in_f // CHUNK, 2, CHUNK // 2)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(out_f, in_f // 2).contiguous()


def codes_of(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of `chunk_order`: uint8 [out, in / 2] -> codes uint8 [out, in]."""
    out_f, half = codes.shape
    chunks = codes.view(out_f, half // (CHUNK // 2), 1, CHUNK // 2)
    return torch.cat([chunks & 15, chunks >> 4], dim=2).reshape(out_f, half * 2)


def dequantize_int4_cpu(w: Int4CpuWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[out, in] in `dtype` (default w.dtype): q s - z s in fp32 (the native kernels' values up to their fused
    multiply-add), rounded once to dtype."""
    g = w.group_size
    q = codes_of(w.codes).float()
    return (q * w.scales.repeat_interleave(g, dim=1) - w.zs.repeat_interleave(g, dim=1)).to(dtype or w.dtype)


def int4_cpu_linear_ref(x: torch.Tensor, w: Int4CpuWeight) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype: F.linear(x, dequantize_int4_cpu(w, x.dtype))."""
    return torch.nn.functional.linear(x, dequantize_int4_cpu(w, x.dtype))
