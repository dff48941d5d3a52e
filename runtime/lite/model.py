"""LiteModel: generation from a lite model directory with numpy and the native step only (no torch)."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from ..engine.sampling import MIN_TEMPERATURE, SamplingParams
from ..engine.speculation import PassCosts, PromptLookup, Speculation, SpeculationStats
from ..tokenizer.detokenize import TextStream
from ..tokenizer.tokenizer import Tokenizer
from .file import FILE_NAME, read
from .native import NativeDecoder, set_threads

PREFILL_CHUNK = 256  # prompt rows per native step: bounds the step's activation buffers (rows x ffn_dim floats)


class LiteCompletion(NamedTuple):
    """One generation: the text (cut before a stop string), its token ids, why it ended ("eos", "eot", "stop",
    "length"), the prompt's length, the seconds spent on the prompt and on the new tokens, and with speculate set
    the verify passes' counts (`SpeculationStats`: verifies, proposed, accepted, mean_accepted)."""
    text: str
    token_ids: list
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    speculation: Optional[SpeculationStats] = None


class LiteModel:
    """A lite model directory (`lite.safetensors` + `tokenizer.model`, written by `codellama-rt export-lite`),
    run by the native decode step on numpy arrays: greedy or sampled generation, streaming and infilling, one call
    at a time (a concurrent call raises RuntimeError). threads: OpenMP's for every step of the process (default:
    every core). bf16_prefill: prompts multiply int8 / int4 / NF4 weights in bf16 on CPUs with AVX512-BF16 (as
    KernelOptions.cpu_bf16_prefill; False keeps fp32)."""

    def __init__(self, directory, *, threads: Optional[int] = None, bf16_prefill: bool = True):
        directory = Path(directory)
        path = directory / FILE_NAME if directory.is_dir() else directory
        self.path = path
        self.threads = set_threads(threads)
        lite = read(path)
        self.config = lite.config
        self.decoder = NativeDecoder(lite, os.fspath(path), bf16_prompt=bf16_prefill)
        self.tokenizer = Tokenizer.from_file(path.parent / "tokenizer.model")
        if self.tokenizer.vocab_size > self.config["vocab_size"]:
            raise ValueError(f"{path.parent / 'tokenizer.model'}: {self.tokenizer.vocab_size} pieces for a model of "
                             f"{self.config['vocab_size']} tokens")
        self.max_seq_len = min(int(self.config["max_seq_len"]), self.decoder.rope_positions)
        self._lock = threading.Lock()
        self._cache = self.decoder.new_cache(1, 0)
        self._costs = PassCosts()  # (the verify passes' times against a decode step's, for speculate)

    # ---- generation ----------------------------------------------------------------------

    def generate(self, prompt, **sampling) -> LiteCompletion:
        """prompt: str (BOS added) or a list of token ids -> LiteCompletion. sampling: max_new_tokens (default 128),
        temperature (0: greedy, the default; below 1e-5 as codellama_rt.SamplingParams), top_k (0: all), top_p (1:
        all), seed, stop (strings), ignore_eos (go on past EOS: benchmarks), speculate ("lookup": prompt-lookup
        proposals checked by one multi-row step each, greedy only; the tokens are plain greedy decoding's) and
        num_speculative_tokens (most proposals a pass, default 8; fewer while they are rejected)."""
        return self._complete(self._ids(prompt), "text", sampling)

    def stream(self, prompt, **sampling) -> "LiteStream":
        """generate's text in pieces as they become final (arguments checked now): iterate it once; its
        `completion` is set when the iteration ends."""
        return LiteStream(self, self._ids(prompt), "text", _Sampling(**sampling))

    def infill(self, prefix: str, suffix: str, *, suffix_first: bool = False, **sampling) -> LiteCompletion:
        """The middle between prefix and suffix (CodeLlama's infilling format; stops at <EOT>)."""
        if self.tokenizer.eot_id is None:
            raise ValueError("this model's vocabulary has no infilling pieces")
        ids = self._checked(self.tokenizer.encode_infill(prefix, suffix, suffix_first=suffix_first))
        return self._complete(ids, "infill", sampling)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """fp32 [len(token_ids), vocab] next-token logits at every position of one sequence (one step)."""
        ids = self._ids(list(token_ids))
        with self._serving():
            cache = self._cache_for(len(ids))
            return self.decoder.step(np.array(ids, dtype=np.int64), np.arange(len(ids), dtype=np.int64), cache,
                                     np.zeros(len(ids), dtype=np.int64))

    # ---- internals -----------------------------------------------------------------------

    def _ids(self, prompt) -> list:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_bos=True)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                                       for i in prompt):
            ids = [int(i) for i in prompt]
        else:
            raise ValueError("prompt must be a str or a list of token ids")
        return self._checked(ids)

    def _checked(self, ids: list) -> list:
        if not ids:
            raise ValueError("the prompt has no tokens")
        bad = [i for i in ids if not 0 <= i < self.config["vocab_size"]]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (0 .. {self.config['vocab_size'] - 1})")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_seq_len} "
                             "(the prompt plus at least one new token must fit)")
        return ids

    @contextlib.contextmanager
    def _serving(self):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a LiteModel runs one generation at a time; another call is in progress (use one "
                               "LiteModel per thread, or codellama_rt.load for concurrent requests)")
        try:
            yield
        finally:
            self._lock.release()

    def _cache_for(self, positions: int) -> np.ndarray:
        if self._cache.shape[4] < positions:  # (grown, never shrunk: positions past a step's are never read)
            self._cache = self.decoder.new_cache(1, min(self.max_seq_len, max(positions, 2 * self._cache.shape[4])))
        return self._cache

    def _complete(self, ids: list, mode: str, sampling: dict) -> LiteCompletion:
        run = LiteStream(self, ids, mode, _Sampling(**sampling))
        for _ in run:
            pass
        return run.completion


