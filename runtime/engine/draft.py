"""The draft model of speculative decoding (speculate="draft"): a smaller model sharing the target's tokenizer
decodes a request's next ids itself, with a static KV cache of its own whose rows are the engine's slots.

Each slot remembers the ids whose K/V its draft cache row holds; a proposal feeds what the request's context
adds past their common prefix (the ids accepted since the last pass, or the prompt at first) in one chunk, then
decodes n - 1 more ids one at a time. Rejected ids are simply overwritten by the next proposal. Greedy requests
take the draft's argmax; sampling ones draw from the draft's own distribution q (their temperature, top-k and
top-p) with a noise stream of their own (`DRAFT_STREAM`), and hand q to the verify pass, whose speculative
sampling rule keeps the output distribution the target's.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

import torch

from ..kernels.cpu_native import argmax_rows
from ..model.kv_cache import KVCache
from ..model.transformer import Prefill, Transformer
from .draft_graph import DraftRun
from .row_sampling import RowSampling, Stages, counter_noise, processed_probs
from .sampling import SamplingParams
from .slots import common_prefix
from .verify_graph import DRAFT_STREAM


class DraftModel:
    """The draft Transformer, its KV cache (`max_batch` rows, grown with the engine's: `ensure`) and what each
    row holds. `vocab_limit`: the ids the target may emit (the draft never proposes others)."""

    def __init__(self, module: Transformer, *, max_batch: int, vocab_limit: int):
        self.module, self.max_batch = module, max_batch
        self.vocab_limit = min(vocab_limit, module.args.vocab_size)
        self.native = module.ops.decoder(module)  # the CPU's whole-step decoder, or None
        self.cache: Optional[KVCache] = None
        self.held: list[list[int]] = [[] for _ in range(max_batch)]  # ids whose K/V each row holds
        self._agreed = [0] * max_batch  # of those, how many are known to begin the row's request's context
        # a one-id draft step's time (moving average), once measured: a proposal of n ids takes n - 1 of them
        # after the forward that catches up with what was accepted
        self.seconds_per_id: Optional[float] = None
        self.caught_up = 0  # ids the last proposal's first forward fed (a prompt at first, then one or two)
        # greedy one-id steps as `DraftRun`s (one CUDA graph a run), per (row, steps): the experiment
        # "draft_graphs" on a CUDA model; `use_runs` may be set to run them eagerly (tests)
        options = getattr(module.ops, "options", None)
        self.graphed = module.device.type == "cuda" and options is not None and options.has("draft_graphs")
        self.use_runs = self.graphed
        self._runs: dict = {}
        self._pool = None

    def ensure(self, size: int) -> None:
        """A cache of `size` positions per row (the engine's), its contents carried over when it grows."""
        old = self.cache
        if old is not None and old.max_seq_len >= size:
            return
        cache = KVCache(self.module.args, self.max_batch, size, self.module.dtype, self.module.device)
        if old is not None:
            cache.data[..., :old.max_seq_len, :].copy_(old.data)
        self.cache = cache
        self._runs.clear()  # their graphs hold the old cache's addresses

    @torch.inference_mode()
    def forward(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Feed `ids` at positions start .. of row `slot`: fp32 logits [len(ids), V] (their K/V now cached)."""
        device, n = self.module.device, len(ids)
        tokens = torch.tensor(ids, dtype=torch.long, device=device)
        if self.native is not None:
            positions = torch.arange(start, start + n, device=device)
            slots = torch.full((n,), slot, dtype=torch.long, device=device)
            return self.native(tokens, positions, self.cache.data, slots)
        return self.module(tokens[None], Prefill(start, slot=slot), self.cache)[0]

    def reset(self, slot: int) -> None:
        """Row `slot` starts a new request: its ids are fed from scratch (the same chunks of draft work for the
        same request, hence the same draws; a row's earlier contents would change how the prompt is split)."""
        self.held[slot], self._agreed[slot] = [], 0

    def _run(self, slot: int, steps: int) -> DraftRun:
        key = (slot, steps)
        if key not in self._runs:
            if self.graphed and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._runs[key] = DraftRun(self.module, self.cache, slot, steps, self.vocab_limit, graphed=self.graphed,
                                       pool=self._pool)
        return self._runs[key]

    def propose(self, slot: int, context: list[int], n: int, pick, greedy: bool = False) -> list[int]:
        """n ids continuing `context` (its last id pending: not fed to the target yet), each chosen by
        `pick(i, logits [V])` (greedy: the argmax below `vocab_limit`, and with `use_runs` the ids after the
        first come from a `DraftRun`). `context` only grows between calls for a request (from `reset`): only what
        it gained since the last call is compared with the row's ids, not the whole context."""
        held, agreed = self.held[slot], self._agreed[slot]
        start = min(agreed + common_prefix(held[agreed:], context[agreed:]), len(context) - 1)  # at least one id
        del held[start:]
        held.extend(context[start:])
        self._agreed[slot] = len(context)
        logits = self.forward(slot, held[start:], start)[-1]  # what was accepted (or decoded plainly) since
        self.caught_up = len(context) - start
        if greedy and self.use_runs and n > 1:
            first, run = pick(0, logits), self._run(slot, n - 1)
            captures = run.graphed and run.graph is None  # (that call's time is the capture's, not steps')
            started = time.perf_counter()
            rest = run.run(first, len(context))
            if not captures:
                self._observe((time.perf_counter() - started) / (n - 1))
            held.extend([first] + rest[:-1])  # (the run fed each id but its last pick)
            return [first] + rest
        out = []
        for i in range(n):
            out.append(pick(i, logits))
            if i + 1 < n:
                started = time.perf_counter()
                logits = self.forward(slot, out[-1:], len(context) + i)[-1]
                held.append(out[-1])
                self._observe(time.perf_counter() - started)
        return out

    def _observe(self, seconds: float) -> None:
        old = self.seconds_per_id
        self.seconds_per_id = seconds if old is None else 0.8 * old + 0.2 * seconds


class DraftProposer:
    """A request's proposer on the draft model; `probs` holds q [n, V] of the last proposal for a sampling
    request (None for a greedy one)."""

    def __init__(self, draft: DraftModel, request, vocab_size: int):
        self.draft, self.request, self.vocab_size = draft, request, vocab_size
        self.probs: Optional[torch.Tensor] = None
        self.context = list(request.prompt)  # then every sampled id (`extend`), the last one pending
        draft.reset(request.slot)
        params: SamplingParams = request.params
        self.greedy = params.greedy
        if not self.greedy:
            device = draft.module.device
            self._rows = RowSampling(1, vocab_size, device)
            seed = request.seed - (1 << 64) if request.seed >= 1 << 63 else request.seed
            self._rows.set_row(0, SamplingParams(temperature=params.temperature, top_k=params.top_k,
                                                 top_p=params.top_p), seed ^ DRAFT_STREAM, [])
            self._stages = replace(Stages.of([params], [0], vocab_size), penalty=False)  # q: any distribution

    def extend(self, ids) -> None:
        self.context.extend(ids)

    def propose(self, n: int) -> list[int]:
        r, context = self.request, self.context
        limit, V = self.draft.vocab_limit, self.vocab_size
        if self.greedy:
            self.probs = None
            return self.draft.propose(r.slot, context, n, lambda i, logits: int(argmax_rows(logits[None, :limit], 0)),
                                      greedy=True)
        probs = torch.zeros(n, V, dtype=torch.float32, device=self.draft.module.device)
        counter = len(r.sampled)  # the target row's counter at the verify pass: one per sampled id

        def pick(i: int, logits: torch.Tensor) -> int:
            row = torch.full((V,), float("-inf"), device=logits.device)
            row[:limit] = logits[:limit]
            view = self._rows.view(1)
            q = processed_probs(row[None], self._stages, view)[0]
            noise = -torch.log(counter_noise(view.seed, torch.tensor([counter + i], device=logits.device), V))[0]
            probs[i] = q
            return int(argmax_rows((q / noise)[None], 0))

        ids = self.draft.propose(r.slot, context, n, pick)
        self.probs = probs
        return ids
