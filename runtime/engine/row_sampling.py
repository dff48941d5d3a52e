"""Per-row sampling of a continuous batch: each row has its own temperature, top-k, top-p, repetition
penalty and seed, held in device tensors, so one fixed-shape step (and one CUDA graph) serves any mix.

What a step does is fixed by its `Stages` (which stages run at all); the values are per-row tensors.
A row's values never change what another row draws: the noise is a counter-based hash of the row's
own seed and step (`counter_noise`), not a shared generator, so a request samples the same tokens
whatever else shares its batch, and a replayed graph draws what the eager step draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

from ..kernels.cpu_native import argmax_rows
from .sampling import SamplingParams, apply_repetition_penalty

LOGPROB_WIDTH = 20     # most alternatives a request may ask for per token (OpenAI's chat top_logprobs limit)
NONFINITE = -1         # sampled id of a row whose logits are not finite (NaN or +inf)
TOP_P_OFF = 2.0        # a top_p no cumulative probability exceeds
_M32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32  # int64 products wrap; the low 32 bits are exact
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def counter_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform noise fp32 [B, V] in (0, 1), a pure function of (seed, counter, column) per row.

    seeds, counters: int64 [B]. 24 random bits per value (all fp32 holds exactly in [0, 1))."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    row = _fmix32(lo ^ _fmix32(hi ^ _fmix32(counters & _M32)))  # [B]
    cols = torch.arange(vocab_size, dtype=torch.long, device=seeds.device)
    x = _fmix32(_fmix32(row[:, None] ^ ((cols * 0x9E3779B9) & _M32)))  # [B, V]
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class Stages:
    """Which sampling stages a step runs (its graph's shape); the values themselves are per row."""

    penalty: bool = False    # some row has a repetition penalty != 1
    sampled: bool = False    # some row samples (not greedy)
    filter: bool = False     # some sampled row has top-k or top-p on
    logprobs: bool = False   # some row wants logprobs

    @classmethod
    def of(cls, params: Sequence[SamplingParams], logprobs: Sequence[int], vocab_size: int) -> "Stages":
        sampled = [p for p in params if not p.greedy]
        return cls(penalty=any(p.repetition_penalty != 1.0 for p in params),
                   sampled=bool(sampled),
                   filter=any(0 < p.top_k < vocab_size or p.top_p < 1.0 for p in sampled),
                   logprobs=any(n > 0 for n in logprobs))


class RowView(NamedTuple):
    """Slices of RowSampling's tensors for some rows (views: writes reach the buffers)."""
    greedy: torch.Tensor       # bool [B]
    temperature: torch.Tensor  # fp32 [B] (1 on greedy rows)
    top_k: torch.Tensor        # int64 [B] (vocab size: off)
    top_p: torch.Tensor        # fp32 [B] (TOP_P_OFF: off)
    penalty: torch.Tensor      # fp32 [B] (1: off)
    seed: torch.Tensor         # int64 [B]
    counter: torch.Tensor      # int64 [B] steps sampled so far
    seen: torch.Tensor         # bool [B, V] prompt and generated ids (for the penalty)


class RowSampling:
    """Sampling values of `max_rows` rows as device tensors (RowView's fields, all rows)."""

    def __init__(self, max_rows: int, vocab_size: int, device):
        self.vocab_size = vocab_size
        f32, i64 = dict(dtype=torch.float32, device=device), dict(dtype=torch.long, device=device)
        self._t = RowView(greedy=torch.ones(max_rows, dtype=torch.bool, device=device),
                          temperature=torch.ones(max_rows, **f32),
                          top_k=torch.full((max_rows,), vocab_size, **i64),
                          top_p=torch.full((max_rows,), TOP_P_OFF, **f32),
                          penalty=torch.ones(max_rows, **f32),
                          seed=torch.zeros(max_rows, **i64),
                          counter=torch.zeros(max_rows, **i64),
                          seen=torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=device))

    def tensors(self) -> dict:
        return self._t._asdict()

    def view(self, batch: int) -> RowView:
        """Rows 0..batch-1."""
        return self.rows(0, batch)

    def rows(self, a: int, b: int) -> RowView:
        """Rows a..b-1."""
        return RowView(*(t[a:b] for t in self._t))

    def set_row(self, b: int, params: SamplingParams, seed: int, prompt: Sequence[int]) -> None:
        """Row b samples with `params` from counter 0 of `seed` (an int64); `prompt` ids count as seen."""
        t, V = self._t, self.vocab_size
        t.greedy[b] = params.greedy
        t.temperature[b] = 1.0 if params.greedy else params.temperature
        t.top_k[b] = params.top_k if 0 < params.top_k < V else V
        t.top_p[b] = params.top_p if params.top_p < 1.0 else TOP_P_OFF
        t.penalty[b] = params.repetition_penalty
        t.seed[b] = seed
        t.counter[b] = 0
        t.seen[b] = False
        if params.repetition_penalty != 1.0:
            t.seen[b].scatter_(0, torch.tensor(list(prompt), dtype=torch.long, device=t.seen.device), True)

    def clear_row(self, b: int) -> None:
        """Row b back to neutral greedy values."""
        t = self._t
        t.greedy[b], t.temperature[b], t.top_k[b] = True, 1.0, self.vocab_size
        t.top_p[b], t.penalty[b], t.counter[b] = TOP_P_OFF, 1.0, 0


