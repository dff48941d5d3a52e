"""Sampling parameters and the on-device next-token choice (no host synchronisation)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling keywords; `temperature == 0` is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple = ()
    seed: Optional[int] = None

    def __post_init__(self):
        def bad(name, value, want):
            raise ValueError(f"{name}={value!r} is invalid: {want}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 0:
            bad("max_new_tokens", self.max_new_tokens, "expected an integer >= 0")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "expected a finite number >= 0 (0 is greedy)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "expected a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "expected an integer >= 0 (0 disables top-k)")
        if not _is_real(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) \
                or self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "expected a finite number > 0 (1 disables it)")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            bad("stop", self.stop, "expected a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "expected an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingSignature:
    """Which stages the sampler runs, as far as they shape the work: a captured decode graph serves one
    signature and every temperature, top_p and repetition_penalty value (those are device scalars).
    top_k sets a tensor shape (torch.topk), so its value is part of the signature."""

    greedy: bool
    top_k: int = 0          # 0: off (also when greedy)
    top_p: bool = False     # nucleus filter on (top_p < 1, not greedy)
    penalty: bool = False   # repetition penalty on (!= 1)

    @classmethod
    def of(cls, params: SamplingParams) -> "SamplingSignature":
        g = params.greedy
        return cls(greedy=g, top_k=0 if g else params.top_k, top_p=not g and params.top_p < 1.0,
                   penalty=params.repetition_penalty != 1.0)


Scalar = Union[float, torch.Tensor]  # a Python number, or a 0-dim fp32 tensor on the logits' device


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Scalar) -> torch.Tensor:
    """CTRL/HF rule: logits of seen tokens are divided by `penalty` if positive, multiplied if negative.
    logits fp32 [B, V]; seen bool [B, V]."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: Scalar, *,
                       nucleus: Optional[bool] = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (always keeps the best token).

    Nucleus as in Meta's `sample_top_p`: a token is kept when the probability mass ranked strictly
    above it is <= top_p. logits fp32 [B, V]. `nucleus` says whether the top-p stage runs (default:
    top_p < 1; pass it when top_p is a device tensor, which cannot be compared without a host sync).
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if nucleus is None:
        nucleus = top_p < 1.0
    if nucleus:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, sig: SamplingSignature, *, temperature: Scalar = 1.0, top_p: Scalar = 1.0,
           penalty: Scalar = 1.0, seen: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits fp32 [B, V] -> next token ids int64 [B], entirely on the device, with fixed shapes.

    The stages run are those of `sig`; the values may be Python numbers or 0-dim device tensors (as a
    captured decode step passes them). Sampling draws Exp(1) noise and takes argmax(p / noise), which
    picks token i with probability p_i without the host synchronisation of torch.multinomial; it draws
    one [B, V] block from `generator` per call, so a generator in the same state gives the same tokens.
    """
    if sig.penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)
    if sig.greedy:
        return torch.argmax(logits, dim=-1)
    logits = filter_top_k_top_p(logits / temperature, sig.top_k, top_p, nucleus=sig.top_p)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / noise, dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits fp32 [B, V] -> next token ids int64 [B] for `params` (see `sample`)."""
    return sample(logits, SamplingSignature.of(params), temperature=params.temperature, top_p=params.top_p,
                  penalty=params.repetition_penalty, seen=seen, generator=generator)
