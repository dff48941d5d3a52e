"""int4 weights in tensor-core fragment order (issue 20's kernel-native layout), made once from an
`Int4Weight` by `to_frag`: each lane of a warp loads its share of a 16 x 64 weight block as one 16-byte
vector, already in the order `mma.m16n8k16`'s A fragment holds it, and dequantizes two weights at a time
with one LOP3 (`int4_frag`). No Triton here: the format, its inverse and its dequantization.

Layout. The output dim is padded with zeros to a multiple of FRAG_BLOCK_N (a GEMV program's columns) and cut
into blocks of that many rows, and those into tiles of 16 rows; the input dim into chunks of 64.
codes[blk, chunk, tile] is one 16 x 64 block (512 bytes; a program's share of the weight, all its chunks, is one
contiguous run, so its loop advances one pointer and loads at constant offsets from it). Within a block,
lane l = 4 g + t (g = 0..7, t = 0..3) holds 8 int16, element e = 4 e2 + 2 e1 + e0, and nibble c (bits
4c..4c + 3, c = 0..3) of that int16 is q[n, k] with

    n = 256 blk + 16 tile + 8 e1 + g,    k = 64 chunk + 16 t + 4 c + 2 e2 + e0             (groups of 64, 128)
                                         k = 64 chunk + 32 (c // 2) + 8 t + 4 (c % 2) + 2 e2 + e0    (groups of 32)

So nibble plane c of the block is a 16 x 16 A operand whose column j = 8 e2 + 2 t + e0 is one input k, and every
plane lies inside one group (with groups of 32, planes 0-1 in the chunk's first, 2-3 in its second). Lane
(g, t) reads x[k0 + 16 t .. + 15] (groups of 32: x[k0 + 8 t .. + 7] and x[k0 + 32 + 8 t .. + 7]) for all four
planes (`frag_column_k`). Each 32-bit half-pair holds weights (k, k + 1) of one row, so one LOP3 with
0x000F000F | 0x43004300 makes both bf16 values 128 + q.

Scales. fp32 pairs (s, -(128 + z) s), so a group's contribution is s * sum_k (128 + q) x_k + (-(128 + z) s) *
sum_k x_k = s * sum_k (q - z) x_k: the zero point and the magic number's bias fold into one FMA per output
per group. Stored per block of FRAG_BLOCK_N rows and group in the order the kernel's threads read them:
[padded out / 256, groups, 4 (w), 8 (g), 4 (r), 2 (e1), 2 (s, c)] for row 64 r + 16 w + 8 e1 + g of the block
(warp w's accumulator rows; one thread reads its 8 rows' 16 values as four 16-byte loads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .int4_format import Int4Weight

FRAG_BLOCK_N = 256   # output columns of one GEMV program; the format pads the output dim to a multiple
FRAG_K = 64          # input columns of one trip (four 16-wide nibble planes)
FRAG_BIAS = 128.0    # the bf16 magic number's value: 0x4300 | q is 128 + q
FRAG_GROUP_SIZES = (32, 64, 128)  # each plane lies inside one group, so its scale applies after the MMAs
FRAG_WARPS = 4       # warps of one GEMV program (the scales' order follows their rows)
_SCALE_BLOCK = (FRAG_WARPS, 8, FRAG_BLOCK_N // (16 * FRAG_WARPS), 2, 2)  # w g r e1 (s, c)


def frag_column_k(j: torch.Tensor, c: int, group_size: int) -> torch.Tensor:
    """Input column (within a 64-chunk) of nibble plane c's A-operand column j (0..15)."""
    e2, t, e0 = j // 8, (j % 8) // 2, j % 2
    if group_size == 32:
        return 32 * (c // 2) + 8 * t + 4 * (c % 2) + 2 * e2 + e0
    return 16 * t + 4 * c + 2 * e2 + e0


@dataclass
class Int4FragWeight:
    """An int4 weight [out, in] in fragment order (see the module doc).

    codes: int16 [padded out / 256, in / 64, 16, 32, 8]; scales: fp32 [padded out / 256, in / group_size, 4, 8,
    4, 2, 2] (see the module doc; `frag_scales` gives them as [groups, padded out, 2]);
    shape: (out, in) before padding; dtype: the activations' dtype the kernel computes in (bf16)."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple
    group_size: int
    dtype: torch.dtype = torch.bfloat16

    format = "int4_frag"

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def padded_out(self) -> int:
        return self.codes.shape[0] * FRAG_BLOCK_N

    def check(self, who: str = "Int4FragWeight") -> None:
        """ValueError unless the fields fit together (dtypes, shapes, group size, padding)."""
        n, k = self.shape
        n_pad = -(-n // FRAG_BLOCK_N) * FRAG_BLOCK_N
        blocks = n_pad // FRAG_BLOCK_N
        want = {"codes": ((blocks, k // FRAG_K, FRAG_BLOCK_N // 16, 32, 8), torch.int16),
                "scales": ((blocks, k // max(self.group_size, 1)) + _SCALE_BLOCK, torch.float32)}
        if self.group_size not in FRAG_GROUP_SIZES or k % FRAG_K:
            raise ValueError(f"{who}: group_size {self.group_size} and in_features {k} must be one of "
                             f"{FRAG_GROUP_SIZES} and a multiple of {FRAG_K}")
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
                raise ValueError(f"{who}: {name} must be contiguous {dtype} {list(shape)} for shape {self.shape}, "
                                 f"got {t.dtype} {list(t.shape)}")


def frag_supported(w: Int4Weight) -> bool:
    """Whether `to_frag` can lay out `w`: group size 32, 64 or 128, in_features a multiple of 64."""
    return w.group_size in FRAG_GROUP_SIZES and w.shape[1] % FRAG_K == 0


def to_frag(w: Int4Weight, dtype: torch.dtype = torch.bfloat16) -> Int4FragWeight:
    """`w` in fragment order, on w's device (the codes are moved, never changed)."""
    w.check("to_frag")
    if not frag_supported(w):
        raise ValueError(f"to_frag: group_size {w.group_size} with in_features {w.shape[1]} is not supported "
                         f"(group size one of {FRAG_GROUP_SIZES})")
    n, k = w.shape
    n_pad = -(-n // FRAG_BLOCK_N) * FRAG_BLOCK_N
    q, z = w.unpack()                                               # [n, k], [groups, n]
    q = torch.nn.functional.pad(q.to(torch.int32), (0, 0, 0, n_pad - n))
    q = _chunk_tile_order(q, w.group_size)                          # chunk tile g t c e2 e1 e0
    shifts = (4 * torch.arange(4, device=q.device, dtype=torch.int32)).view(4, 1, 1, 1)
    v = (q << shifts).sum(dim=4)                                    # chunk tile g t e2 e1 e0: 16 bits
    v = torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16)
    codes = v.reshape(k // FRAG_K, n_pad // FRAG_BLOCK_N, FRAG_BLOCK_N // 16, 32, 8).transpose(0, 1).contiguous()
    s = w.scales.float()                                            # [groups, n]
    c = -(FRAG_BIAS + z.float()) * s
    sc = torch.nn.functional.pad(torch.stack([s, c], dim=-1), (0, 0, 0, n_pad - n))   # [groups, n_pad, 2]
    sc = sc.view(sc.shape[0], n_pad // FRAG_BLOCK_N, _SCALE_BLOCK[2], FRAG_WARPS, 2, 8, 2)  # blk r w e1 g p
    scales = sc.permute(1, 0, 3, 5, 2, 4, 6).contiguous()                        # blk group w g r e1 p
    return Int4FragWeight(codes=codes, scales=scales, shape=(n, k), group_size=w.group_size, dtype=dtype)


def _chunk_tile_order(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [n_pad, K] -> [chunk, tile, g, t, c, e2, e1, e0] (a view), the module doc's index map."""
    n_pad, k = q.shape
    if group_size == 32:  # k = 64 chunk + 32 h + 8 t + 4 c1 + 2 e2 + e0, c = 2 h + c1
        q = q.view(n_pad // 16, 2, 8, k // FRAG_K, 2, 4, 2, 2, 2)  # tile e1 g chunk h t c1 e2 e0
        return q.permute(3, 0, 2, 5, 4, 6, 7, 1, 8).reshape(k // FRAG_K, n_pad // 16, 8, 4, 4, 2, 2, 2)
    q = q.view(n_pad // 16, 2, 8, k // FRAG_K, 4, 4, 2, 2)        # tile e1 g chunk t c e2 e0
    return q.permute(3, 0, 2, 4, 5, 6, 1, 7)


def unpack_frag(fw: Int4FragWeight) -> torch.Tensor:
    """q uint8 [out, in]: the inverse of `to_frag`'s code layout (padding dropped)."""
    n, k = fw.shape
    v = fw.codes.transpose(0, 1).to(torch.int32).reshape(k // FRAG_K, -1, 8, 4, 2, 2, 2)  # chunk tile g t e2 e1 e0
    shifts = (4 * torch.arange(4, device=v.device, dtype=torch.int32)).view(4, 1, 1, 1)
    q = (v.unsqueeze(4) >> shifts) & 0xF                                   # chunk tile g t c e2 e1 e0
    if fw.group_size == 32:
        q = q.reshape(k // FRAG_K, -1, 8, 4, 2, 2, 2, 2, 2)                # chunk tile g t h c1 e2 e1 e0
        q = q.permute(1, 7, 2, 0, 4, 3, 5, 6, 8)                           # tile e1 g chunk h t c1 e2 e0
    else:
        q = q.permute(1, 6, 2, 0, 3, 4, 5, 7)                              # tile e1 g chunk t c e2 e0
    return q.reshape(-1, k)[:n].to(torch.uint8)


def frag_scales(fw: Int4FragWeight) -> torch.Tensor:
    """fp32 [groups, padded out, 2]: each row's (s, -(128 + z) s), in row order."""
    sc = fw.scales.permute(1, 0, 4, 2, 5, 3, 6)                                   # group blk r w e1 g p
    return sc.reshape(sc.shape[0], fw.padded_out, 2)


def dequantize_frag(fw: Int4FragWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[out, in] in `dtype` (default fw.dtype): (128 + q) s + (-(128 + z) s) in fp32, rounded once."""
    n, k = fw.shape
    q = unpack_frag(fw).float()
    sc = frag_scales(fw)
    s = sc[:, :n, 0].t().repeat_interleave(fw.group_size, dim=1)
    c = sc[:, :n, 1].t().repeat_interleave(fw.group_size, dim=1)
    return torch.addcmul(c, q + FRAG_BIAS, s).to(dtype or fw.dtype)