class Sampled(NamedTuple):
    tokens: torch.Tensor                  # int64 [B]; NONFINITE where the logits are not finite
    logprob: Optional[torch.Tensor]       # fp32 [B] log-probability of the token (stages.logprobs)
    top_ids: Optional[torch.Tensor]       # int64 [B, LOGPROB_WIDTH] most likely ids
    top_logprobs: Optional[torch.Tensor]  # fp32 [B, LOGPROB_WIDTH] their log-probabilities


def sample_rows(logits: torch.Tensor, stages: Stages, rows: RowView, vocab_limit: Optional[int] = None) -> Sampled:
    """logits fp32 [B, V] -> each row's next token under its own values, on the device, no host sync.

    Ids at or above `vocab_limit` are never chosen (`logits` is modified in place there). Sampled rows
    take argmax(p / E) with E = -log(u) Exp(1) noise from `counter_noise`, which picks id i with
    probability p_i; every row's counter advances by one. Logprobs are of the model's distribution
    (before penalty, temperature and filtering), as OpenAI reports them.
    """
    B, V = logits.shape
    _limit_vocab(logits, vocab_limit)
    tokens = argmax_rows(logits, NONFINITE)  # (the greedy tokens, unless a penalty changes the logits)
    raw = logits
    if stages.penalty or stages.sampled:
        bad = tokens == NONFINITE
        if stages.penalty:
            logits = apply_repetition_penalty(logits, rows.seen, rows.penalty[:, None])
            tokens = argmax_rows(logits, NONFINITE)
        if stages.sampled:
            probs = _sampled_probs(logits, stages, rows)
            noise = -torch.log(counter_noise(rows.seed, rows.counter, V))
            tokens = torch.where(rows.greedy, tokens, argmax_rows(probs / noise, NONFINITE))
        tokens = tokens.masked_fill(bad, NONFINITE)
    rows.counter.add_(1)
    if not stages.logprobs:
        return Sampled(tokens, None, None, None)
    lsm = torch.log_softmax(raw, dim=-1)
    top = torch.topk(lsm, min(LOGPROB_WIDTH, V), dim=-1)
    chosen = lsm.gather(-1, tokens.clamp(min=0)[:, None])[:, 0]
    return Sampled(tokens, chosen, top.indices, top.values)


def processed_probs(logits: torch.Tensor, stages: Stages, rows: RowView, vocab_limit: Optional[int] = None):
    """fp32 [B, V]: the distribution `sample_rows` draws each sampled row's token from (penalty, temperature,
    top-k/top-p applied; ids at or above `vocab_limit` never). Meaningless for greedy rows."""
    _limit_vocab(logits, vocab_limit)
    if stages.penalty:
        logits = apply_repetition_penalty(logits, rows.seen, rows.penalty[:, None])
    return _sampled_probs(logits, stages, rows)


def _limit_vocab(logits: torch.Tensor, vocab_limit: Optional[int]) -> None:
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")


def _sampled_probs(logits: torch.Tensor, stages: Stages, rows: RowView) -> torch.Tensor:
    scaled = logits / rows.temperature[:, None]
    if stages.filter:
        scaled = _filter(scaled, rows.top_k, rows.top_p)
    return torch.softmax(scaled, dim=-1)


def _filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k best ids, then of those the nucleus of top_p (Meta's `sample_top_p` rule:
    an id stays when the mass ranked strictly above it is <= top_p); one sort serves both."""
    V = scaled.shape[-1]
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    ranks = torch.arange(V, device=scaled.device)
    ordered = ordered.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) > top_p[:, None]
    drop_sorted |= ranks[None, :] >= top_k[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))
