"""The verify pass of speculative decoding as one fixed-shape unit over static buffers (`VerifyStep`), run
eagerly or captured into a CUDA graph like the decode step.

Each row b of the batch scores its pending token and `width` proposed ids at positions p_b .. p_b + width in
one forward pass (K/V written into its cache row there; what is rejected is overwritten later), samples the
model's token at every position exactly as plain decoding would (same sampling values, the row's noise at
counters c_b .. c_b + width, the repetition penalty's seen ids growing along the block), and accepts the
longest run of proposals equal to those tokens: the n accepted ids plus the model's token after them are what
plain decoding would have produced, token for token, for any sampling values. A row with no proposals
(proposed 0) gets one plain decode step's token.

Draft-model proposals drawn from the draft's distribution q (sampled rows, `draft_probs`) use speculative
sampling instead: proposal i is accepted with probability min(1, p_i / q_i), the first rejected one replaced by
a draw from max(0, p - q) normalised, which leaves the output distribution p unchanged (the tokens are then no
longer plain decoding's for the same seed).

On the device after a pass: the row's next input token, position (+ n + 1), sampling counter (+ n + 1) and seen
ids are updated; `VerifyBuffers.out` holds n and the tokens, read by the host in one sync.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model.kv_cache import KVCache
from ..model.transformer import Transformer, Verify
from .decode_graph import DecodeBuffers, DecodeStep
from .row_sampling import LOGPROB_WIDTH, NONFINITE, RowView, Stages, counter_noise, processed_probs, sample_rows
from .sampling import MAX_SPECULATIVE_TOKENS

ACCEPT_STREAM = 0x2545F4914F6CDD1D  # xor-ed into a row's seed: the acceptance tests' uniforms
DRAFT_STREAM = 0x1E3779B97F4A7C15   # xor-ed into a row's seed: the draft model's own draws

__all__ = ["VerifyBuffers", "VerifyStep", "ACCEPT_STREAM", "DRAFT_STREAM"]


class VerifyBuffers:
    """Static per-row state of the verify passes, `rows` rows, K = MAX_SPECULATIVE_TOKENS columns:

      proposals    int64 [R, K]      in: proposed ids (the first `proposed[b]` of row b count)
      proposed     int64 [R]         in: how many
      draft_probs  fp32 [R, K, V]    in: the draft's distribution at each proposal (speculative sampling);
                                     allocated by `with_draft_probs()`
      out          int64 [R, K + 2]  out: column 0 the accepted count n, columns 1 .. n + 1 the emitted tokens
                                     (the n accepted ids, then the model's; NONFINITE where logits were not finite)
      logprob fp32 [R, K + 1], top_ids int64 [R, K + 1, W], top_logprobs fp32 [R, K + 1, W]: per emitted token
    """

    def __init__(self, rows: int, vocab_size: int, device):
        K, W = MAX_SPECULATIVE_TOKENS, LOGPROB_WIDTH
        self.rows, self.vocab_size, self.device = rows, vocab_size, device
        self.proposals = torch.zeros(rows, K, dtype=torch.long, device=device)
        self.proposed = torch.zeros(rows, dtype=torch.long, device=device)
        self.draft_probs: Optional[torch.Tensor] = None
        self.out = torch.zeros(rows, K + 2, dtype=torch.long, device=device)
        self.logprob = torch.zeros(rows, K + 1, dtype=torch.float32, device=device)
        self.top_ids = torch.zeros(rows, K + 1, W, dtype=torch.long, device=device)
        self.top_logprobs = torch.zeros(rows, K + 1, W, dtype=torch.float32, device=device)
        # on a CPU, `set_row` writes through numpy views (a tensor's item assignment costs ~10 us a call)
        self._host = (self.proposals.numpy(), self.proposed.numpy()) if self.proposals.device.type == "cpu" else None

    def with_draft_probs(self) -> torch.Tensor:
        if self.draft_probs is None:
            self.draft_probs = torch.zeros(self.rows, MAX_SPECULATIVE_TOKENS, self.vocab_size,
                                           dtype=torch.float32, device=self.device)
        return self.draft_probs

    def tensors(self) -> dict:
        named = {"proposals": self.proposals, "proposed": self.proposed, "out": self.out, "logprob": self.logprob,
                 "top_ids": self.top_ids, "top_logprobs": self.top_logprobs}
        if self.draft_probs is not None:
            named["draft_probs"] = self.draft_probs
        return named

    def set_row(self, b: int, proposals: list[int]) -> None:
        """Row b proposes `proposals` in the next pass (host values: one small copy)."""
        n = len(proposals)
        if self._host is not None:
            self._host[1][b] = n
            self._host[0][b, :n] = proposals
            return
        self.proposed[b] = n
        if n:
            self.proposals[b, :n] = torch.tensor(proposals, dtype=torch.long)


class VerifyStep(DecodeStep):
    """One verify pass over the first `batch` rows of `buffers` / `vbuf`, `width` proposals wide, under `stages`.

    `speculative_sampling`: rows that sample take draft proposals with the min(1, p / q) rule (`vbuf.draft_probs`
    filled); otherwise proposals are accepted while they equal the model's own tokens. Graph capture as
    `DecodeStep` (`graphed=True`), whose checks, native step and replay it shares. The caller reads `vbuf.out[:batch]`
    after a call: the one host sync.
    """

    KIND = "verify"

    def __init__(self, model: Transformer, cache: KVCache, buffers: DecodeBuffers, vbuf: VerifyBuffers, batch: int,
                 width: int, stages: Stages, *, speculative_sampling: bool = False, graphed: bool = False, pool=None,
                 vocab_limit: Optional[int] = None):
        if not 1 <= width <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"verify width {width} is outside [1, {MAX_SPECULATIVE_TOKENS}]")
        if width + 1 > cache.max_seq_len:
            raise ValueError(f"a verify pass of {width + 1} tokens does not fit a cache of {cache.max_seq_len}")
        self._bind(model, cache, buffers, batch, stages, graphed, vocab_limit)
        self.vbuf, self.width = vbuf, width
        self.speculative_sampling = speculative_sampling and stages.sampled
        if self.speculative_sampling:
            vbuf.with_draft_probs()
        device = buffers.tokens.device
        T = width + 1
        self._offsets = torch.arange(T, device=device)
        self._slots = torch.arange(batch, device=device).repeat_interleave(T)  # the native step's row -> cache row
        if graphed:
            self._capture({**buffers.tensors(), **{f"verify.{k}": v for k, v in vbuf.tensors().items()}}, pool)

    def _step(self) -> None:
        B, k, T, S = self.batch, self.width, self.width + 1, self.cache.max_seq_len
        buf, vb, V = self.buffers, self.vbuf, self.model.args.vocab_size
        tokens, starts, rows = buf.tokens[:B], buf.positions[:B], buf.sampling.view(B)
        proposals, proposed = vb.proposals[:B, :k], vb.proposed[:B]
        inputs = torch.cat([tokens[:, None], proposals], dim=1)  # [B, T]
        if self.native is not None:
            positions = (starts[:, None] + self._offsets).clamp_(max=S - 1)
            logits = self.native(inputs.reshape(-1), positions.reshape(-1), self.cache.data, self._slots)
            if self._accept is not None:
                self._accept(logits, proposals, proposed, vb.out[:B], tokens, starts, rows.counter, S - 1,
                             self.vocab_limit, NONFINITE)
                return
        else:
            logits = self.model(inputs, Verify(starts, S), self.cache).reshape(B * T, V)
        block = self._block_rows(rows, inputs)
        # (sample_rows advances the counters it is given: a copy where `block` is used again)
        given = block._replace(counter=block.counter.clone()) if self.speculative_sampling else block
        out = sample_rows(logits, self.stages, given, self.vocab_limit)
        target = out.tokens.view(B, T)  # the model's token after each input (what plain decoding samples)
        live = self._offsets[None, :k] < proposed[:, None]  # [B, k]
        if self.speculative_sampling:
            accepted, final = self._speculative(logits, block, proposals, live, target)
            emitted = torch.where(self._offsets[None, :] < accepted[:, None],
                                  torch.cat([proposals, target[:, k:]], 1), final[:, None])
        else:
            accepted = ((target[:, :k] == proposals) & live).long().cumprod(dim=1).sum(dim=1)
            final = target.gather(1, accepted[:, None])[:, 0]
            emitted = target  # the accepted proposals are the model's own tokens, and so is the one after them
        vb.out[:B, 0].copy_(accepted)
        vb.out[:B, 1:T + 1].copy_(emitted)  # [B, T]: n accepted ids, then the model's token (then filler)
        if self.stages.penalty:  # the pending token and the accepted proposals are now seen
            fed = (self._offsets[None, :] <= accepted[:, None]).to(torch.int32)
            counts = torch.zeros(B, V, dtype=torch.int32, device=inputs.device).scatter_add_(1, inputs, fed)
            rows.seen.logical_or_(counts > 0)
        tokens.copy_(final.clamp(min=0))
        advance = accepted + 1
        starts.add_(advance).clamp_(max=S - 1)
        rows.counter.add_(advance)
        if self.stages.logprobs:
            lsm = torch.log_softmax(logits.view(B, T, V), dim=-1)
            vb.logprob[:B, :T].copy_(lsm.gather(-1, emitted.clamp(min=0)[..., None])[..., 0])
            W = out.top_ids.shape[-1]  # (a vocabulary smaller than LOGPROB_WIDTH has fewer alternatives)
            vb.top_ids[:B, :T, :W].copy_(out.top_ids.view(B, T, W))
            vb.top_logprobs[:B, :T, :W].copy_(out.top_logprobs.view(B, T, W))

    def _block_rows(self, rows: RowView, inputs: torch.Tensor) -> RowView:
        """The sampling rows of the B x T positions: position i of row b samples with row b's values at
        counter c_b + i, having seen (for the penalty) the row's ids and inputs[b, :i + 1]."""
        B, T = inputs.shape
        def rep(t: torch.Tensor) -> torch.Tensor:  # [B] -> [B * T], row b's value T times (no host sync)
            return t[:, None].expand(B, T).reshape(-1)

        counter = (rows.counter[:, None] + self._offsets).reshape(-1)
        if not self.stages.sampled and not self.stages.penalty:  # greedy: sample_rows reads the counters only
            return RowView(None, None, None, None, None, None, counter, None)
        seen = rows.seen
        if self.stages.penalty:
            upto = (self._offsets[None, :] <= self._offsets[:, None]).to(torch.int32)  # [T (position), T (input)]
            counts = torch.zeros(B, T, rows.seen.shape[1], dtype=torch.int32, device=inputs.device)
            counts.scatter_add_(2, inputs[:, None, :].expand(B, T, T), upto[None].expand(B, T, T))
            seen = (rows.seen[:, None, :] | (counts > 0)).reshape(B * T, -1)
        else:
            seen = seen[:, None, :].expand(B, T, seen.shape[1]).reshape(B * T, -1)
        return RowView(rep(rows.greedy), rep(rows.temperature), rep(rows.top_k), rep(rows.top_p), rep(rows.penalty),
                       rep(rows.seed), counter, seen)

    def _speculative(self, logits, block: RowView, proposals, live, target):
        """Speculative sampling over the block: (accepted int64 [B], the token after them int64 [B])."""
        B, k, T = proposals.shape[0], self.width, self.width + 1
        V = logits.shape[-1]
        p = processed_probs(logits, self.stages, block, self.vocab_limit).view(B, T, V)
        q = self.vbuf.draft_probs[:B, :k]  # [B, k, V]
        greedy = block.greedy.view(B, T)[:, 0]
        p_d = p[:, :k].gather(-1, proposals[..., None])[..., 0]
        q_d = q.gather(-1, proposals[..., None])[..., 0]
        counters = block.counter.view(B, T)[:, :k]
        u = counter_noise((block.seed.view(B, T)[:, :k] ^ ACCEPT_STREAM).reshape(-1), counters.reshape(-1), 1)
        ok = u.view(B, k) * q_d < p_d  # u < p / q, without dividing by a q of 0
        ok = torch.where(greedy[:, None], target[:, :k] == proposals, ok) & live
        accepted = ok.long().cumprod(dim=1).sum(dim=1)
        # at the first rejection the token comes from max(0, p - q); after k acceptances from p itself
        residual = (p[:, :k] - q).clamp_(min=0)
        noise = -torch.log(counter_noise(block.seed.view(B, T)[:, :k].reshape(-1), counters.reshape(-1), V))
        redraw = torch.argmax(residual.reshape(B * k, V) / noise, dim=-1).view(B, k)
        redraw = torch.where(greedy[:, None] | (residual.sum(-1) <= 0), target[:, :k], redraw)
        redraw = torch.cat([redraw, target[:, k:]], dim=1)  # position k: nothing proposed, the model's draw
        rejected = accepted < live.sum(dim=1)
        own = target.gather(1, accepted[:, None])[:, 0]  # NONFINITE stays so: the request fails, as plainly
        final = torch.where(rejected & (own >= 0), redraw.gather(1, accepted[:, None])[:, 0], own)
        return accepted, final
