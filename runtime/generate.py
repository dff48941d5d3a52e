"""The generation engine: batched prefill into the static KV cache, then one-token decode steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .detokenize import TextStream
from .kv_cache import KVCache
from .model import Decode, Prefill, Transformer
from .sampling import SamplingParams, sample_next
from .tokenizer import Tokenizer

KV_LEN_ROUND = 256  # eager decode reads the cache up to a bound rounded to this many tokens


@dataclass
class Completion:
    """One finished sequence. token_ids: generated ids only (without the EOS/EOT that ended it)."""

    text: str
    token_ids: list = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "length"  # "length" | "stop" | "eos" | "eot"


class Engine:
    """Owns the model, the tokenizer and a static KV cache for up to max_batch sequences.

    The cache is allocated on first use with room for what the call needs (rounded up to a power
    of two, at least 256 tokens, at most max_seq_len) and reallocated larger only when a later
    call needs more, so memory follows use rather than the model's full context.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int, max_seq_len: int,
                 prefill_chunk: int = 2048):
        self.model, self.tok = model, tokenizer
        self.max_batch, self.max_seq_len, self.prefill_chunk = max_batch, max_seq_len, prefill_chunk
        self._cache: Optional[KVCache] = None

    def cache_for(self, n_tokens: int) -> KVCache:
        """A KV cache holding at least `n_tokens` (<= max_seq_len) tokens per sequence."""
        need = min(self.max_seq_len, max(256, 1 << (max(n_tokens, 1) - 1).bit_length()))
        if self._cache is None or self._cache.max_seq_len < need:
            self._cache = None  # free the old one before allocating
            self._cache = KVCache(self.model.args, self.max_batch, need, self.model.dtype, self.model.device)
        return self._cache

    def check_prompt(self, ids, what="prompt") -> list[int]:
        ids = [int(i) for i in ids]
        V = self.model.args.vocab_size
        if not ids:
            raise ValueError(f"{what} is empty")
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise ValueError(f"{what} has token id {bad[0]} outside the vocabulary [0, {V})")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"{what} has {len(ids)} tokens, longer than the context max_seq_len="
                             f"{self.max_seq_len}")
        return ids

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [B, T] -> fp32 [B, T, V]: one forward pass without the KV cache."""
        return self.model(tokens.to(self.model.device), Prefill(0), None)

    def run(self, prompts: list[list[int]], params: SamplingParams, stop_tokens: dict) -> "Run":
        """Start generating for `prompts` (validated id lists); iterate the Run for streamed pieces."""
        return Run(self, [self.check_prompt(p) for p in prompts], params, stop_tokens)


class Run:
    """One batched generation. Iterating yields (row, text piece) as text becomes final;
    `completions` holds the results once iteration ends. Batches over max_batch run in groups."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams, stop_tokens: dict):
        self.engine, self.prompts, self.params, self.stop_tokens = engine, prompts, params, stop_tokens
        self.completions: list[Optional[Completion]] = [None] * len(prompts)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        generator = None
        if not self.params.greedy:
            generator = torch.Generator(device=self.engine.model.device)
            if self.params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.params.seed)
        mb = self.engine.max_batch
        for g in range(0, len(self.prompts), mb):
            for row, piece in self._group(g, self.prompts[g:g + mb], generator):
                yield g + row, piece

    def _group(self, offset: int, prompts, generator) -> Iterator[tuple[int, str]]:
        eng, params = self.engine, self.params
        model, device = eng.model, eng.model.device
        B = len(prompts)
        lens = [len(p) for p in prompts]
        budget = [min(params.max_new_tokens, eng.max_seq_len - n) for n in lens]
        streams = [TextStream(eng.tok, params.stop) for _ in prompts]
        finish = ["length"] * B
        done = [b <= 0 for b in budget]
        # inference_mode wraps the tensor work only, never a `yield`: the caller's code between
        # streamed pieces must not run in inference mode.
        if not all(done):
            with torch.inference_mode():
                cache = eng.cache_for(max(n + b for n, b in zip(lens, budget)))
                logits = self._prefill(prompts, lens, cache)
                seen = self._seen(prompts) if params.repetition_penalty != 1.0 else None
                positions = torch.tensor(lens, dtype=torch.long, device=device)
            step = 0
            while True:
                with torch.inference_mode():
                    next_tok = sample_next(logits, params, seen, generator)
                    tokens = next_tok.tolist()  # the one host sync per token: stops and streaming
                for b, t in enumerate(tokens):
                    if done[b]:
                        continue
                    if t in self.stop_tokens:
                        finish[b], done[b] = self.stop_tokens[t], True
                        continue
                    piece = streams[b].push(t)
                    if piece:
                        yield b, piece
                    if streams[b].stopped:
                        finish[b], done[b] = "stop", True
                    elif len(streams[b].ids) >= budget[b]:
                        done[b] = True
                if all(done):
                    break
                with torch.inference_mode():
                    if seen is not None:
                        seen[torch.arange(B, device=device), next_tok] = True
                    kv_len = min(cache.max_seq_len, -(-(max(lens) + step + 1) // KV_LEN_ROUND) * KV_LEN_ROUND)
                    logits = model(next_tok[:, None], Decode(positions, kv_len), cache)[:, -1]
                    positions.add_(1).clamp_(max=cache.max_seq_len - 1)  # only finished rows reach the clamp
                step += 1
        for b in range(B):
            piece = streams[b].finish()
            if piece:
                yield b, piece
            if streams[b].stopped:
                finish[b] = "stop"
            self.completions[offset + b] = Completion(text=streams[b].text, token_ids=list(streams[b].ids),
                                                      prompt_tokens=lens[b], finish_reason=finish[b])

    def _prefill(self, prompts, lens, cache: KVCache) -> torch.Tensor:
        """Right-padded chunked prefill; returns fp32 logits [B, V] at each prompt's last token."""
        eng = self.engine
        device = eng.model.device
        T = max(lens)
        tokens = torch.tensor([p + [p[-1]] * (T - len(p)) for p in prompts], dtype=torch.long, device=device)
        last = torch.tensor(lens, device=device) - 1
        logits = None
        for start in range(0, T, eng.prefill_chunk):
            chunk = tokens[:, start:start + eng.prefill_chunk]
            n = chunk.shape[1]
            idx = (last - start).clamp(0, n - 1)
            out = eng.model(chunk, Prefill(start), cache, last_index=idx)
            here = ((last >= start) & (last < start + n))[:, None]
            logits = out if logits is None else torch.where(here, out, logits)
        return logits

    def _seen(self, prompts) -> torch.Tensor:
        device = self.engine.model.device
        seen = torch.zeros(len(prompts), self.engine.model.args.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, torch.tensor(p, device=device)] = True
        return seen
