"""What a running request hands back to its caller: text deltas (with token ids and, when asked for,
log-probabilities) while it runs, then one `Completion`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .speculation import SpeculationStats


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model (raw logits, before penalties, temperature
    and filters, as OpenAI reports them) and the `n` most likely alternatives at that step, best first."""

    token_id: int
    logprob: float
    top: list = field(default_factory=list)  # [(token_id, logprob)]


@dataclass
class Delta:
    """Text that became final, and the generated token ids consumed since the previous delta (text may
    be '' while a token's bytes are incomplete; ids may be [] when text is released at the end).
    `logprobs`: one TokenLogprob per id in `token_ids` when the request asked for logprobs, else None."""

    text: str
    token_ids: list = field(default_factory=list)
    logprobs: Optional[list] = None


@dataclass
class Completion:
    """One finished sequence. token_ids: generated ids only (without the EOS/EOT that ended it).
    cached_tokens: prompt tokens whose K/V were reused from the cache instead of prefilled.
    logprobs: one TokenLogprob per generated id when asked for, else None.
    speculation: with `speculate`, the verify passes, proposed and accepted ids (`mean_accepted`), else None."""

    text: str
    token_ids: list = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "length"  # "length" | "stop" | "eos" | "eot" | "cancelled"
    cached_tokens: int = 0
    logprobs: Optional[list] = None
    speculation: Optional[SpeculationStats] = None


def logprob_of(token: int, logprob: float, ids: list, values: list, n: int) -> TokenLogprob:
    """A token's TokenLogprob from a step's host lists: its logprob, then the first n of the top ids and values."""
    return TokenLogprob(token, logprob, list(zip(ids[:n], values[:n])))
