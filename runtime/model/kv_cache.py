"""Static KV cache: preallocated once, written in place at tensor positions."""
from __future__ import annotations

import torch

from .config import ModelArgs
from ..errors import is_allocation_failure


class KVCache:
    """Keys and values of every layer in one allocation.

    data: [n_layers, 2, max_batch, n_kv_heads, max_seq_len, head_dim] in the model dtype;
    `layer(i)` gives views (k, v), each [max_batch, n_kv_heads, max_seq_len, head_dim].
    Buffers never move or change shape, so a decode step over them can be graph-captured.
    """

    def __init__(self, args: ModelArgs, max_batch: int, max_seq_len: int, dtype: torch.dtype, device):
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        shape = (args.n_layers, 2, max_batch, args.n_kv_heads, max_seq_len, args.head_dim)
        try:
            self.data = torch.zeros(shape, dtype=dtype, device=device)
        except RuntimeError as e:
            if not is_allocation_failure(e):
                raise
            need = args.kv_cache_bytes(max_batch, max_seq_len, torch.empty((), dtype=dtype).element_size())
            raise MemoryError(f"the KV cache ({max_batch} x {max_seq_len} tokens, {need / 2 ** 30:.2f} GiB) does "
                              f"not fit in {torch.device(device)} memory: lower max_batch_size or "
                              "max_seq_len") from None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def clear_row(self, row: int) -> None:
        """Zeros over cache row `row` (every layer and position): what a failed request wrote there (NaN or inf
        K / V) must not reach the next request in the row, whose masked positions weigh it by zero (0 x NaN)."""
        self.data[:, :, row].zero_()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
