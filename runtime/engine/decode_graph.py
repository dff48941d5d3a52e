"""The decode step of a continuous batch as one fixed-shape unit over static buffers, run eagerly or
captured once into a CUDA graph and replayed for every token (`DecodeStep`).

Rows are KV-cache slots: row b decodes the request running in slot b. Requests join and leave
between steps by writing their row of the static buffers (`DecodeBuffers`); a step over the first B
rows serves whatever mix of requests and sampling values those rows hold, so the captured graphs are
keyed by (B, sampling stages) only. Rows with no decoding request are idle: token 0 at the cache's
last position (which no request reads), sampled greedily and ignored.

Sampling noise is a counter-based hash of each row's seed and step (`row_sampling.counter_noise`), so a
row's tokens do not depend on the other rows, and a graph replay draws what the eager step draws.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.cpu_native import greedy_acceptor
from ..model.kv_cache import KVCache
from ..model.transformer import Decode, Transformer
from .row_sampling import LOGPROB_WIDTH, NONFINITE, RowSampling, Stages, sample_rows

WARMUP_STEPS = 2  # eager runs on a side stream before a capture: Triton JIT, cuBLAS handles and workspaces

__all__ = ["DecodeBuffers", "DecodeStep", "NONFINITE", "WARMUP_STEPS", "capture_step"]


class DecodeBuffers:
    """Static per-row state of the decode batch, `rows` rows (the KV cache's slots), updated in place:

      tokens     int64 [R]      in: each row's last token (its K/V not cached yet); out: the next token
                                (NONFINITE rows get 0 here, so the next step's input stays valid)
      sampled    int64 [R]      what the last step sampled, NONFINITE (-1) where logits were not finite
      positions  int64 [R]      where `tokens` sit in the cache; +1 per step, clamped to the last position
      sampling   RowSampling    per-row temperature, top-k, top-p, penalty, seed, counter, seen
      logprob    fp32 [R], top_ids int64 [R, W], top_logprobs fp32 [R, W]   (W = LOGPROB_WIDTH)
    """

    def __init__(self, rows: int, vocab_size: int, device, last_position: int):
        self.rows = rows
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.sampled = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.full((rows,), last_position, dtype=torch.long, device=device)
        self.sampling = RowSampling(rows, vocab_size, device)
        self.logprob = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_ids = torch.zeros(rows, LOGPROB_WIDTH, dtype=torch.long, device=device)
        self.top_logprobs = torch.zeros(rows, LOGPROB_WIDTH, dtype=torch.float32, device=device)

    def tensors(self) -> dict:
        """Name -> every tensor a step reads or writes in place (the row sampling's included)."""
        named = {"tokens": self.tokens, "sampled": self.sampled, "positions": self.positions,
                 "logprob": self.logprob, "top_ids": self.top_ids, "top_logprobs": self.top_logprobs}
        named.update({f"sampling.{k}": v for k, v in self.sampling.tensors().items()})
        return named

    def start_row(self, b: int, token: int, position: int) -> None:
        """Row b decodes `token` at `position` next (its sampling values set by the caller)."""
        self.tokens[b] = max(token, 0)
        self.positions[b] = position

    def idle_row(self, b: int, last_position: int) -> None:
        """Row b has no request: a neutral greedy row writing only the cache's last position."""
        self.tokens[b] = 0
        self.positions[b] = last_position
        self.sampling.clear_row(b)


class DecodeStep:
    """One decode step over the first `batch` rows of `buffers` under `stages`.

    A call embeds each row's token, runs every layer (K/V written in place into `cache` at the row's
    position, attention over the whole cache with each row's own length read on the device), advances
    the positions and samples each row's next token with its own values. Shapes, buffers and the
    attention bound (`cache.max_seq_len`) never change and nothing is read back to the host, so the
    eager call is exactly what a CUDA graph captures: with `graphed=True` it is captured when built.
    The caller reads `buffers.sampled[:batch]` after a call: the one host sync per step.

    `vocab_limit`: ids at or above it are never sampled (an embedding padded past the tokenizer).
    """

    KIND = "decode"

    def __init__(self, model: Transformer, cache: KVCache, buffers: DecodeBuffers, batch: int, stages: Stages, *,
                 graphed: bool = False, pool=None, vocab_limit: Optional[int] = None):
        self._bind(model, cache, buffers, batch, stages, graphed, vocab_limit)
        # `_accept`'s arguments of a pass without proposals: proposals [B, 1] of which none count, its out
        self._proposals = torch.zeros(batch, 1, dtype=torch.long)
        self._proposed, self._out = self._proposals[:, 0], torch.zeros(batch, 2, dtype=torch.long)
        if graphed:
            self._capture(buffers.tensors(), pool)

    def _bind(self, model, cache, buffers, batch, stages, graphed, vocab_limit) -> None:
        """Check and keep what every step over the first `batch` rows holds (a `VerifyStep` too)."""
        if not 1 <= batch <= min(cache.max_batch, buffers.rows):
            raise ValueError(f"batch {batch} does not fit the KV cache (max_batch {cache.max_batch})")
        if graphed and model.device.type != "cuda":
            raise ValueError(f"a graphed {self.KIND} step needs a CUDA model, not {model.device}")
        self.model, self.cache, self.buffers, self.batch, self.stages = model, cache, buffers, batch, stages
        V = model.args.vocab_size
        self.vocab_limit = V if vocab_limit is None else min(vocab_limit, V)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        # the backend's whole-step decoder (the CPU's native step), or None: the module graph
        self.native = None if graphed else model.ops.decoder(model)
        # with the native step's logits and every row greedy (no penalty, no logprobs), one native call samples
        # and updates the rows (the torch ops it replaces cost ~5 us each there, their code cold after the step)
        plain_greedy = not (stages.sampled or stages.penalty or stages.logprobs)
        self._accept = greedy_acceptor() if self.native is not None and plain_greedy else None

    def _capture(self, tensors: dict, pool) -> None:
        self.graph = capture_step(self._step, tensors, self.buffers.tokens.device, pool)

    @torch.inference_mode()
    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def _step(self) -> None:
        """The captured work: fixed shapes, in-place updates of the static buffers, no host reads."""
        B, S, buf = self.batch, self.cache.max_seq_len, self.buffers
        tokens, positions, rows = buf.tokens[:B], buf.positions[:B], buf.sampling.view(B)
        if self.stages.penalty:  # (`seen[rows, tokens] = True` would copy True to the device and wait)
            rows.seen.scatter_(1, tokens[:, None], True)
        if self.native is not None:
            logits = self.native(tokens, positions, self.cache.data)
            if self._accept is not None:  # (as a verify pass with nothing proposed: out[:, 1] is the token)
                self._accept(logits, self._proposals, self._proposed, self._out, tokens, positions, rows.counter,
                             S - 1, self.vocab_limit, NONFINITE)
                buf.sampled[:B].copy_(self._out[:, 1])
                return
        else:
            logits = self.model(tokens[:, None], Decode(positions, S), self.cache)[:, -1]
        positions.add_(1).clamp_(max=S - 1)  # only idle rows reach the clamp
        out = sample_rows(logits, self.stages, rows, self.vocab_limit)
        buf.sampled[:B].copy_(out.tokens)
        tokens.copy_(out.tokens.clamp(min=0))
        if self.stages.logprobs:
            buf.logprob[:B].copy_(out.logprob)
            W = out.top_ids.shape[-1]  # (a vocabulary smaller than LOGPROB_WIDTH has fewer alternatives)
            buf.top_ids[:B, :W].copy_(out.top_ids)
            buf.top_logprobs[:B, :W].copy_(out.top_logprobs)


@torch.inference_mode()
def capture_step(step, tensors: dict, device, pool) -> torch.cuda.CUDAGraph:
    """Warm `step` up on a side stream, restore every tensor of `tensors` (name -> every buffer the step
    reads or writes in place), then capture it into a CUDA graph.

    Warm-up writes K/V at the rows' current positions: a decoding row's next step writes the same values
    there (a verify step's proposals beyond are overwritten later), and idle rows write only the cache's
    last position.
    """
    saved = {name: t.clone() for name, t in tensors.items()}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    for name, t in saved.items():
        tensors[name].copy_(t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph
