"""SwiGLU activation: silu(gate) * up."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., ffn_dim] in the model dtype -> [..., ffn_dim], same dtype (HF numerics)."""
    return F.silu(gate) * up
