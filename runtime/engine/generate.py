"""The generation engine: batched prefill into the static KV cache, then one-token decode steps."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterator, Optional

import torch

from .decode_graph import NONFINITE, DecodeStep
from .events import Completion
from ..tokenizer.detokenize import TextStream
from ..errors import ModelBusyError
from ..model.kv_cache import KVCache
from ..model.transformer import Prefill, Transformer
from .sampling import MAX_DECODE_STEPS, SamplingParams, SamplingSignature
from ..tokenizer.tokenizer import Tokenizer


class Engine:
    """Owns the model, the tokenizer and a static KV cache for up to max_batch sequences.

    The cache is allocated on first use with room for what the call needs (rounded up to a power
    of two, at least 256 tokens, at most max_seq_len) and reallocated larger only when a later
    call needs more, so memory follows use rather than the model's full context.

    Every decode step runs through a `DecodeStep` (static buffers, attention over the whole cache),
    kept per (batch size, sampling signature) and reused by later generations (at most
    MAX_DECODE_STEPS, the least recently used dropped first). With `cuda_graphs` (default: on for a
    CUDA model, off on CPU) each step is captured into a CUDA graph on first use and replayed for
    every token; growing the cache drops the steps, which are captured again.
    `generator` draws all sampling noise: each generation seeds it (`seed`) before its first token.

    One engine runs one generation at a time (they share the cache, the steps and the generator): a
    `Run` claims the engine when its iteration starts and releases it when it ends, fails or is
    closed; another generation meanwhile (another thread, or a second live stream) raises
    ModelBusyError instead of corrupting the first.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int, max_seq_len: int,
                 prefill_chunk: int = 2048, cuda_graphs: Optional[bool] = None):
        self.model, self.tok = model, tokenizer
        self.max_batch, self.max_seq_len, self.prefill_chunk = max_batch, max_seq_len, prefill_chunk
        on_cuda = model.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = on_cuda
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device; the model is on {model.device}")
        self.cuda_graphs = bool(cuda_graphs)
        self.generator = torch.Generator(device=model.device)
        self.captures = 0  # CUDA graphs captured so far (a replayed step adds none)
        self._cache: Optional[KVCache] = None
        self._steps: OrderedDict = OrderedDict()  # (batch, signature, graphed) -> DecodeStep, LRU order
        self._pool = None  # memory pool shared by the captured graphs (never replayed concurrently)
        self._claim_lock = threading.Lock()
        self._active: Optional["Run"] = None  # the Run now using the cache and steps
        V = model.args.vocab_size
        self.vocab_limit = min(getattr(tokenizer, "vocab_size", V) or V, V)  # ids generation may emit

    # ---- TEMPORARY serving front (replaced by the continuous-batching scheduler) ----------------
    def submit(self, ids, params: SamplingParams, stop_tokens: dict, *, logprobs: int = 0, sink):
        """Start one request; `sink` gets Delta events, then a Completion (or an exception)."""
        from .events import Delta
        from .metrics import EngineMetrics

        if not hasattr(self, "metrics"):
            self.metrics = EngineMetrics(self.max_batch)
            self._serial = threading.Lock()
        prompt = self.check_prompt(ids)
        state = {"cancelled": False}

        def work():
            with self._serial:
                if state["cancelled"]:
                    return
                try:
                    run = Run(self, [prompt], params, stop_tokens)
                    for _, piece in run:
                        if state["cancelled"]:
                            return
                        sink(Delta(piece))
                    sink(run.completions[0])
                except Exception as e:
                    sink(e)

        self.metrics.add("requests")
        threading.Thread(target=work, daemon=True).start()
        return state

    def cancel(self, request) -> None:
        request["cancelled"] = True

    def claim(self, run: "Run") -> None:
        """Make `run` the engine's one generation, or raise ModelBusyError while another one is live."""
        with self._claim_lock:
            if self._active is not None and self._active is not run:
                raise ModelBusyError(
                    "model is busy with another generation (another thread, or a stream that is neither "
                    "exhausted nor closed): one model runs one generation at a time; finish or close() the "
                    "other stream first, or load one model per thread")
            self._active = run

    def release(self, run: "Run") -> None:
        with self._claim_lock:
            if self._active is run:
                self._active = None

    def cache_for(self, n_tokens: int) -> KVCache:
        """A KV cache holding at least `n_tokens` (<= max_seq_len) tokens per sequence."""
        need = min(self.max_seq_len, max(256, 1 << (max(n_tokens, 1) - 1).bit_length()))
        if self._cache is None or self._cache.max_seq_len < need:
            self._steps.clear()  # their graphs point into the old cache: capture again on next use
            self._pool = None
            self._cache = None  # free the old one before allocating
            self._cache = KVCache(self.model.args, self.max_batch, need, self.model.dtype, self.model.device)
        return self._cache

    def decode_step(self, batch: int, sig: SamplingSignature, cache: KVCache) -> DecodeStep:
        """The decode step of `batch` rows under `sig` over the current cache: built (and with
        `cuda_graphs`, captured) on first use, then the same object for every later generation."""
        if cache is not self._cache:
            raise ValueError("decode_step: not the engine's current KV cache (use cache_for)")
        graphed = self.cuda_graphs
        key = (batch, sig, graphed)
        step = self._steps.get(key)
        if step is None:
            while len(self._steps) >= MAX_DECODE_STEPS:
                self._steps.popitem(last=False)
            if graphed and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            step = DecodeStep(self.model, cache, batch, sig, self.generator, graphed=graphed, pool=self._pool,
                              vocab_limit=self.vocab_limit)
            self.captures += graphed
            self._steps[key] = step
        self._steps.move_to_end(key)
        return step

    def graph_pool_bytes(self) -> int:
        """Device memory held by the captured decode graphs (their shared pool's segments); 0 without."""
        if self._pool is None or not any(s.graph is not None for s in self._steps.values()):
            return 0
        pool = tuple(self._pool)
        device = self.model.device.index if self.model.device.index is not None else torch.cuda.current_device()
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool and seg.get("device", device) == device)

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

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 [B, T] -> fp32 [B, T, V]: one forward pass without the KV cache."""
        return self.model(tokens.to(self.model.device), Prefill(0), None)

    def run(self, prompts: list[list[int]], params: SamplingParams, stop_tokens: dict) -> "Run":
        """Start generating for `prompts` (validated id lists); iterate the Run for streamed pieces."""
        return Run(self, [self.check_prompt(p) for p in prompts], params, stop_tokens)


class Run:
    """One batched generation. Iterating yields (row, text piece) as text becomes final;
    `completions` holds the results once iteration ends. Batches over max_batch run in groups."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams, stop_tokens: dict):
        self.engine, self.prompts, self.params, self.stop_tokens = engine, prompts, params, stop_tokens
        self.completions: list[Optional[Completion]] = [None] * len(prompts)
        self._iterated = False

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self._iterated:
            raise RuntimeError("a generation can be iterated only once")
        self._iterated = True
        return self._pieces()

    def _pieces(self) -> Iterator[tuple[int, str]]:
        self.engine.claim(self)  # at the first next(): a stream created but never read holds nothing
        try:
            if not self.params.greedy:  # one random stream for the whole call, groups included
                if self.params.seed is None:
                    self.engine.generator.seed()
                else:
                    self.engine.generator.manual_seed(self.params.seed)
            mb = self.engine.max_batch
            for g in range(0, len(self.prompts), mb):
                for row, piece in self._group(g, self.prompts[g:g + mb]):
                    yield g + row, piece
        finally:
            self.engine.release(self)

    def _group(self, offset: int, prompts) -> Iterator[tuple[int, str]]:
        eng, params = self.engine, self.params
        B = len(prompts)
        lens = [len(p) for p in prompts]
        budget = [min(params.max_new_tokens, eng.max_seq_len - n) for n in lens]
        streams = [TextStream(eng.tok, params.stop) for _ in prompts]
        finish = ["length"] * B
        done = [b <= 0 for b in budget]
        # inference_mode wraps the tensor work only, never a `yield`: the caller's code between
        # streamed pieces must not run in inference mode.
        if not all(done):
            with torch.inference_mode():
                cache = eng.cache_for(max(n + b for n, b in zip(lens, budget)))
                # Built (captured) before the prefill: a capture's warm-up writes K/V only into slots
                # that this generation rewrites before reading them.
                step = eng.decode_step(B, SamplingSignature.of(params, eng.model.args.vocab_size), cache)
                step.start(self._prefill(prompts, lens, cache), prompts, params)
            while True:
                tokens = step.tokens.tolist()  # the one host sync per token: stops and streaming
                for b, t in enumerate(tokens):
                    if done[b]:
                        continue
                    if t == NONFINITE:
                        raise FloatingPointError(
                            f"the model's logits are not finite (NaN or inf) at generated token "
                            f"{len(streams[b].ids) + 1} of prompt {offset + b}: the weights or the "
                            f"arithmetic overflow (dtype {eng.model.dtype}; float16 overflows where "
                            "bfloat16 and float32 do not)")
                    if t in self.stop_tokens:
                        finish[b], done[b] = self.stop_tokens[t], True
                        continue
                    piece = streams[b].push(t)
                    if piece:
                        yield b, piece
                    if streams[b].stopped:
                        finish[b], done[b] = "stop", True
                    elif len(streams[b].ids) >= budget[b]:
                        done[b] = True
                if all(done):
                    break
                step()  # decode `tokens`, sample the next ones into step.tokens (a graph replay on CUDA)
        for b in range(B):
            piece = streams[b].finish()
            if piece:
                yield b, piece
            if streams[b].stopped:
                finish[b] = "stop"
            self.completions[offset + b] = Completion(text=streams[b].text, token_ids=list(streams[b].ids),
                                                      prompt_tokens=lens[b], finish_reason=finish[b])

    def _prefill(self, prompts, lens, cache: KVCache) -> torch.Tensor:
        """Right-padded chunked prefill; returns fp32 logits [B, V] at each prompt's last token."""
        eng = self.engine
        device = eng.model.device
        T = max(lens)
        tokens = torch.tensor([p + [p[-1]] * (T - len(p)) for p in prompts], dtype=torch.long, device=device)
        last = torch.tensor(lens, device=device) - 1
        logits = None
        for start in range(0, T, eng.prefill_chunk):
            chunk = tokens[:, start:start + eng.prefill_chunk]
            n = chunk.shape[1]
            idx = (last - start).clamp(0, n - 1)
            out = eng.model(chunk, Prefill(start), cache, last_index=idx)
            here = ((last >= start) & (last < start + n))[:, None]
            logits = out if logits is None else torch.where(here, out, logits)
        return logits
