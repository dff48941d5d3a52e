"""Speculative decoding inside the engine's iterations (`Speculator`): each request's proposer, the draft
model, which requests propose how many ids this step, and the verify pass that runs in place of the decode
step, handing each request its tokens (the pass itself: verify_graph.py; the policy: speculation.py)."""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..model.transformer import Transformer
from .draft import DraftModel, DraftProposer
from .events import logprob_of
from .request import Request
from .row_sampling import Stages
from .sampling import MAX_SPECULATIVE_TOKENS
from .speculation import PassCosts, PromptLookup, Speculation, bucket, static_cost


class Speculator:
    """One engine's speculative decoding. `proposers`: speculate mode -> (request) -> its Proposer, made at
    admission (benchmarks put an oracle here). `costs`: the measured decode and verify times the proposal
    lengths follow. `timing_free`: no clock decides what is proposed (tensor parallelism: every rank must run
    the same passes)."""

    def __init__(self, engine):
        self.engine = engine
        V = engine.model.args.vocab_size
        self.draft: Optional[DraftModel] = None  # speculate="draft"'s model (`attach_draft`), or None
        self.proposers: dict = {"lookup": lambda request: PromptLookup(request.prompt),
                                "draft": lambda request: DraftProposer(self.draft, request, V)}
        self.costs = PassCosts()
        self.timing_free = False

    def attach_draft(self, module: Transformer, tokenizer, path=None) -> None:
        """Use `module` (a smaller model on the same device whose `tokenizer` is the engine's, every piece) for
        speculate="draft"; `path` names it in errors."""
        e = self.engine
        ours = e.tok
        if tokenizer.vocab_size != ours.vocab_size or any(
                tokenizer.sp.id_to_piece(i) != ours.sp.id_to_piece(i) for i in range(ours.vocab_size)):
            raise ValueError(f"the draft model's tokenizer ({path}) differs from the model's: a draft must share the "
                             "tokenizer")
        if module.device != e.model.device:
            raise ValueError(f"the draft model is on {module.device}, the model on {e.model.device}: load both "
                             "on one device")
        if module.rope_cos.shape[0] < e.max_seq_len:
            raise ValueError(f"the draft model was loaded for {module.rope_cos.shape[0]} positions, fewer than the "
                             f"model's max_seq_len={e.max_seq_len}")
        self.draft = DraftModel(module, max_batch=e.max_batch, vocab_limit=e.vocab_limit)
        if e.cache is not None:
            self.draft.ensure(e.cache.max_seq_len)

    def ensure(self, size: int) -> None:
        """The engine's cache now holds `size` positions per slot: the draft's grows alike."""
        if self.draft is not None:
            self.draft.ensure(size)

    def speculation(self, request: Request) -> Optional[Speculation]:
        """A newly admitted request's speculative state (its slot known), or None when it does not speculate."""
        if request.params.speculate is None:
            return None
        return Speculation(self.proposers[request.params.speculate](request), request.params.num_speculative_tokens,
                           whole=request.params.speculate == "draft")

    def step(self, decoding: list) -> bool:
        """A verify pass in place of the decode step over the `decoding` slots when a speculating request has
        proposals (`verify_graph`; rows without any get one token, as from the decode step); False: nothing to
        verify, the plain step runs."""
        e = self.engine
        requests = [e._running[s] for s in decoding]
        speculating = [r for r in requests if r.speculation is not None]
        if not speculating:
            return False
        last = e._state.cache.max_seq_len - 1
        batch = e._state.batch_size(max(decoding) + 1)
        costs = self.costs
        measured = costs.measured(batch)  # else a plain step first: the yardstick of every measured cost
        # Rows that do not speculate get one token from a pass, as from a decode step, but wait for it as long:
        # a speculating row's proposals must also pay for their wait (the pass's extra cost, times the rows per
        # speculating row), so mixed batches speculate where passes are cheap (a GPU) and rarely on a CPU.
        share = len(requests) / len(speculating)

        def cost(m: int) -> float:
            return 1.0 + share * (costs.relative(batch, bucket(m, MAX_SPECULATIVE_TOKENS)) - 1.0)

        def drafted_cost(m: int) -> float:
            return cost(m) + share * costs.drafting(batch, m)

        def static(m: int) -> float:
            return 1.0 + share * (static_cost(m) - 1.0)

        # A pass with a drafted row that samples verifies by speculative sampling, every row's proposals alike: a
        # lookup row that samples would then get tokens of the right distribution but not plain sampling's own,
        # so it proposes nothing in such a pass (one token, as from a decode step).
        drafted = any(not r.params.greedy for r in requests) and any(r.params.speculate == "draft" for r in requests)
        cap = e.max_seq_len - 1  # (the context, not the cache as grown so far: lengths must not depend on it)
        proposals = {}
        for r in speculating:
            if drafted and r.params.speculate == "lookup" and not r.params.greedy:
                continue
            # Drafted sampling rows' tokens depend on what was proposed: their lengths must not depend on timing
            # (the same seed gives the same tokens), so they follow a fixed cost model, as every row does under
            # tensor parallelism (`timing_free`: the ranks decide alone and must agree); other rows' tokens are
            # plain decoding's whatever is proposed, and their lengths follow what this engine measured.
            fixed = self.timing_free or (r.params.speculate == "draft" and not r.params.greedy)
            if not (fixed or measured) or not r.speculation.wants():
                continue
            if self.timing_free:
                pricing = static
            elif fixed:  # its own fixed model, not scaled by what else is in the batch
                pricing = static_cost
            else:
                pricing = drafted_cost if r.params.speculate == "draft" else cost
            # room: the budget left after the pass's own token, and the context past the pass's last position
            n = r.speculation.limit(min(r.budget - len(r.stream.ids) - 1, cap - r.position()), pricing)
            if n <= 0:
                continue
            started = time.perf_counter()
            ids = r.speculation.propose(n)
            per_id = self.draft.seconds_per_id if r.params.speculate == "draft" else None
            # (a pass's own catching up is an id or two; a prompt's, or plain steps', is not the cost of passes)
            if per_id is not None and ids and self.draft.caught_up <= 2:
                costs.observe_draft(batch, per_id, time.perf_counter() - started - (len(ids) - 1) * per_id)
            if ids:
                proposals[r.slot] = ids
        if not proposals:
            return False
        width = bucket(max(len(p) for p in proposals.values()), MAX_SPECULATIVE_TOKENS)
        need = max(r.position() for r in requests) + width + 1  # every decoding row writes `width` positions on
        if need > e.max_seq_len:
            return False
        if need > last + 1:  # (grown now rather than the pass skipped: the cache's size decides no token)
            e._ensure_cache(need)
        vbuf = e._state.verify_buffers
        for s in range(batch):
            vbuf.set_row(s, proposals.get(s, []))
        rows = [e._running[s] for s in decoding if s < batch]
        stages = Stages.of([r.params for r in rows], [r.logprobs for r in rows], e.model.args.vocab_size)
        if drafted:  # speculative sampling: each row's q (a proposal of its own is certain: one-hot)
            q = vbuf.with_draft_probs()
            for s, ids in proposals.items():
                probs = getattr(e._running[s].speculation.proposer, "probs", None)
                if probs is not None:
                    q[s, :len(ids)].copy_(probs[:len(ids)])
                else:
                    q[s, :len(ids)].zero_()
                    q[s, torch.arange(len(ids)), torch.tensor(ids)] = 1.0
        step = e._state.verify_step(batch, width, stages, drafted)
        started, built = time.perf_counter(), e._state.built
        step()
        e.metrics.add("verify_steps")
        out = vbuf.out[:batch, :width + 2].tolist()  # the one host sync per pass
        if stages.logprobs:
            lps, ids = vbuf.logprob[:batch].tolist(), vbuf.top_ids[:batch].tolist()
            tops = vbuf.top_logprobs[:batch].tolist()
        for s in decoding:
            request, accepted = e._running[s], out[s][0]
            if s in proposals:  # (only speculating rows propose)
                request.speculation.record(len(proposals[s]), accepted)
                e.metrics.add("speculative_proposed_tokens", len(proposals[s]))
                e.metrics.add("speculative_accepted_tokens", accepted)
            tokens = out[s][1:accepted + 2]
            block_lps = [logprob_of(token, lps[s][i], ids[s][i], tops[s][i], request.logprobs)
                         for i, token in enumerate(tokens)] if request.logprobs else [None] * len(tokens)
            e._emit(request, tokens, block_lps)
        if not built:  # the pass, its sync and handing out its tokens
            costs.observe(batch, width, time.perf_counter() - started)
        return True