class _Sampling(NamedTuple):
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()
    ignore_eos: bool = False
    speculate: Optional[str] = None
    num_speculative_tokens: int = 8

    def check(self) -> "_Sampling":
        """The keywords checked (SamplingParams' rules, plus the lite runtime's own: at least one new token, no
        draft model, speculation greedy only), stop as a tuple."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.speculate not in (None, "lookup"):
            raise ValueError(f"speculate must be None or 'lookup' (the lite runtime has no draft model), got "
                             f"{self.speculate!r}")
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, stop=self.stop, seed=self.seed, speculate=self.speculate,
                                num_speculative_tokens=self.num_speculative_tokens)
        if params.speculate and not params.greedy:
            raise ValueError("the lite runtime speculates with greedy decoding only (temperature 0); use "
                             "codellama_rt.load for speculative sampling")
        return self._replace(stop=params.stop)


class LiteStream:
    """One generation as an iterable of text pieces (iterate it once); `completion` once the iteration ends.
    proposer: what speculate="lookup" would propose with, given instead (benchmarks: an oracle)."""

    def __init__(self, model: LiteModel, ids: list, mode: str, sampling: _Sampling, proposer=None):
        self.model, self.ids, self.mode, self.s = model, ids, mode, sampling.check()
        tok = model.tokenizer
        self.stops = {} if self.s.ignore_eos else {i: "eos" for i in model.config.get("eos_ids", ())}
        if tok.eos_id is not None and not self.s.ignore_eos:
            self.stops[tok.eos_id] = "eos"
        if mode == "infill" and tok.eot_id is not None:
            self.stops[tok.eot_id] = "eot"
        self.rng = np.random.default_rng(self.s.seed)
        if proposer is None and self.s.speculate == "lookup":
            proposer = PromptLookup(list(ids))
        self.spec = None if proposer is None else Speculation(proposer, self.s.num_speculative_tokens)
        self.completion: Optional[LiteCompletion] = None
        self._started = False

    def __iter__(self) -> Iterator[str]:
        m, s = self.model, self.s
        if self._started:
            raise RuntimeError("a LiteStream runs its generation once: iterate it once")
        self._started = True
        with m._serving():
            new = min(s.max_new_tokens, m.max_seq_len - len(self.ids))
            cache = m._cache_for(len(self.ids) + new)
            text = TextStream(m.tokenizer, s.stop)
            t0 = time.perf_counter()
            logits = self._prefill(cache)
            t1 = time.perf_counter()
            out, reason = [], None
            position = len(self.ids)  # the next input token's
            while reason is None:
                token = self._choose(logits)
                reason = yield from self._emit(token, out, text, new)
                if reason is not None:
                    break
                proposals = self._proposals(new - len(out) - 1)
                if not proposals and self.spec is None:
                    logits = m.decoder.decode_one(token, position, cache)
                    position += 1
                    continue
                rows = [token] + proposals
                t = time.perf_counter()
                logits_rows = m.decoder.step(np.array(rows, dtype=np.int64),
                                             np.arange(position, position + len(rows), dtype=np.int64), cache,
                                             np.zeros(len(rows), dtype=np.int64))
                if self.spec is not None:
                    m._costs.observe(1, len(proposals), time.perf_counter() - t)
                # (rows of one slot at consecutive positions: each row's logits a decode step's). Speculation is
                # greedy: every row's argmax at once, each row's finiteness checked where it is used, as _choose
                guesses, highest = logits_rows.argmax(axis=1).tolist(), logits_rows.max(axis=1)
                accepted = 0
                while reason is None and accepted < len(proposals):
                    if not np.isfinite(highest[accepted]):
                        self._choose(logits_rows[accepted])  # (raises, naming the problem)
                    if guesses[accepted] != proposals[accepted]:
                        break
                    accepted += 1
                    reason = yield from self._emit(proposals[accepted - 1], out, text, new)
                if proposals:
                    self.spec.record(len(proposals), accepted)
                position += accepted + 1
                logits = logits_rows[accepted]
            rest = text.finish()
            if rest:
                yield rest
            t2 = time.perf_counter()
            self.completion = LiteCompletion(text.text, out, reason, len(self.ids), t1 - t0, t2 - t1,
                                             None if self.spec is None else self.spec.stats)

    def _emit(self, token: int, out: list, text: TextStream, new: int):
        """Takes one generated token (yielding the text it completes); returns why the generation ends, or None."""
        if token in self.stops:
            return self.stops[token]
        out.append(token)
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return "stop"
        if len(out) == new:
            return "length"
        if self.spec is not None:
            self.spec.extend([token])
        return None

    def _proposals(self, room: int) -> list:
        """The ids to check with the next step (speculate): at most `room`, as many as pay on this CPU."""
        if self.spec is None or room <= 0 or not self.spec.wants():
            return []
        n = self.spec.limit(room, lambda width: self.model._costs.relative(1, width))
        return list(self.spec.propose(n)[:n]) if n else []

    def _prefill(self, cache: np.ndarray) -> np.ndarray:
        ids = np.array(self.ids, dtype=np.int64)
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            rows = ids[start:start + PREFILL_CHUNK]
            logits = self.model.decoder.step(rows, np.arange(start, start + len(rows), dtype=np.int64), cache,
                                             np.zeros(len(rows), dtype=np.int64), out_rows=1, prompt=True)[0]
        return logits

    def _choose(self, logits: np.ndarray) -> int:
        s = self.s
        if not np.isfinite(logits.max()):
            raise FloatingPointError("the model's logits are not finite (NaN or infinity): the weights or the "
                                     "prompt overflow fp32")
        if s.temperature < MIN_TEMPERATURE:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / s.temperature
        if s.top_k and s.top_k < z.shape[0]:
            z[z < np.partition(z, -s.top_k)[-s.top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if s.top_p < 1:
            order = np.argsort(-p, kind="stable")
            keep = np.cumsum(p[order]) - p[order] < s.top_p  # the smallest prefix reaching top_p
            p[order[~keep]] = 0
            p /= p.sum()
        return int(self.rng.choice(p.shape[0], p=p))
