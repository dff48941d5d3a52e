"""The serving engine: requests join and leave a running decode batch at any step (continuous batching).

Each scheduler iteration drops cancelled requests (their slot is free for the next step), admits waiting
requests into free slots (reusing cached K/V of a shared prompt prefix), prefills up to `prefill_chunk`
prompt tokens, then runs one decode step over every decoding slot (or a speculative verify pass: speculator.py)
and hands each request its tokens. Callers on any thread `submit` requests and receive events through `sink`.

Who runs the iterations: `driver.py`.
"""
from __future__ import annotations

import queue
import secrets
import time
from collections import deque
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from ..errors import ModelBusyError
from ..model.kv_cache import KVCache
from ..model.transformer import Prefill, Transformer
from ..tokenizer.detokenize import TextStream
from ..tokenizer.tokenizer import Tokenizer
from .decode_graph import NONFINITE
from .decode_state import MIN_CACHE, DecodeState
from .driver import Driver
from ..distributed.lockstep import HEARTBEAT_S, Plan
from ..distributed.tensor_parallel import TensorParallelError
from .events import Completion, logprob_of
from .metrics import EngineMetrics
from .request import DECODE, PREFILL, Request, check_request_values
from .run import Run
from .row_sampling import Stages, sample_rows
from .sampling import SamplingParams, seed_as_int64
from .speculator import Speculator
from .slots import SlotTable


