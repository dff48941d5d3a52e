"""The decode step as one fixed-shape unit over static buffers, run eagerly or captured once into a
CUDA graph and replayed for every token (`DecodeStep`).

Seeded sampling gives the same tokens graphed and eager: the step draws its noise from the engine's
generator, which a captured graph reads when it is replayed (PyTorch's graph-safe Philox state: each
replay uses the generator's current seed and offset, then advances the offset by what the step
consumed, exactly as the eager step does). Warm-up runs before a capture put the generator back where
they found it, so capturing consumes no randomness.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model.kv_cache import KVCache
from ..model.transformer import Decode, Transformer
from .sampling import SamplingParams, SamplingSignature, sample

WARMUP_STEPS = 2  # eager runs on a side stream before a capture: Triton JIT, cuBLAS handles and workspaces
NONFINITE = -1    # in `tokens`: that row's logits were NaN or +inf (or all -inf)


class DecodeStep:
    """One decode step of `batch` sequences under one sampling signature.

    A call embeds each row's last token, runs every layer (K/V written in place into `cache` at the
    row's position, attention over the whole cache with each row's own length read on the device),
    advances the positions and samples the next tokens. Shapes, buffers and the attention bound
    (`cache.max_seq_len`) never change from call to call and nothing is read back to the host, so the
    eager call is exactly what a CUDA graph captures: with `graphed=True` the step is captured when
    built and each call replays it.

    Static buffers (B = batch, V = vocab), updated in place by every call:
      tokens       int64 [B]    in: each row's last token (its K/V not cached yet); out: the next token
      positions    int64 [B]    where `tokens` sit in the cache; +1 per call, clamped to the last slot
      seen         bool [B, V]  tokens of each row so far (repetition penalty only; else None)
      temperature, top_p, penalty   fp32 []   sampling values, so one capture serves all of them
      top_k        int64 []     the top-k value, within the signature's bucket
    The caller reads `tokens` after a call (`tokens.tolist()`): the one host sync per token, outside
    the step. A row whose logits were not finite (NaN, +inf, or all -inf) gets NONFINITE (-1) instead
    of a token, so broken numerics surface as an error rather than a stream of id 0.

    `vocab_limit` (default: the whole vocabulary): ids at or above it are never sampled (an embedding
    padded past the tokenizer's pieces has rows no text decodes to).
    """

    def __init__(self, model: Transformer, cache: KVCache, batch: int, sig: SamplingSignature,
                 generator: Optional[torch.Generator] = None, *, graphed: bool = False, pool=None,
                 vocab_limit: Optional[int] = None):
        if not 1 <= batch <= cache.max_batch:
            raise ValueError(f"batch {batch} does not fit the KV cache (max_batch {cache.max_batch})")
        if graphed and model.device.type != "cuda":
            raise ValueError(f"a graphed decode step needs a CUDA model, not {model.device}")
        device = model.device
        self.model, self.cache, self.batch, self.sig = model, cache, batch, sig
        V = model.args.vocab_size
        self.vocab_limit = V if vocab_limit is None else min(vocab_limit, V)
        self.generator = None if sig.greedy else generator
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch, model.args.vocab_size, dtype=torch.bool, device=device) \
            if sig.penalty else None
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.top_p = torch.ones((), dtype=torch.float32, device=device)
        self.penalty = torch.ones((), dtype=torch.float32, device=device)
        self.top_k = torch.ones((), dtype=torch.long, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        if graphed:
            self._capture(pool)

    def buffers(self) -> dict:
        """Name -> every tensor a call reads or writes in place (the KV cache included)."""
        named = {"tokens": self.tokens, "positions": self.positions, "temperature": self.temperature,
                 "top_p": self.top_p, "penalty": self.penalty, "top_k": self.top_k, "kv_cache": self.cache.data}
        if self.seen is not None:
            named["seen"] = self.seen
        return named

    @torch.inference_mode()
    def start(self, logits: torch.Tensor, prompts: list, params: SamplingParams) -> None:
        """Load a generation: prompts (id lists, already prefilled into the cache) and `logits` fp32
        [B, V] at their last tokens. Samples the first new tokens into `tokens` with the step's own
        values; the next call decodes them at positions len(prompt)."""
        if len(prompts) != self.batch or SamplingSignature.of(params, self.model.args.vocab_size) != self.sig:
            raise ValueError("start: prompts or sampling do not match this decode step")
        device = self.tokens.device
        self.temperature.fill_(params.temperature if not params.greedy else 1.0)
        self.top_p.fill_(params.top_p)
        self.penalty.fill_(params.repetition_penalty)
        self.top_k.fill_(max(params.top_k, 1))
        self.positions.copy_(torch.tensor([len(p) for p in prompts], dtype=torch.long))
        self.positions.clamp_(max=self.cache.max_seq_len - 1)  # a prompt filling the cache is done already
        if self.seen is not None:
            self.seen.zero_()
            for b, p in enumerate(prompts):
                self.seen[b].scatter_(0, torch.tensor(p, device=device), True)
        self.tokens.copy_(self._sample(logits))

    @torch.inference_mode()
    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    # ---- the step itself -------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit:] = float("-inf")
        tokens = sample(logits, self.sig, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        penalty=self.penalty, seen=self.seen, generator=self.generator)
        return tokens.masked_fill(~torch.isfinite(logits.amax(dim=-1)), NONFINITE)  # amax propagates NaN

    def _step(self) -> None:
        """The captured work: fixed shapes, in-place updates of the static buffers, no host reads."""
        S = self.cache.max_seq_len
        if self.seen is not None:  # (`seen[rows, tokens] = True` would copy True to the device and wait)
            self.seen.scatter_(1, self.tokens[:, None], True)
        logits = self.model(self.tokens[:, None], Decode(self.positions, S), self.cache)[:, -1]
        self.positions.add_(1).clamp_(max=S - 1)  # only finished rows (still decoded) reach the clamp
        self.tokens.copy_(self._sample(logits))

    @torch.inference_mode()
    def _capture(self, pool) -> None:
        """Warm up on a side stream, restore every buffer and the generator, then capture `_step`.

        Warm-up writes K/V at the current positions; the engine captures before its prefill, so those
        slots are rewritten before anything reads them.
        """
        device = self.tokens.device
        saved = {name: t.clone() for name, t in self.buffers().items() if name != "kv_cache"}
        rng = self.generator.get_state() if self.generator is not None else None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        for name, t in saved.items():
            self.buffers()[name].copy_(t)
        if rng is not None:
            self.generator.set_state(rng)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self.generator)  # torch >= 2.4; newer versions also register lazily
        with torch.cuda.graph(graph, pool=pool):
            self._step()
        self.graph = graph
