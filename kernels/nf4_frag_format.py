"""NF4 weights in tensor-core fragment order (issue 20's kernel-native layout for bitsandbytes' NF4), made once
from an `NF4Weight` by `to_nf4_frag`: each lane of a warp loads its share of a 16 x 64 weight block as one
16-byte vector, every byte one of bitsandbytes' own bytes (two codes, input columns k and k + 1 of one output
row), placed where `mma.m16n8k16`'s A fragment needs the pair of values it decodes to (`nf4_frag`). No Triton
here: the format, its inverse and its dequantization.

Codes. The output dim is padded to a multiple of NF4_FRAG_BLOCK_N (a GEMV program's columns) and cut into blocks
of that many rows and those into 16-row tiles; the input dim into 64-column chunks, one NF4 block each.
codes[blk, chunk, tile] is one 16 x 64 block (512 bytes; a program's whole share of the weight, all its chunks,
is one contiguous run). Lane l = 4 g + t holds 16 bytes, byte 4 b + c (register b = 2 e2 + e1 of the A
fragment, plane c = 0..3) being bitsandbytes' byte of row n and columns (k, k + 1) with

    n = 256 blk + 16 tile + 8 e1 + g,    k = 64 chunk + 16 t + 4 c + 2 e2

(high nibble: code of k, low nibble: code of k + 1, as bitsandbytes packs them). So plane c of the block is a
16 x 16 A operand whose column j = 8 e2 + 2 t + e0 is input k + e0 (`int4_frag_format.frag_column_k`'s map),
lane t reads x[16 t .. 16 t + 15] for all four planes, and each byte is one 32-bit register of the fragment
after one table lookup: `pairs[byte]` = (value of the high nibble, value of the low nibble) as two bf16 (or
fp16) in the low and high half. Stored as int16 [blocks, chunks, 16 tiles, 32, 8] (per lane, `int4_frag`'s
8 int16: element 2 b + h holds bytes 4 b + 2 h and 4 b + 2 h + 1).

Scales. Each NF4 block's absmax, double quant undone at repack time exactly as bitsandbytes does it (fp32,
`NF4Weight.block_absmax`), per row block and chunk in the order the kernel's threads read them:
[padded out / 256, chunks, 4 (w), 8 (g), 4 (r), 2 (e1)] for row 64 r + 16 w + 8 e1 + g (8 consecutive
floats a thread, two 16-byte loads). fp32 costs 4 bytes a block where double quant costs ~1.02: the layout
streams 0.5625 bytes a weight against bitsandbytes' 0.516 (+9%).

Values. The kernel multiplies `values` (the codebook rounded to the model dtype) by x and applies the fp32
absmax after the MMAs: its weight is values[q] * absmax (`dequantize_nf4_frag`), where bitsandbytes' is
code[q] * absmax rounded to the dtype (`exact=True` gives that, from the same fields, bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .nf4_format import NF4Weight

NF4_FRAG_BLOCK_N = 256  # output columns of one GEMV program; the format pads the output dim to a multiple
NF4_FRAG_K = 64         # input columns of one chunk: one NF4 block (bitsandbytes' blocksize 64)
NF4_FRAG_WARPS = 4      # warps of one GEMV program (the scales' order follows their rows)
NF4_FRAG_DTYPES = (torch.bfloat16, torch.float16)
_SCALE_BLOCK = (NF4_FRAG_WARPS, 8, NF4_FRAG_BLOCK_N // (16 * NF4_FRAG_WARPS), 2)  # w g r e1
_TILES = NF4_FRAG_BLOCK_N // 16


@dataclass
class Nf4FragWeight:
    """An NF4 weight [out, in] in fragment order (see the module doc).

    codes: int16 [padded out / 256, in / 64, 16, 32, 8]; scales: fp32 [padded out / 256, in / 64, 4, 8, 4, 2] (the
    blocks' absmax; `nf4_frag_scales` gives them as [in / 64, padded out]); code: fp32 [16], the weight's
    codebook; values: fp32 [16], code rounded to `dtype`; pairs: int32 [256], pairs[b] = values[b >> 4] in the
    low and values[b & 15] in the high 16 bits, as `dtype`; shape: (out, in) before padding; dtype: bf16 or fp16."""

    codes: torch.Tensor
    scales: torch.Tensor
    code: torch.Tensor
    values: torch.Tensor
    pairs: torch.Tensor
    shape: tuple
    dtype: torch.dtype = torch.bfloat16

    format = "nf4_frag"

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def padded_out(self) -> int:
        return self.codes.shape[0] * NF4_FRAG_BLOCK_N

    def check(self, who: str = "Nf4FragWeight") -> None:
        """ValueError unless the fields fit together (dtypes, shapes, padding, device)."""
        n, k = self.shape
        if k % NF4_FRAG_K or self.dtype not in NF4_FRAG_DTYPES:
            raise ValueError(f"{who}: in_features {k} must be a multiple of {NF4_FRAG_K} and dtype {self.dtype} one "
                             f"of bfloat16, float16")
        n_pad = -(-n // NF4_FRAG_BLOCK_N) * NF4_FRAG_BLOCK_N
        blocks = n_pad // NF4_FRAG_BLOCK_N
        want = {"codes": ((blocks, k // NF4_FRAG_K, _TILES, 32, 8), torch.int16),
                "scales": ((blocks, k // NF4_FRAG_K) + _SCALE_BLOCK, torch.float32),
                "code": ((16,), torch.float32), "values": ((16,), torch.float32), "pairs": ((256,), torch.int32)}
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device != self.device:
                raise ValueError(f"{who}: {name} must be contiguous {dtype} {list(shape)} on {self.device} for shape "
                                 f"{self.shape}, got {t.dtype} {list(t.shape)} on {t.device}")


def nf4_frag_supported(w: NF4Weight) -> bool:
    """Whether `to_nf4_frag` can lay out `w`: blocksize 64, in_features a multiple of 64, a bf16 or fp16 model."""
    return w.blocksize == NF4_FRAG_K and w.shape[1] % NF4_FRAG_K == 0 and w.dtype in NF4_FRAG_DTYPES


def pair_table(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 [256]: for byte b, values[b >> 4] (low 16 bits) and values[b & 15] (high 16 bits) as `dtype`."""
    bits = values.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    b = torch.arange(256, device=values.device)
    word = bits[b >> 4] | (bits[b & 15] << 16)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def to_nf4_frag(w: NF4Weight) -> Nf4FragWeight:
    """`w` in fragment order, on w's device (the codes are moved, never changed; the absmax decoded once)."""
    if not nf4_frag_supported(w):
        raise ValueError(f"to_nf4_frag: blocksize {w.blocksize}, in_features {w.shape[1]}, dtype {w.dtype}: need "
                         f"blocksize {NF4_FRAG_K}, in_features a multiple of {NF4_FRAG_K}, bfloat16 or float16")
    n, k = w.shape
    n_pad = -(-n // NF4_FRAG_BLOCK_N) * NF4_FRAG_BLOCK_N
    packed = w.codes.reshape(-1)[: n * k // 2].view(n, k // 2)  # byte (n, k // 2): codes of k (high), k + 1
    packed = F.pad(packed, (0, 0, 0, n_pad - n), value=0x77)   # padding rows: code 7 (0.0) twice
    # [tile, e1, g, chunk, t, c, e2] -> [chunk, tile, g, t, e2, e1, c]: lane (g, t), byte 4 (2 e2 + e1) + c
    blocks = packed.view(n_pad // 16, 2, 8, k // NF4_FRAG_K, 4, 4, 2).permute(3, 0, 2, 4, 6, 1, 5)
    blocks = blocks.reshape(k // NF4_FRAG_K, n_pad // NF4_FRAG_BLOCK_N, _TILES, 32, 8, 2).transpose(0, 1)
    codes = blocks.contiguous()
    codes = (codes[..., 0].to(torch.int32) | (codes[..., 1].to(torch.int32) << 8))
    codes = torch.where(codes >= 1 << 15, codes - (1 << 16), codes).to(torch.int16)
    absmax = w.block_absmax().view(n, k // NF4_FRAG_K).t()                        # [chunks, n] fp32
    absmax = F.pad(absmax, (0, n_pad - n))
    sc = absmax.view(k // NF4_FRAG_K, n_pad // NF4_FRAG_BLOCK_N, _SCALE_BLOCK[2], NF4_FRAG_WARPS, 2, 8)  # r w e1 g
    scales = sc.permute(1, 0, 3, 5, 2, 4).contiguous()                                    # blk chunk w g r e1
    code = w.code.float().contiguous()
    values = code.to(w.dtype).float()
    return Nf4FragWeight(codes=codes, scales=scales, code=code, values=values, pairs=pair_table(values, w.dtype),
                         shape=(n, k), dtype=w.dtype)


def unpack_nf4_frag(fw: Nf4FragWeight) -> torch.Tensor:
    """Codes uint8 [out, in] (0..15): the inverse of `to_nf4_frag`'s layout (padding dropped)."""
    n, k = fw.shape
    v = fw.codes.transpose(0, 1).to(torch.int32) & 0xFFFF                                  # chunk blk tile lane e
    by = torch.stack([v & 0xFF, v >> 8], dim=-1).view(k // NF4_FRAG_K, -1, 8, 4, 2, 2, 4)  # chunk tile g t e2 e1 c
    by = by.permute(1, 5, 2, 0, 3, 6, 4).reshape(-1, k // 2)                              # tile e1 g chunk t c e2
    return torch.stack([by >> 4, by & 15], dim=-1).reshape(-1, k)[:n].to(torch.uint8)


def nf4_frag_scales(fw: Nf4FragWeight) -> torch.Tensor:
    """fp32 [in / 64, padded out]: each block's absmax, in row order."""
    sc = fw.scales.permute(1, 0, 4, 2, 5, 3)  # chunk blk r w e1 g
    return sc.reshape(sc.shape[0], fw.padded_out)


def dequantize_nf4_frag(fw: Nf4FragWeight, dtype: torch.dtype | None = None, *, exact: bool = False) -> torch.Tensor:
    """[out, in] in `dtype` (default fw.dtype): values[q] * absmax in fp32 (the kernel's weight), rounded once;
    exact=True: code[q] * absmax (bitsandbytes' `dequantize_4bit`, bit for bit when rounded to fw.dtype)."""
    n, k = fw.shape
    q = unpack_nf4_frag(fw).long()
    table = fw.code if exact else fw.values
    absmax = nf4_frag_scales(fw)[:, :n].t().repeat_interleave(NF4_FRAG_K, dim=1)
    return (table[q] * absmax).to(dtype or fw.dtype)