class Engine:
    """Owns the model, the tokenizer, the requests and their slots, and the device state (`DecodeState`:
    a KV cache of `max_batch` slots grown on demand, the decode steps, captured into CUDA graphs with
    `cuda_graphs`, default: on for a CUDA model). `max_queue` bounds the requests waiting for a slot
    (None: unbounded); past it `submit` raises ModelBusyError. `seed_source()` seeds requests that
    give none (default: random; tensor parallelism passes one that is the same on every rank).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int, max_seq_len: int,
                 prefill_chunk: int = 512, cuda_graphs: Optional[bool] = None, max_queue: Optional[int] = None,
                 seed_source: Optional[Callable[[], int]] = None):
        self.model, self.tok = model, tokenizer
        self.max_batch, self.max_seq_len, self.prefill_chunk = max_batch, max_seq_len, prefill_chunk
        self.max_queue = max_queue
        self._new_seed = seed_source or (lambda: secrets.randbits(64))  # for requests without a seed
        on_cuda = model.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = on_cuda
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device; the model is on {model.device}")
        self.cuda_graphs = bool(cuda_graphs)
        V = model.args.vocab_size
        self.vocab_limit = min(getattr(tokenizer, "vocab_size", V) or V, V)  # ids generation may emit
        self.metrics = EngineMetrics(max_batch)
        self.driver = Driver(self._iterate_once, self.idle, "codellama-rt-engine")
        self.lockstep = None  # rank 0 of tensor-parallel serving: a distributed.lockstep.Lockstep
        self.speculator = Speculator(self)  # speculative decoding: proposers, the draft model, verify passes
        # owned by the driving thread:
        self._waiting: deque = deque()
        self._running: dict = {}  # slot -> Request (prefilling or decoding)
        self._slots: Optional[SlotTable] = None
        self._state = DecodeState(model, max_batch=max_batch, max_seq_len=max_seq_len, graphed=self.cuda_graphs,
                                  vocab_limit=self.vocab_limit)

    # ---- callers' side (any thread) ---------------------------------------------------------

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

    def submit(self, ids, params: SamplingParams, stop_tokens: dict, *, logprobs: int = 0,
               sink: Callable, background: bool = True) -> Request:
        """Queue one request; `sink(event)` is called (on the driving thread) with Delta events, then the
        Completion, or with the exception that ended the request. Raises ValueError for a bad prompt or
        `logprobs`, ModelBusyError when `max_queue` requests are already waiting.

        background: a loop thread runs the request unless a thread is in `run_forever`; False: the caller
        drives it by waiting for its events in `next_event`."""
        return self.submit_many([ids], params, stop_tokens, logprobs=logprobs, sinks=[sink],
                                background=background)[0]

    def submit_many(self, prompts: list, params, stop_tokens, *, logprobs=0, sinks: list,
                    background: bool = True) -> list[Request]:
        """Queue one request per prompt (`sinks[i]` receives prompt i's events, as in `submit`), all at once:
        they are admitted in the same iteration when slots allow. `params`, `stop_tokens` and `logprobs` are
        one value for every prompt or a list of one each. Everything is checked first, and a queue without
        room for all of them takes none (ModelBusyError)."""
        n = len(prompts)
        params, stop_tokens, logprobs = (v if isinstance(v, list) else [v] * n for v in (params, stop_tokens, logprobs))
        checked = [self.check_prompt(ids) for ids in prompts]
        for p, k in zip(params, logprobs, strict=True):
            check_request_values(p, k, drafted=self.speculator.draft is not None)
        requests = [Request(prompt, p, dict(stops), seed=p.seed if p.seed is not None else self._new_seed(),
                            budget=min(p.max_new_tokens, self.max_seq_len - len(prompt)), logprobs=k, sink=sink,
                            stream=TextStream(self.tok, p.stop))
                    for prompt, p, stops, k, sink in zip(checked, params, stop_tokens, logprobs, sinks, strict=True)]

        def check(queued: int) -> None:  # (slots the next iteration fills are no queue)
            free = self.max_batch - len(self._running)
            if self.max_queue is not None and queued + len(self._waiting) + n - free > self.max_queue:
                self.metrics.add("rejected", n)
                raise ModelBusyError(f"the request queue is full (at most {self.max_queue} requests wait for a "
                                     f"slot of {self.max_batch}); retry later")

        self.driver.enqueue(requests, background=background, check=check)
        self.metrics.add("requests", len(requests))
        return requests

    def cancel(self, request: Request) -> None:
        """Stop `request` (a no-op once finished): its slot is free before the next decode step."""
        request.cancelled = True

    def cancel_all(self, timeout: float = 10.0) -> bool:
        """Cancel every request and wait up to `timeout` s for the loop thread to let go (a server's shutdown: no
        thread mid-step at exit); True once none runs."""
        for request in (*self.driver.pending(), *tuple(self._waiting), *tuple(self._running.values())):
            self.cancel(request)
        return self.driver.wait_idle(timeout)

    def run(self, prompts: list, params: SamplingParams, stop_tokens: dict) -> Run:
        """A Run of `prompts` (id lists, checked now; submitted when its first piece is asked for)."""
        return Run(self, [self.check_prompt(p) for p in prompts], params, stop_tokens)

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [B, T] -> fp32 [B, T, V]: one forward pass without the KV cache."""
        return self.model(tokens.to(self.model.device), Prefill(0), None)

    def graph_pool_bytes(self) -> int:
        """Device memory held by the captured decode graphs; 0 without."""
        return self._state.graph_pool_bytes()

    @property
    def cache(self) -> Optional[KVCache]:
        return self._state.cache

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far."""
        return self._state.captures

    def steps(self) -> list:
        """The (batch, stages) keys of the decode steps kept now."""
        return list(self._state.steps)

    def decode_steps(self) -> dict:
        """(batch, stages) -> the DecodeStep kept for it (a copy of the mapping, least recently used first)."""
        return dict(self._state.steps)

    def next_event(self, events: queue.SimpleQueue):
        """The next event on `events` (the queue this engine's sinks put to), driving the engine on the
        calling thread while no other thread does (`Driver.next_event`)."""
        return self.driver.next_event(events)

    def idle(self) -> bool:
        """No request is running or waiting for a slot (submissions not yet taken aside)."""
        return not self._waiting and not self._running

    # ---- the driving thread ----------------------------------------------------------------

    def _iterate_once(self, new: list) -> bool:
        """One iteration with the requests submitted since the last (the driver's); False: nothing to do.
        Under tensor-parallel serving (`lockstep`, rank 0) the other ranks are sent what this one takes."""
        self._waiting.extend(new)
        if self.idle():
            self.metrics.set_gauges(waiting=0, running=0)
            return False
        cancelled = {r.id for r in (*self._waiting, *self._running.values()) if r.cancelled}
        if self.lockstep is not None:
            self.lockstep.send(Plan("step", [r.spec() for r in new], sorted(cancelled)))
        self._run_iteration(cancelled)
        self.metrics.set_gauges(waiting=len(self._waiting) + self.driver.queued(), running=len(self._running))
        return True

    def follow(self, lockstep) -> None:
        """Replay rank 0's iterations (tensor-parallel serving, on the other ranks) until it says stop."""
        while True:
            plan = lockstep.receive()
            if plan.kind == "stop":
                return
            if plan.kind == "step":
                self._waiting.extend(Request.replay(spec, self.tok) for spec in plan.new)
                self._run_iteration(set(plan.cancelled))

    def run_forever(self, stop) -> None:
        """Drive on this thread until `stop` (a threading.Event) is set (`Driver.run_forever`); under
        tensor-parallel serving, heartbeats while idle and "stop" at the end go to the other ranks."""
        if self.lockstep is None:
            return self.driver.run_forever(stop)
        try:
            self.driver.run_forever(stop, idle=lambda: self.lockstep.send(Plan("idle")), idle_s=HEARTBEAT_S)
        finally:
            with self.driver.driving():
                self.lockstep.send(Plan("stop"))

    def _run_iteration(self, cancelled: set) -> None:
        on_device = torch.cuda.device(self.model.device) if self.model.device.type == "cuda" else nullcontext()
        with torch.inference_mode(), on_device:
            try:
                self._iterate(cancelled)
            except BaseException as e:  # noqa: BLE001 - a failed step ends its requests, never the engine
                for request in list(self._running.values()):  # (their state is mid-step: none can go on)
                    self._fail(request, e)
                if not isinstance(e, Exception) or isinstance(e, TensorParallelError):
                    raise  # KeyboardInterrupt on a driving caller's thread; a rank gone: nothing can go on

    def _iterate(self, cancelled: set) -> None:
        self._drop_cancelled(cancelled)
        self._admit()
        self._prefill()
        if any(r.state == DECODE for r in self._running.values()):
            self._decode()

    def _drop_cancelled(self, ids: set) -> None:
        """Drop the requests whose ids are in `ids` (those cancelled when the iteration began)."""
        if not ids:
            return
        for request in [r for r in self._waiting if r.id in ids]:
            self._waiting.remove(request)
            self._end(request, "cancelled")
        for request in [r for r in self._running.values() if r.id in ids]:
            self._end(request, "cancelled")

    def _admit(self) -> None:
        while self._waiting:
            request = self._waiting[0]
            if request.budget <= 0:  # nothing to generate (max_new_tokens 0, or the prompt fills the context)
                self._waiting.popleft()
                self._end(request, None)
                continue
            try:
                self._ensure_cache(len(request.prompt) + request.budget)
            except MemoryError as e:
                self._waiting.popleft()
                self._fail(request, e)
                continue
            place = self._slots.choose(request.prompt)
            if place is None:
                return
            self._waiting.popleft()
            slot, reuse, data = place.slot, place.reuse, self._state.cache.data  # [layers, k/v, slots, heads, S, D]
            if place.save_to is not None:
                n = len(self._slots.tokens[slot])
                data[:, :, place.save_to, :, :n].copy_(data[:, :, slot, :, :n])
            if place.source is not None:
                data[:, :, slot, :, :reuse].copy_(data[:, :, place.source, :, :reuse])
            self._slots.take(place, request, request.prompt)
            request.slot, request.computed, request.cached_tokens, request.state = slot, reuse, reuse, PREFILL
            request.speculation = self.speculator.speculation(request)
            self._running[slot] = request
            self.metrics.add("prompt_tokens", len(request.prompt))
            self.metrics.add("prefix_reused_tokens", reuse)

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens, oldest request first (a long prompt takes several
        iterations, each followed by a decode step of the running requests)."""
        budget = self.prefill_chunk
        for request in sorted((r for r in self._running.values() if r.state == PREFILL), key=lambda r: r.id):
            if budget <= 0:
                return
            start = request.computed
            chunk = request.prompt[start:start + budget]
            n = len(chunk)
            logits = self._state.prefill(chunk, start, request.slot)
            request.computed += n
            budget -= n
            self.metrics.add("prefilled_tokens", n)
            self._slots.record(request.slot, request.prompt[:request.computed])
            if request.computed == len(request.prompt):
                self._start_decoding(request, logits)

    def _start_decoding(self, request: Request, logits: torch.Tensor) -> None:
        """Sample the first token from the prompt's last logits [1, V]; the row decodes from the next step."""
        s, buf = request.slot, self._state.buffers
        buf.sampling.set_row(s, request.params, seed_as_int64(request.seed), request.prompt)
        stages = Stages.of([request.params], [request.logprobs], self.model.args.vocab_size)
        out = sample_rows(logits, stages, buf.sampling.rows(s, s + 1), self.vocab_limit)
        token = int(out.tokens[0])
        buf.start_row(s, token, min(len(request.prompt), self._state.cache.max_seq_len - 1))
        request.state = DECODE
        lp = logprob_of(token, float(out.logprob[0]), out.top_ids[0].tolist(), out.top_logprobs[0].tolist(),
                        request.logprobs) if request.logprobs else None
        self._emit(request, [token], [lp])

    def _decode(self) -> None:
        decoding = [s for s, r in self._running.items() if r.state == DECODE]
        if self.speculator.step(decoding):
            return
        batch = self._state.batch_size(max(decoding) + 1)
        rows = [self._running[s] for s in decoding if s < batch]
        stages = Stages.of([r.params for r in rows], [r.logprobs for r in rows], self.model.args.vocab_size)
        step = self._state.step(batch, stages)
        started, built = time.perf_counter(), self._state.built
        step()
        self.metrics.add("decode_steps")
        buf = self._state.buffers
        tokens = buf.sampled[:batch].tolist()  # the one host sync per step
        if stages.logprobs:
            lps, ids = buf.logprob[:batch].tolist(), buf.top_ids[:batch].tolist()
            tops = buf.top_logprobs[:batch].tolist()
        for s in decoding:
            request = self._running[s]
            lp = logprob_of(tokens[s], lps[s], ids[s], tops[s], request.logprobs) if request.logprobs else None
            self._emit(request, [tokens[s]], [lp])
        if not built:  # (the step, its sync and handing out its tokens: what a verify pass is measured by too)
            self.speculator.costs.observe(batch, 0, time.perf_counter() - started)

    def _emit(self, request: Request, tokens: list, lps: list) -> None:
        """Hand `request` the ids a step or verify pass sampled for it (lps: TokenLogprob or None each; a first token
        comes alone) as one Delta; ids after one that ends the request are dropped, a NONFINITE id fails it."""
        now = time.perf_counter()
        if request.last_token_at is None:
            self.metrics.observe_ttft(now - request.submitted)
        else:
            self.metrics.observe_token_latency(now - request.last_token_at, len(tokens))
        request.last_token_at = now
        finite = tokens.index(NONFINITE) if NONFINITE in tokens else len(tokens)
        try:
            done, taken = request.accept_block(tokens[:finite], lps[:finite])
            self.metrics.add("generated_tokens", taken)
            if not done and finite < len(tokens):
                raise FloatingPointError(
                    f"the model's logits are not finite (NaN or inf) at generated token {len(request.sampled) + 1}: "
                    f"the weights or the arithmetic overflow (dtype {self.model.dtype}; float16 overflows where "
                    "bfloat16 and float32 do not)")
        except Exception as e:  # noqa: BLE001 - e.g. a tokenizer failure: this request's, not the batch's
            self._fail(request, e)
            return
        if done:
            self._end(request, None)

    # ---- slots, cache and steps ---------------------------------------------------------------

    def _end(self, request: Request, reason: Optional[str]) -> None:
        """Finish `request` (reason: override its finish_reason, e.g. "cancelled") and free its slot."""
        if reason is not None:
            request.finish_reason = reason
        self._release(request, keep=True)
        try:
            request.complete()
        except Exception as e:  # noqa: BLE001 - e.g. the tokenizer failing on the last piece
            request.tell(e)
        self.metrics.finish(request.finish_reason)
        if reason == "cancelled":
            self.metrics.add("cancelled")

    def _fail(self, request: Request, error: BaseException) -> None:
        self._release(request, keep=False)
        self.metrics.add("failed")
        request.state = "done"
        request.tell(error)

    def _release(self, request: Request, keep: bool) -> None:
        s = request.slot
        if s is None or self._running.get(s) is not request:
            return
        del self._running[s]
        self._slots.owner[s] = None
        if keep:
            self._slots.record(s, request.fed())
        else:  # (failed: what it left in the row may be non-finite)
            self._slots.forget(s)
            self._state.cache.clear_row(s)
        self._state.buffers.idle_row(s, self._state.cache.max_seq_len - 1)

    def _ensure_cache(self, need: int) -> None:
        decoding = {s for s, r in self._running.items() if r.state == DECODE}
        if self._state.ensure(need, decoding):
            if self._slots is None:
                self._slots = SlotTable(self.max_batch, 0)
            self._slots.limit = self._state.cache.max_seq_len - 1
            self.speculator.ensure(self._state.cache.max_seq_len)


__all__ = ["Engine", "Completion", "MIN_CACHE"]
