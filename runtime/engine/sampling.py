"""Sampling parameters and the on-device next-token choice (no host synchronisation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


# Below this temperature sampling is greedy: logits / T would overflow fp32 (then softmax gives NaN),
# and the distribution is already argmax up to exact ties (vLLM uses the same threshold).
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 1e4     # far past uniform already; keeps every value finite in fp32
PENALTY_RANGE = (1e-6, 1e6)
SEED_LIMIT = 2 ** 64      # torch.Generator.manual_seed takes [0, 2**64)
MAX_DECODE_STEPS = 32     # decode steps (CUDA graphs) an engine keeps, least recently used dropped first


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling keywords; `temperature` 0 (or below MIN_TEMPERATURE) is greedy.

    Every value is checked here, at the call: a bad one raises ValueError naming the parameter.
    """

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

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            bad("max_new_tokens", self.max_new_tokens, "expected an integer >= 0")
        if not _is_real(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            bad("temperature", self.temperature, f"expected a number in [0, {MAX_TEMPERATURE:g}] (0 is greedy)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "expected a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", self.top_k, "expected an integer >= 0 (0 disables top-k)")
        lo, hi = PENALTY_RANGE
        if not _is_real(self.repetition_penalty) or not lo <= self.repetition_penalty <= hi:
            bad("repetition_penalty", self.repetition_penalty, f"expected a number in [{lo:g}, {hi:g}] (1 disables it)")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            bad("stop", self.stop, "expected a non-empty string or a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            bad("seed", self.seed, "expected None or an integer in [0, 2**64)")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def top_k_bucket(top_k: int, vocab_size: int) -> int:
    """The fixed width of the top-k stage for a `top_k` value: the next power of two (0: no stage).

    The value itself is a device scalar, so one captured decode step serves every top_k of a bucket
    and the steps an engine builds stay few (log2(vocab) buckets at most)."""
    if top_k <= 0 or top_k >= vocab_size:
        return 0
    return min(1 << (top_k - 1).bit_length(), vocab_size)


@dataclass(frozen=True)
class SamplingSignature:
    """Which stages the sampler runs, as far as they shape the work: a captured decode graph serves one
    signature and every temperature, top_p, top_k (within its bucket) and repetition_penalty value
    (those are device scalars). `top_k` is the width of torch.topk (`top_k_bucket`), not the value."""

    greedy: bool
    top_k: int = 0          # topk width (a power of two, or the vocab size); 0: off (also when greedy)
    top_p: bool = False     # nucleus filter on (top_p < 1, not greedy)
    penalty: bool = False   # repetition penalty on (!= 1)

    @classmethod
    def of(cls, params: SamplingParams, vocab_size: Optional[int] = None) -> "SamplingSignature":
        """The signature of `params` for a vocabulary of `vocab_size` (default: unbounded)."""
        g = params.greedy
        k = 0 if g else top_k_bucket(params.top_k, vocab_size if vocab_size is not None else 1 << 62)
        return cls(greedy=g, top_k=k, top_p=not g and params.top_p < 1.0, penalty=params.repetition_penalty != 1.0)


Scalar = Union[float, torch.Tensor]  # a Python number, or a 0-dim fp32 tensor on the logits' device


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Scalar) -> torch.Tensor:
    """CTRL/HF rule: logits of seen tokens are divided by `penalty` if positive, multiplied if negative.
    logits fp32 [B, V]; seen bool [B, V]."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: Union[int, torch.Tensor], top_p: Scalar, *,
                       nucleus: Optional[bool] = None, k_width: Optional[int] = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (always keeps the best token).

    Nucleus as in Meta's `sample_top_p`: a token is kept when the probability mass ranked strictly
    above it is <= top_p. logits fp32 [B, V]. `top_k`: an int (0 or >= V: off), or an int64 0-dim
    device tensor in 1..k_width, where `k_width` fixes torch.topk's shape (a captured step's bucket).
    `nucleus` says whether the top-p stage runs (default: top_p < 1; pass it when top_p is a device
    tensor, which cannot be compared without a host sync).
    """
    V = logits.shape[-1]
    if k_width is None:
        k_width = top_k if 0 < top_k < V else 0
    if k_width:
        values = torch.topk(logits, min(k_width, V), dim=-1).values  # descending
        if isinstance(top_k, torch.Tensor):
            kth = values.gather(-1, (top_k.clamp(1, values.shape[-1]) - 1).expand(logits.shape[0], 1))
        else:
            kth = values[:, top_k - 1:top_k]
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
           top_k: Union[int, torch.Tensor] = 0, penalty: Scalar = 1.0, seen: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits fp32 [B, V] -> next token ids int64 [B], entirely on the device, with fixed shapes.

    The stages run are those of `sig`; the values may be Python numbers or 0-dim device tensors (as a
    captured decode step passes them; `top_k` int64, within `sig.top_k`). Sampling draws Exp(1) noise
    and takes argmax(p / noise), which picks token i with probability p_i without the host
    synchronisation of torch.multinomial; it draws one [B, V] block from `generator` per call, so a
    generator in the same state gives the same tokens.
    """
    if sig.penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)
    if sig.greedy:
        return torch.argmax(logits, dim=-1)
    logits = filter_top_k_top_p(logits / temperature, top_k, top_p, nucleus=sig.top_p, k_width=sig.top_k)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / noise, dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits fp32 [B, V] -> next token ids int64 [B] for `params` (see `sample`)."""
    sig = SamplingSignature.of(params, logits.shape[-1])
    return sample(logits, sig, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                  penalty=params.repetition_penalty, seen=seen, generator=generator)
