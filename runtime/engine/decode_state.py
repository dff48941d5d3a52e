"""An engine's device state: the KV cache (grown on demand), the decode buffers and the decode steps kept
per (batch size, sampling stages), captured into CUDA graphs when asked."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from ..model.kv_cache import KVCache
from ..model.transformer import Prefill, Transformer
from .decode_graph import DecodeBuffers, DecodeStep
from .verify_graph import VerifyBuffers, VerifyStep
from .row_sampling import Stages
from .sampling import MAX_DECODE_STEPS

MIN_CACHE = 256  # tokens per slot of the first KV cache; it grows by powers of two up to max_seq_len


class DecodeState:
    """The cache (`max_batch` slots, allocated on first use with room for what is asked: a power of two, at
    least MIN_CACHE tokens, at most max_seq_len; grown with its contents copied), the buffers of its rows
    and the steps over them (at most MAX_DECODE_STEPS, least recently used dropped first). With `graphed`
    each step is captured once and replayed, at batch sizes 1, 2, 4, ... and max_batch (idle rows padded).
    """

    def __init__(self, model: Transformer, *, max_batch: int, max_seq_len: int, graphed: bool, vocab_limit: int):
        self.model, self.max_batch, self.max_seq_len = model, max_batch, max_seq_len
        self.graphed, self.vocab_limit = graphed, vocab_limit
        self.cache: Optional[KVCache] = None
        self.buffers: Optional[DecodeBuffers] = None
        self.verify_buffers: Optional[VerifyBuffers] = None
        # (batch, stages) -> DecodeStep, ("verify", batch, width, stages, speculative sampling) -> VerifyStep; LRU
        self.steps: OrderedDict = OrderedDict()
        self.captures = 0  # CUDA graphs captured so far
        self.built = False  # the last step asked for was made by that call
        self._pool = None

    def prefill(self, ids: list, start: int, slot: int) -> torch.Tensor:
        """Prompt ids at positions start .. into cache row `slot` (K / V written) -> the last one's logits fp32
        [1, V]. On the CPU the native step in one call (a packed GEMM and transposed-key attention from 16 rows on,
        `native_decoder`'s prompt=True), elsewhere the module graph."""
        n, model = len(ids), self.model
        model.weights_in_use = True  # (the cache now holds K / V made from them, which later prompts may reuse)
        native = model.ops.decoder(model)  # (the CPU's native step, kept on the model once built; else None)
        if native is not None:
            return native(torch.tensor(ids, dtype=torch.long), torch.arange(start, start + n), self.cache.data,
                          torch.full((n,), slot, dtype=torch.long), out_rows=1, prompt=True)
        tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
        return model(tokens, Prefill(start, slot=slot), self.cache,
                     last_index=torch.tensor([n - 1], device=model.device))

    def ensure(self, need: int, decoding: set) -> bool:
        """A cache of at least `need` tokens per slot (capped at max_seq_len); True when one was made. Rows
        not in `decoding` (slot numbers) are parked at the new cache's last position."""
        size = min(self.max_seq_len, max(MIN_CACHE, 1 << (max(need, 1) - 1).bit_length()))
        old = self.cache
        if old is not None and old.max_seq_len >= size:
            return False
        self.steps.clear()  # their graphs point into the old cache
        self._pool = None
        args, device = self.model.args, self.model.device
        cache = KVCache(args, self.max_batch, size, self.model.dtype, device)
        if old is not None:  # running requests and cached prefixes carry over
            cache.data[..., :old.max_seq_len, :].copy_(old.data)
        self.cache = cache
        del old
        if self.buffers is None:
            self.buffers = DecodeBuffers(self.max_batch, args.vocab_size, device, size - 1)
            self.verify_buffers = VerifyBuffers(self.max_batch, args.vocab_size, device)
        for s in range(self.max_batch):
            if s not in decoding:
                self.buffers.positions[s] = size - 1
        return True

    def batch_size(self, n: int) -> int:
        """Rows a step over slots 0..n-1 runs: n eagerly; with graphs the next power of two (or max_batch)."""
        if not self.graphed:
            return n
        return min(1 << (n - 1).bit_length(), self.max_batch)

    def step(self, batch: int, stages: Stages) -> DecodeStep:
        """The step over rows 0..batch-1 running `stages` (made, and captured, on first use)."""
        return self._kept((batch, stages), lambda pool: DecodeStep(
            self.model, self.cache, self.buffers, batch, stages, graphed=self.graphed, pool=pool,
            vocab_limit=self.vocab_limit))

    def verify_step(self, batch: int, width: int, stages: Stages, speculative_sampling: bool) -> VerifyStep:
        """The verify pass over rows 0..batch-1, `width` proposals wide (made, and captured, on first use)."""
        return self._kept(("verify", batch, width, stages, speculative_sampling), lambda pool: VerifyStep(
            self.model, self.cache, self.buffers, self.verify_buffers, batch, width, stages,
            speculative_sampling=speculative_sampling, graphed=self.graphed, pool=pool, vocab_limit=self.vocab_limit))

    def _kept(self, key, make):
        step = self.steps.get(key)
        self.built = step is None  # (its first call pays for building: no timing to learn from)
        if step is None:
            while len(self.steps) >= MAX_DECODE_STEPS:
                self.steps.popitem(last=False)
            if self.graphed and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            step = make(self._pool)
            self.captures += self.graphed
            self.steps[key] = step
        self.steps.move_to_end(key)
        return step

    def graph_pool_bytes(self) -> int:
        """Device memory held by the captured decode graphs (their shared pool's segments); 0 without."""
        if self._pool is None or not any(s.graph is not None for s in list(self.steps.values())):
            return 0
        pool = tuple(self._pool)
        device = self.model.device.index if self.model.device.index is not None else torch.cuda.current_device()
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool and seg.get("device", device) == device)
