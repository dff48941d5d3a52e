"""NF4 4-bit weights in bitsandbytes' layout (quant_type "nf4", optional double quant): the `NF4Weight`
format, the codebooks, quantization and dequantization (no Triton: the loader and the quantizer need none).

Layout and numerics follow bitsandbytes (checked against bitsandbytes 0.50 on CPU, see
tests/kernel_tests/test_nf4.py), so bitsandbytes checkpoints load as they are and `quantize_nf4`
reproduces `bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=...)` bit for bit. bitsandbytes is not imported at run time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class NF4Weight:
    """A weight [out, in] in bitsandbytes' NF4 layout.

    codes: uint8 [out * in // 2]: the row-major flattened weight in blocks of `blocksize` (64) values,
        two 4-bit indices into `code` per byte, bitsandbytes' nibble order.
    absmax: per-block scale. Without double quant: fp32 [n_blocks]. With double quant: uint8 [n_blocks],
        indices into `nested_code` of (absmax - nested_offset) / nested_absmax[block // nested_blocksize].
    code: fp32 [16] the NF4 codebook.
    nested_absmax: fp32 [ceil(n_blocks / nested_blocksize)] or None; nested_code: fp32 [256] or None;
    nested_offset: float (mean of the first-level absmax) or 0.0.
    shape: (out, in); dtype: the dtype the weight dequantizes to (the model dtype).

    Nibble order: byte i holds flat element 2i in its high nibble and 2i + 1 in its low nibble; an odd
    element count leaves a final low nibble of 7 (the code of 0.0), as bitsandbytes pads. The last block
    may be partial (numel not a multiple of blocksize): its absmax covers the remaining elements.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = 256
    nested_offset: float = 0.0

    format = "nf4"

    @property
    def double_quant(self) -> bool:
        """True when `absmax` is itself 8-bit quantized (bitsandbytes' compress_statistics)."""
        return self.nested_absmax is not None

    def block_absmax(self) -> torch.Tensor:
        """The first-level absmax as fp32 [n_blocks], undoing double quant as bitsandbytes does, in fp32:
        nested_code[absmax[b]] * nested_absmax[b // nested_blocksize], then + nested_offset."""
        if not self.double_quant:
            return self.absmax.float()
        scale = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
        return self.nested_code[self.absmax.long()] * scale + self.nested_offset


# ---- codebooks ---------------------------------------------------------------------------------

# bitsandbytes' NF4 codebook (`get_4bit_type("nf4")`: QLoRA's normal-quantile map, sorted, exactly
# these fp32 values; index 7 is 0.0).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
QUANTIZE_CHUNK = 1 << 20  # values quantized at a time (`_quantize_4bit_codes`)


@lru_cache(maxsize=None)
def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, `create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8)`, restated with the same fp32 operations (so the same 256 values, bit for bit).

    For each exponent i = 0..6 it takes the 2**i midpoints of `linspace(0.1, 1, 2**i + 1)` (fp32), scales
    them by 10**(i - 6) and adds them with both signs (254 values); then 0 and 1.0; sorted ascending.
    (The leading-zero "additional items" of the general algorithm are 2**(7 - 7) - 1 = 0 here.)
    """
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """A fresh copy of the 256-value signed dynamic map (the nested code of double quant)."""
    return _dynamic_map().clone()


# ---- quantization (bitsandbytes' CPU algorithms, restated) ---------------------------------------

_LUT_SIZE = 65536


@lru_cache(maxsize=4)
def _nearest_lut(code_key: tuple) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer table: [-1, 1] cut into 65536 points v_i = -1 + 2i / 65535
    (fp32), each mapped to the first code index whose midpoint with its successor is >= v_i."""
    code = torch.tensor(code_key, dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    points = (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, points).to(torch.uint8)


def _quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bitsandbytes' `quantize_blockwise(values, code, blocksize)` as its CPU backend computes it for fp32
    input: absmax = max |v| per block; v * (1 / absmax) (fp32) is clamped to [-1, 1], mapped to the
    65536-point grid by truncating ((v + 1) * 0.5) * 65535 + 0.5, and the grid point's nearest code is
    taken (so a value within half a grid step, 1.5e-5, of a midpoint between two codes may take the farther
    one). An all-zero block gets absmax 0 and index 0.
    Returns (uint8 indices [n], fp32 absmax [n_blocks])."""
    n = values.numel()
    n_blocks = -(-n // blocksize)
    padded = F.pad(values, (0, n_blocks * blocksize - n))  # zeros leave each block's max |v| unchanged
    absmax = padded.view(n_blocks, blocksize).abs().amax(dim=1)
    inv = (1.0 / absmax).repeat_interleave(blocksize)[:n]
    normed = (values * inv).clamp(-1.0, 1.0)
    grid = ((((normed + 1.0) * 0.5) * float(_LUT_SIZE - 1)) + 0.5).to(torch.int64)
    lut = _nearest_lut(tuple(code.tolist())).to(values.device)
    idx = lut[grid.clamp(0, _LUT_SIZE - 1)]
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    return idx.masked_fill(zero_block, 0), absmax


def _quantize_4bit_codes(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bitsandbytes' `quantize_4bit` core (its default torch implementation, which the CPU backend runs)
    on values [n] (taken as fp32): per block absmax = max |v|; whole blocks are scaled by v * (1 / max(absmax, 1e-38)),
    the partial last block by v / max(absmax, 1e-38) (also the absmax stored for it), clamped to [-1, 1];
    the index is `bucketize` against the fp32 midpoints of the sorted codebook (a value exactly on a
    midpoint takes the lower code). Returns (packed uint8 [ceil(n / 2)], fp32 absmax [n_blocks]).
    Whole blocks of QUANTIZE_CHUNK values at a time (blocks are independent), so the temporaries (int64
    indices among them) stay bounded however large the weight."""
    step = max(blocksize, QUANTIZE_CHUNK // blocksize * blocksize)  # (blocksizes are even: no byte straddles)
    pieces = [_quantize_4bit_piece(flat[i:i + step].float(), code, blocksize) for i in range(0, flat.numel(), step)]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat([p for p, _ in pieces]), torch.cat([a for _, a in pieces])


def _quantize_4bit_piece(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    """`_quantize_4bit_codes` of values that are whole blocks, bar a partial last one."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return (idx[::2] << 4) | idx[1::2], absmax


def quantize_nf4(w: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True,
                 nested_blocksize: int = 256) -> NF4Weight:
    """Quantize a weight [out, in] (fp32/fp16/bf16) to NF4 exactly as bitsandbytes'
    `quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)`:
    the same packed codes, absmax and (with double quant) nested_offset = mean of the absmax,
    8-bit nested codes against the signed dynamic map and nested absmax per `nested_blocksize` blocks.

    The weight is taken as row-major flattened fp32 in blocks of `blocksize`; numel need not be a multiple
    of blocksize (the last block is partial, as in bitsandbytes) nor even. Both levels follow bitsandbytes'
    CPU backend (checked bit for bit); its CUDA kernels were not available to check. They take the
    nearest nested code where the CPU's 65536-point grid (see `_quantize_blockwise_8bit`) may take the
    other neighbour of a near-tie: about 2 in 1000 nested codes, each then one dynamic-map step away.
    Dequantization reads whatever codes a weight carries, so weights quantized on either load exactly.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"quantize_nf4: w must be a non-empty 2-d [out, in] tensor, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    w = w.detach()
    return quantize_nf4_rows(lambda a, b: w[a:b], tuple(w.shape), blocksize=blocksize, double_quant=double_quant,
                             nested_blocksize=nested_blocksize)


def quantize_nf4_rows(rows, shape: tuple, *, blocksize: int = 64, double_quant: bool = True,
                      nested_blocksize: int = 256) -> NF4Weight:
    """`quantize_nf4` of the [out, in] weight whose rows a .. b - 1 `rows(a, b)` gives, asked for whole blocks
    of about QUANTIZE_CHUNK values at a time (the codes of a block depend on it alone; only the double
    quantization's offset, the mean of every absmax, waits for the last), so the weight need never exist whole."""
    out_f, in_f = shape
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize {blocksize} is not one of bitsandbytes' {BLOCKSIZES}")
    if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize < 1:
        raise ValueError(f"quantize_nf4: nested_blocksize must be a positive int, got {nested_blocksize!r}")
    unit = blocksize // math.gcd(in_f, blocksize)  # rows holding whole blocks (an even count of values)
    step = max(unit, QUANTIZE_CHUNK // max(in_f, 1) // unit * unit)
    code, pieces, dtype = None, [], None
    for a in range(0, out_f, step):
        chunk = rows(a, min(a + step, out_f))
        if chunk.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"quantize_nf4: w dtype {chunk.dtype} is not supported; expected float32, float16 or "
                            "bfloat16")
        if code is None:
            code, dtype = NF4_CODE.to(chunk.device, copy=True), chunk.dtype  # (the weight's own codebook tensor)
        pieces.append(_quantize_4bit_codes(chunk.reshape(-1), code, blocksize))
    codes = pieces[0][0] if len(pieces) == 1 else torch.cat([p for p, _ in pieces])
    absmax = pieces[0][1] if len(pieces) == 1 else torch.cat([a for _, a in pieces])
    out = NF4Weight(codes=codes, absmax=absmax, code=code, shape=tuple(shape), dtype=dtype,
                    blocksize=blocksize, nested_blocksize=nested_blocksize)
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map().to(code.device)
        out.absmax, out.nested_absmax = _quantize_blockwise_8bit(absmax - offset, nested_code, nested_blocksize)
        out.nested_code = nested_code
        out.nested_offset = offset.item()
    return out


def dequantize_nf4(w: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight [out, in] in w.dtype, as bitsandbytes' `dequantize_4bit`: value = code[nibble] *
    absmax[block] in fp32 (absmax undone from double quant in fp32 first, see `block_absmax`), then
    rounded to w.dtype (round to nearest even). dtype overrides the result dtype (float32: the fp32
    products themselves, before any rounding to the model dtype)."""
    n = math.prod(w.shape)
    packed = w.codes.reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    values = w.code[nibbles]
    absmax = w.block_absmax()
    full = n - n % w.blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].view(-1, w.blocksize) * absmax[: full // w.blocksize, None]).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[-1]
    return out.view(w.shape).to(dtype or w.dtype)
