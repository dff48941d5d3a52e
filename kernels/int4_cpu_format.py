"""4-bit weights in the native CPU kernels' layout (csrc/cpu_linear.h's INT4 kind): what a cpu-backend model
holds in place of GPTQ's (int4) or bitsandbytes' (NF4) layout, so each weight is stored once (the checkpoint
layout's tensors plus the kernels' repack of them held it twice). Lossless both ways (`from_int4` / `to_int4`,
`from_nf4` / `to_nf4`): checkpoints are written in GPTQ's and bitsandbytes' layouts.

Layout. codes uint8 [out, in / 2] in chunks of 32 inputs: byte j of a chunk holds input j in its low nibble
and input 16 + j in its high one. int4: scales and zs fp32 [out, in / g] (zs = zero x scale),
W[n, k] = q[n, k] s[n, k / g] - zs[n, k / g]. NF4: the codebook as 16 levels and each group's block absmax
(double quant undone, fp32), W[n, k] = levels[q[n, k]] absmax[n, k / g], bitsandbytes' fp32 products exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .int4_format import Int4Weight, _pack_nibbles
from .nf4_format import NF4Weight

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


@dataclass
class Nf4CpuWeight:
    """An NF4 weight [out, in] in the native CPU layout (module doc): codes, `scales` fp32 [out, in / group_size]
    (each group's block absmax), `levels` fp32 [16] (the codebook), and bitsandbytes' quantization state as the
    checkpoint had it (`absmax` and the double-quant fields, as `NF4Weight`'s), which `to_nf4` restores.
    group_size: the blocksize where blocks divide a row, else 32 (blocks straddle rows; every 32-input chunk
    lies in one block)."""

    codes: torch.Tensor
    scales: torch.Tensor
    levels: torch.Tensor
    absmax: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    group_size: int
    blocksize: int = 64
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = 256
    nested_offset: float = 0.0

    format = "nf4_cpu"

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @classmethod
    def from_nf4(cls, w: NF4Weight) -> "Nf4CpuWeight":
        """`w` in this layout (its codes moved, its block absmax decoded once to fp32 per group)."""
        if not nf4_supported(w):
            raise ValueError(f"Nf4CpuWeight.from_nf4: blocksize={w.blocksize} and in_features={w.shape[1]} must "
                             f"be multiples of {CHUNK}")
        out_f, in_f = w.shape
        packed = w.codes.reshape(-1)[: out_f * in_f // 2]
        q = torch.stack([packed >> 4, packed & 15], dim=1).view(out_f, in_f)  # bitsandbytes: high nibble first
        group = nf4_group(w)
        starts = torch.arange(0, out_f * in_f, group, device=packed.device)  # each group's first flat element
        absmax = w.block_absmax().float()[starts // w.blocksize].view(out_f, in_f // group).contiguous()
        return cls(codes=chunk_order(q), scales=absmax, levels=w.code.float().contiguous(), absmax=w.absmax,
                   shape=tuple(w.shape), dtype=w.dtype, group_size=group, blocksize=w.blocksize,
                   nested_absmax=w.nested_absmax, nested_code=w.nested_code, nested_blocksize=w.nested_blocksize,
                   nested_offset=w.nested_offset)

    def to_nf4(self) -> NF4Weight:
        """The bitsandbytes-layout weight this one came from, bit for bit."""
        q = codes_of(self.codes).reshape(-1)
        return NF4Weight(codes=(q[0::2] << 4) | q[1::2], absmax=self.absmax, code=self.levels, shape=self.shape,
                         dtype=self.dtype, blocksize=self.blocksize, nested_absmax=self.nested_absmax,
                         nested_code=self.nested_code, nested_blocksize=self.nested_blocksize,
                         nested_offset=self.nested_offset)


def nf4_supported(w: NF4Weight) -> bool:
    """Whether the native kernels take this NF4 weight: blocksize and input width multiples of 32 (so every
    32-weight chunk of a row lies in one block, even where blocks straddle rows)."""
    return w.blocksize % CHUNK == 0 and w.shape[1] % CHUNK == 0


def nf4_group(w: NF4Weight) -> int:
    """The kernels' group for `w`: its blocksize where blocks divide the input width, else one chunk (32; each
    chunk's scale is the absmax of the block it lies in)."""
    return w.blocksize if w.shape[1] % w.blocksize == 0 else CHUNK


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


def dequantize_nf4_cpu(w: Nf4CpuWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[out, in] in `dtype` (default w.dtype): levels[q] absmax in fp32 (bitwise `nf4_format.dequantize_nf4`'s
    products), rounded once to dtype."""
    values = w.levels[codes_of(w.codes).long()]
    return (values * w.scales.repeat_interleave(w.group_size, dim=1)).to(dtype or w.dtype)


def nf4_cpu_linear_ref(x: torch.Tensor, w: Nf4CpuWeight) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype: F.linear(x, dequantize_nf4_cpu(w).to(x.dtype)), as
    `nf4.nf4_linear_ref` computes it on the bitsandbytes-layout weight."""
    return torch.nn.functional.linear(x, dequantize_nf4_cpu(w).to(x.dtype))
