"""One request's state inside the engine, from submission to its Completion."""
from __future__ import annotations

import itertools
import time
from typing import Callable, Optional

from .events import Completion, Delta
from .row_sampling import LOGPROB_WIDTH
from .sampling import SamplingParams
from .speculation import Speculation
from ..tokenizer.detokenize import TextStream

_ids = itertools.count()

WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


def check_request_values(params: SamplingParams, logprobs: int, *, drafted: bool) -> None:
    """A request's sampling values and logprobs width, checked before it is queued (`drafted`: the engine has
    a draft model); TypeError / ValueError naming the bad one."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, not {type(params).__name__}")
    if params.speculate == "draft" and not drafted:
        raise ValueError("speculate='draft' needs a draft model: cl.load(..., draft=PATH), or serve --draft PATH")
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= LOGPROB_WIDTH:
        raise ValueError(f"logprobs={logprobs!r} is invalid: expected an integer in [0, {LOGPROB_WIDTH}]")


class Request:
    """A prompt being served: its sampling values, where it runs, what it produced so far.

    Owned by the engine's loop thread once submitted; other threads only set `cancelled`.
    `sink` receives Delta events, then the Completion, or an exception that ended the request.
    """

    def __init__(self, prompt: list, params: SamplingParams, stop_tokens: dict, *, seed: int, budget: int,
                 logprobs: int, sink: Callable, stream: TextStream, id: Optional[int] = None):
        self.id = next(_ids) if id is None else id
        self.prompt, self.params, self.stop_tokens = prompt, params, stop_tokens
        self.seed, self.budget, self.logprobs, self.sink = seed, budget, logprobs, sink
        self.stream = stream
        self.state = WAITING
        self.cancelled = False
        self.slot: Optional[int] = None
        self.computed = 0            # prompt tokens whose K/V are in the slot (reused or prefilled)
        self.cached_tokens = 0       # of those, reused from the cache
        self.sampled: list[int] = []  # every sampled id, stop tokens included (all but the last are fed back)
        self.finish_reason = "length"
        self.submitted = time.perf_counter()
        self.last_token_at: Optional[float] = None
        self._pending_ids: list[int] = []
        self._pending_lp: list = []
        self.all_logprobs: Optional[list] = [] if logprobs else None
        self.speculation: Optional[Speculation] = None  # set by the engine when it speculates for this request

    def tell(self, error: BaseException) -> None:
        """Hand `error` (what ended the request) to its sink; a sink that fails is its caller's problem, never
        the engine's."""
        try:
            self.sink(error)
        except Exception:  # noqa: BLE001
            pass

    def spec(self) -> dict:
        """What another rank needs to run this request as it runs here (tensor-parallel serving)."""
        return dict(id=self.id, prompt=self.prompt, params=self.params, stop_tokens=self.stop_tokens, seed=self.seed,
                    budget=self.budget, logprobs=self.logprobs)

    @classmethod
    def replay(cls, spec: dict, tokenizer) -> "Request":
        """The request of `spec` on another rank: the same tokens and stops, its events dropped."""
        return cls(**spec, sink=lambda event: None, stream=TextStream(tokenizer, spec["params"].stop))

    def position(self) -> int:
        """Where the pending token (the last sampled id, its K/V not cached yet) goes in the cache."""
        return len(self.prompt) + len(self.sampled) - 1

    def fed(self) -> list:
        """The ids whose K/V the slot holds: the prompt and every sampled id but the last."""
        return self.prompt + self.sampled[:-1] if self.sampled else self.prompt[:self.computed]

    def accept_block(self, tokens: list, lps: list) -> tuple[bool, int]:
        """Take the sampled ids of one step or verify pass (none NONFINITE; lps: a TokenLogprob or None each) in
        order, until the request is done; send the text that became final as one Delta. Returns (done, how many
        ids it took)."""
        pieces, done, taken = [], False, 0
        for token, lp in zip(tokens, lps):
            taken += 1
            self.sampled.append(token)
            if token in self.stop_tokens:
                self.finish_reason, done = self.stop_tokens[token], True
                break
            if lp is not None:
                self._pending_lp.append(lp)
                self.all_logprobs.append(lp)
            self._pending_ids.append(token)
            piece = self.stream.push(token)
            if piece:
                pieces.append(piece)
            if self.stream.stopped:
                self.finish_reason, done = "stop", True
                break
            if len(self.stream.ids) >= self.budget:
                done = True
                break
        if self.speculation is not None:
            self.speculation.extend(tokens[:taken])
        if pieces:
            self._send("".join(pieces))
        return done, taken

    def _send(self, text: str) -> None:
        self.sink(Delta(text, self._pending_ids, self._pending_lp if self.logprobs else None))
        self._pending_ids, self._pending_lp = [], []

    def complete(self) -> Completion:
        """Release the rest of the text and send the Completion."""
        piece = self.stream.finish()
        if piece or self._pending_ids:
            self._send(piece)
        if self.stream.stopped:
            self.finish_reason = "stop"
        self.state = DONE
        done = Completion(text=self.stream.text, token_ids=list(self.stream.ids), prompt_tokens=len(self.prompt),
                          finish_reason=self.finish_reason, cached_tokens=self.cached_tokens,
                          logprobs=self.all_logprobs,
                          speculation=self.speculation.stats if self.speculation is not None else None)
        self.sink(done)
        return done
