"""int4 group-wise asymmetric weights (GPTQ layout) and their dequant-matmul."""
from __future__ import annotations

from dataclasses import dataclass

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
