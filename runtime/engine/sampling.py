"""Sampling parameters (`SamplingParams`, every value checked at the call) and the repetition penalty rule;
the per-row sampler of a decode batch is `row_sampling`. Imports no torch (the lite runtime checks its
keywords with SamplingParams too); the penalty works through the tensors' own methods."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    import torch


# Below this temperature sampling is greedy: logits / T would overflow fp32 (then softmax gives NaN),
# and the distribution is already argmax up to exact ties (vLLM uses the same threshold).
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 1e4     # far past uniform already; keeps every value finite in fp32
PENALTY_RANGE = (1e-6, 1e6)
SEED_LIMIT = 2 ** 64      # seeds are 64-bit: the counter noise hashes both halves (row_sampling)
MAX_DECODE_STEPS = 32     # decode steps (CUDA graphs) an engine keeps, least recently used dropped first
SPECULATE_MODES = ("lookup", "draft")  # speculative decoding's proposers (engine/speculation.py)
MAX_SPECULATIVE_TOKENS = 16  # proposals per verify pass at most (a pass scores one more token)


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling keywords; `temperature` 0 (or below MIN_TEMPERATURE) is greedy. `speculate` turns on
    speculative decoding (proposals checked by the model in one pass each; the tokens are those plain decoding
    samples, see engine/verify_graph.py), up to `num_speculative_tokens` proposals per pass.

    Every value is checked here, at the call: a bad one raises ValueError naming the parameter.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple = ()
    seed: Optional[int] = None
    speculate: Optional[str] = None   # None, "lookup" (prompt lookup) or "draft" (the model's draft model)
    num_speculative_tokens: int = 8   # most tokens proposed per verify pass (speculate set)

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
        if self.speculate is not None and self.speculate not in SPECULATE_MODES:
            bad("speculate", self.speculate, f"expected None or one of {', '.join(map(repr, SPECULATE_MODES))}")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            bad("num_speculative_tokens", k, f"expected an integer in [1, {MAX_SPECULATIVE_TOKENS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def seed_as_int64(seed: int) -> int:
    """A seed in [0, 2**64) as the int64 with the same bits."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# a Python number, or fp32 values broadcasting against the logits ([B, 1]: per row)
Scalar = Union[float, "torch.Tensor"]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Scalar) -> torch.Tensor:
    """CTRL/HF rule: logits of seen tokens are divided by `penalty` if positive, multiplied if negative.
    logits fp32 [B, V]; seen bool [B, V]."""
    penalized = (logits / penalty).where(logits > 0, logits * penalty)  # (Tensor.where: torch.where(c, self, y))
    return penalized.where(seen, logits)
