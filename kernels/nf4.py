"""NF4 4-bit weights, bitsandbytes-compatible (quant_type "nf4", blocksize 64, optional double quant),
and their dequant-matmul."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


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
