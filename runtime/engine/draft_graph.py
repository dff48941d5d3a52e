"""A greedy draft's one-id steps as one fixed-shape run (`DraftRun`): from an id and its position, `steps` times feed
the last id to one row of the draft's KV cache and take the argmax as the next, all on the device, so a CUDA graph
captures the whole run and a proposal of n ids costs one replay after its catching-up forward, not n - 1 eager
forwards of a few hundred launches each. Behind the experiment "draft_graphs" (kernels/options.py) until a GPU
run measures it; eager (`graphed=False`) it is what the CPU tests check.

The steps use the module's `Decode` step (the target's decode attention), while an eager draft's one-id steps use
a one-token `Prefill`: their logits may differ in rounding, so a near-tie may pick another id; the proposals change,
never the output (the verify pass decides).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model.kv_cache import KVCache
from ..model.transformer import Decode, Transformer
from .decode_graph import capture_step


class RowCache:
    """Row `slot` of `cache` as a one-row cache: views, so the module writes its K/V in place."""

    def __init__(self, cache: KVCache, slot: int):
        self.data = cache.data[:, :, slot:slot + 1]
        self.max_batch, self.max_seq_len = 1, cache.max_seq_len

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]


class DraftRun:
    """`steps` greedy draft steps of cache row `slot`: `run(first, position)` feeds `first` at `position`, then
    each id it picks at the next position, and returns the `steps` picked ids (argmax below `vocab_limit`).
    Graphed: captured on the first call, after the buffers hold that call's id and position, so the warm-up
    writes the K/V the run itself writes (nothing else of the row is touched)."""

    def __init__(self, module: Transformer, cache: KVCache, slot: int, steps: int, vocab_limit: int, *,
                 graphed: bool = False, pool=None):
        if steps < 1:
            raise ValueError(f"a draft run takes at least one step, got {steps}")
        if graphed and module.device.type != "cuda":
            raise ValueError(f"a graphed draft run needs a CUDA model, not {module.device}")
        device = module.device
        self.module, self.row, self.steps, self.vocab_limit = module, RowCache(cache, slot), steps, vocab_limit
        self.graphed, self.pool = graphed, pool
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(steps, dtype=torch.long, device=device)

    def _step(self) -> None:
        """The captured work: fixed shapes, the picks written into `out`, no host reads."""
        S = self.row.max_seq_len
        token, position = self.token, self.position
        for i in range(self.steps):
            logits = self.module(token, Decode(position, S), self.row)[:, -1]  # [1, V]
            pick = torch.argmax(logits[:, :self.vocab_limit], dim=-1)  # [1]
            self.out[i:i + 1].copy_(pick)
            token, position = pick[:, None], (position + 1).clamp(max=S - 1)

    @torch.inference_mode()
    def run(self, first: int, position: int) -> list[int]:
        self.token.fill_(first)
        self.position.fill_(position)
        if self.graphed and self.graph is None:
            named = {"token": self.token, "position": self.position, "out": self.out}
            self.graph = capture_step(self._step, named, self.module.device, self.pool)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.out.tolist()  # the one host sync of a run
