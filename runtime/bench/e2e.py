"""End-to-end benchmarks on random weights at real shapes (no checkpoint needed).

Per model: decode tokens/s at each batch size next to its bound (bytes one decode step must read / the
measured bandwidth: the copy bandwidth on a GPU), time to first token per prompt length, and peak memory,
for the providers

- `ours (CUDA graphs)` and `ours (eager)`: the engine (`Engine.run`, greedy, no stop tokens) with its
  `cuda_graphs` option on and off (the graphs row is "unavailable" while the Engine has no such option);
- `torch.compile reduce-overhead (reference graph)`: gpt-fast's recipe on our module graph with the
  reference ops: eager prefill, then a compiled one-token decode step fed its own argmax;
- `transformers generate (static cache)`: LlamaForCausalLM holding the same tensors (dense models only).

GPU models (7B bf16 / NF4 / int4, 34B int4) need CUDA; CPU models (`tiny`, `100M`) run on the CPU with
the reference backend beside transformers. On CUDA the two peers run in child processes
(`python -m codellama_rt.bench.e2e peer ...`) that rebuild the same weights from the seed, so a compile
that hangs or crashes costs its timeout and a "failed: ..." row, never the report.

Decode timing: a warm-up run, then a run whose per-token host timestamps (the engine syncs once per
token to stream) give tokens/s = batch * (n - 1) / (t_last - t_first); TTFT = first token - call start.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from ..api import random_model
from ..model.backends import resolve_backend
from ..model.config import ModelArgs
from ..engine.generate import Engine
from ..kernels.options import DEFAULT_OPTIONS, EXPERIMENTS, KernelOptions
from ..quant.linear import weight_bytes
from ..engine.sampling import SamplingParams

OURS_GRAPHS = "ours (CUDA graphs)"
OURS_EAGER = "ours (eager)"
OURS = "ours"  # TTFT: prefill does not use graphs
COMPILE = "torch.compile reduce-overhead (reference graph)"
HF = "transformers generate (static cache)"
PEERS = {"compile": COMPILE, "hf": HF}
SEED = 0


# ---- what is measured ------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: shapes (a preset name or ModelArgs), dtype, 4-bit method, device kind."""

    name: str
    shapes: object  # preset name | ModelArgs
    dtype: str
    quantize: Optional[str] = None
    cuda: bool = True

    def args(self) -> ModelArgs:
        return ModelArgs.from_preset(self.shapes) if isinstance(self.shapes, str) else dataclasses.replace(self.shapes)

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"


TINY = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=384, vocab_size=1000, max_seq_len=4096)
M100 = ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, vocab_size=1000, max_seq_len=4096)

# In the order a report runs them: the bars' models first.
MODELS = {s.name: s for s in (
    ModelSpec("7B-bf16", "CodeLlama-7b", "bfloat16"),
    ModelSpec("7B-int4", "CodeLlama-7b", "bfloat16", "int4"),
    ModelSpec("34B-int4", "CodeLlama-34b", "bfloat16", "int4"),
    ModelSpec("7B-nf4", "CodeLlama-7b", "bfloat16", "nf4"),
    ModelSpec("tiny", TINY, "float32", cuda=False),
    ModelSpec("100M", M100, "float32", cuda=False),
)}
GPU_MODELS = tuple(n for n, s in MODELS.items() if s.cuda)
CPU_MODELS = tuple(n for n, s in MODELS.items() if not s.cuda)


@dataclass
class Plan:
    """What one report measures (see `make_plan`); JSON-able so a child process gets the same plan."""

    models: tuple
    decode_prompt: int          # prompt tokens before the timed decode
    decode_tokens: int          # new tokens per decode run
    batches: tuple
    ttft_prompts: tuple
    ttft_repeats: int
    compile_models: tuple       # models that get the torch.compile peer (batch 1)
    hf_models: tuple            # models that get the transformers peer
    kernels: bool               # the kernel rows (CUDA only)
    isolate_peers: bool         # peers in child processes with a timeout
    peer_timeout_s: float = 240.0
    estimates: dict = field(default_factory=dict)  # unit -> rough seconds, to skip what no longer fits
    experiment_sets: tuple = ()  # tuples of experiment names: extra batch-1 graph rows of the bars' models
    experiments: tuple = ()     # the KernelOptions of every row: experiments on (an experiment row adds its set)
    pdl: bool = True            # ... and programmatic dependent launch

    def kernel_options(self, extra=()) -> KernelOptions:
        """The KernelOptions of a row: the plan's, with the experiments `extra` on too."""
        return KernelOptions(experiments={*self.experiments, *extra}, pdl=self.pdl)


# Rough seconds per unit of work with cold Triton/Inductor caches, on a GPU (the H200 run of 2026-11-26
# took 16, 28, 54, 82, 80 and 24 s for the units below and 47 s for the AOT table; these add a margin; the
# experiment rows of one model, a child that rebuilds it, are a guess) and on 2 CPU cores; the report
# records the real ones under "timings", which is where to correct these from.
GPU_ESTIMATES = {"7B-bf16": 30, "7B-int4": 40, "34B-int4": 75, "7B-nf4": 100, "compile": 110, "hf": 120,
                 "kernels": 45, "resources": 60, "experiments": 60}
CPU_ESTIMATES = {"tiny": 5, "100M": 30, "resources": 120}  # models: ours and transformers together


def make_plan(*, cuda: bool, quick: bool, only=None, kernel_options: KernelOptions = DEFAULT_OPTIONS) -> Plan:
    """The measurement matrix: full or quick, on a GPU (`cuda`) or the CPU subset. `only` keeps the named
    models and/or "kernels", e.g. ["7B-bf16", "kernels"]; naming only CPU models ("tiny", "100M") runs the
    CPU subset's plan for them, with a GPU or without. `kernel_options`: those of every row."""
    wanted = None
    if only:
        names = {n.lower(): n for n in [*MODELS, "kernels"]}
        wanted = []
        for item in only:
            key = item.strip().lower()
            if key not in names:
                raise ValueError(f"--only {item!r}: unknown; expected model names {', '.join(MODELS)} or kernels")
            wanted.append(names[key])
        gpu_named = [n for n in wanted if n in GPU_MODELS or n == "kernels"]
        if gpu_named and not cuda:
            raise ValueError(f"--only {', '.join(gpu_named)}: needs CUDA (this machine has none); "
                             f"the CPU subset is {', '.join(CPU_MODELS)}")
        cpu_named = [n for n in wanted if n in CPU_MODELS]
        if gpu_named and cpu_named:
            raise ValueError(f"--only: {', '.join(cpu_named)} (the CPU subset) and {', '.join(gpu_named)} "
                             "need separate reports")
        cuda = bool(gpu_named)
    if cuda:
        plan = Plan(models=GPU_MODELS, decode_prompt=128, decode_tokens=128, batches=(1, 8),
                    ttft_prompts=(512, 2048, 8192), ttft_repeats=3, compile_models=("7B-bf16", "7B-int4"),
                    hf_models=("7B-bf16",), kernels=True, isolate_peers=True, estimates=dict(GPU_ESTIMATES),
                    experiment_sets=tuple((n,) for n in EXPERIMENTS) + (tuple(EXPERIMENTS),))
        if quick:
            plan = dataclasses.replace(plan, models=("7B-bf16", "7B-int4"), decode_tokens=32,
                                       ttft_prompts=(512, 2048), ttft_repeats=2, compile_models=(),
                                       hf_models=(), kernels=False, experiment_sets=())
    else:
        plan = Plan(models=CPU_MODELS, decode_prompt=64, decode_tokens=48, batches=(1, 4),
                    ttft_prompts=(128, 512), ttft_repeats=3, compile_models=(), hf_models=CPU_MODELS,
                    kernels=False, isolate_peers=False, estimates=dict(CPU_ESTIMATES))
        if quick:
            plan = dataclasses.replace(plan, decode_prompt=32, decode_tokens=16, batches=(1,),
                                       ttft_prompts=(128,), ttft_repeats=2)
    if wanted is not None:
        plan = dataclasses.replace(plan, models=tuple(n for n in MODELS if n in wanted), kernels="kernels" in wanted)
    return dataclasses.replace(plan, experiments=tuple(sorted(kernel_options.experiments)), pdl=kernel_options.pdl)


def plan_uses_gpu(plan: Plan) -> bool:
    return plan.kernels or any(MODELS[m].cuda for m in plan.models)


# ---- the bound ---------------------------------------------------------------------------------

def decode_step_bytes(weights_read: int, args: ModelArgs, batch: int, context: float, elem_bytes: int) -> int:
    """Bytes one decode step must read: the weights it multiplies by plus every sequence's cached keys and
    values at `context` tokens (`ModelArgs.kv_cache_bytes`)."""
    return int(weights_read + args.kv_cache_bytes(batch, 1, elem_bytes) * context)


def decode_bound(step_bytes: int, bandwidth_gbps: float, batch: int = 1) -> float:
    """Tokens/s if a decode step took exactly its bytes / the measured bandwidth: batch / (bytes / bandwidth)."""
    return batch * bandwidth_gbps * 1e9 / step_bytes


def weights_read_per_token(module) -> int:
    """`quant.weight_bytes` less the embedding table, of which a decode step reads one row per sequence
    (unless it is tied to the lm_head, which reads it all)."""
    emb = module.tok_embeddings
    tied = getattr(module.output, "weight", None) is emb
    return weight_bytes(module) - (0 if tied else emb.numel() * emb.element_size())


# ---- building and timing ---------------------------------------------------------------------

class IdTokenizer:
    """Stand-in tokenizer for random weights: every id decodes to one character, so the engine streams one
    piece per token with no vocabulary behind it (the benchmark generates from token ids). A SentencePiece
    decode costs microseconds per token; this costs nothing."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.eot_id, self.step_id = 1, 2, None, None
        self.special_ids = frozenset()

    def decode_in_context(self, ids) -> str:
        return "x" * len(ids)


def build(spec: ModelSpec, kernel_options: KernelOptions = DEFAULT_OPTIONS):
    """The random-weight Model of `spec` (reference backend on the CPU, auto on CUDA) with `kernel_options`."""
    args = spec.args()
    return random_model(args, IdTokenizer(args.vocab_size), dtype=spec.dtype, device=spec.device,
                        backend="auto" if spec.cuda else "reference", quantize=spec.quantize, seed=SEED,
                        kernel_options=kernel_options)


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `length` ids in [3, vocab_size) (no bos/eos/unk), the same for every provider."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=g).tolist()


def engine_has_graphs() -> bool:
    return "cuda_graphs" in inspect.signature(Engine.__init__).parameters


class Unavailable(Exception):
    pass


def make_engine(model, batch: int, max_seq_len: int, cuda_graphs: Optional[bool]) -> Engine:
    """A fresh Engine on `model`'s module (its own KV cache for `batch` rows). cuda_graphs: True needs the
    Engine option (Unavailable otherwise); False turns it off where it exists; None: the Engine's default."""
    kwargs = {}
    if cuda_graphs is not None and engine_has_graphs():
        kwargs["cuda_graphs"] = cuda_graphs
    elif cuda_graphs:
        raise Unavailable("Engine has no cuda_graphs option")
    return Engine(model.module, model.tokenizer, max_batch=batch, max_seq_len=max_seq_len, **kwargs)


def _stamped_run(engine: Engine, prompts, new_tokens: int):
    """(start, host time of each token of row 0, row 0's ids) of one greedy run without stop tokens."""
    run = engine.run(prompts, SamplingParams(max_new_tokens=new_tokens), {})
    stamps, t0 = [], time.perf_counter()
    for row, _ in run:
        if row == 0:
            stamps.append(time.perf_counter())
    return t0, stamps, run.completions[0].token_ids


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> Optional[float]:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return None


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _decode_row(spec: ModelSpec, provider: str, batch: int, plan: Plan, **extra) -> dict:
    return dict(model=spec.name, provider=provider, batch=batch, prompt_tokens=plan.decode_prompt,
                new_tokens=plan.decode_tokens, **extra)


def _rate(stamps: list, batch: int) -> tuple[float, float]:
    """(tokens/s over all rows, ms per step) from row 0's per-token host timestamps."""
    if len(stamps) < 2:
        raise RuntimeError(f"only {len(stamps)} token(s) generated; need >= 2 to time decode")
    dt = stamps[-1] - stamps[0]
    steps = len(stamps) - 1
    return batch * steps / dt, dt / steps * 1e3


def ours_decode(model, spec: ModelSpec, plan: Plan, provider: str, batch: int, label: Optional[str] = None) -> dict:
    """One decode row of our engine: graphs on (OURS_GRAPHS) or off (OURS_EAGER); label: the row's provider
    name when it is not `provider` (an experiment row)."""
    row = _decode_row(spec, label or provider, batch, plan, backend=model.backend)
    device = model.module.device
    try:
        engine = make_engine(model, batch, plan.decode_prompt + plan.decode_tokens, provider == OURS_GRAPHS)
    except Unavailable as e:
        return {**row, "status": f"unavailable: {e}"}
    prompts = random_prompts(model.args.vocab_size, batch, plan.decode_prompt, seed=1000 + batch)
    try:
        _reset_peak(device)
        _stamped_run(engine, prompts, plan.decode_tokens)  # warm-up: JIT, graph capture, cache allocation
        _, stamps, ids = _stamped_run(engine, prompts, plan.decode_tokens)
        tok_s, ms = _rate(stamps, batch)
        row.update(status="ok", tok_s=tok_s, ms_per_step=ms, peak_gib=_peak_gib(device), tokens0=ids,
                   graph_captures=getattr(engine, "captures", None))
    except Exception as e:  # noqa: BLE001 - a failed measurement is a row, not a crash
        row.update(status=f"failed: {_reason(e)}")
    finally:
        del engine
        _free()
    return row


@contextlib.contextmanager
def kernel_options_set(model, options: KernelOptions):
    """`model`'s module runs its backend bound to `options` inside the block (engines built there capture
    those kernel paths), as it was after: the weights are shared, not rebuilt."""
    module = model.module
    saved = module.ops
    module.ops = resolve_backend(saved.name, module.device, options)
    try:
        yield
    finally:
        module.ops = saved


def _median_ttft_ms(run, prompt, repeats: int) -> float:
    """Median milliseconds to the first token of `run(prompt)` (-> (t0, token stamps, ...)) after a warm-up."""
    run(prompt)
    times = []
    for _ in range(repeats):
        t0, stamps, _ = run(prompt)
        times.append((stamps[0] - t0) * 1e3)
    return statistics.median(times)


def _ttft_row(model, spec: ModelSpec, plan: Plan, provider: str, backend: str, n: int, run) -> dict:
    """One TTFT row: `run(prompts, new_tokens)` (-> (t0, token stamps, ...)) on a random n-token prompt,
    batch 1, with the peak memory it reached; a failure is a row, not a crash."""
    device = model.module.device
    row = dict(model=spec.name, provider=provider, backend=backend, prompt_tokens=n)
    try:
        prompt = random_prompts(model.args.vocab_size, 1, n, seed=n)
        _reset_peak(device)
        ttft = _median_ttft_ms(lambda p: run(p, 1), prompt, plan.ttft_repeats)
        row.update(status="ok", ttft_ms=ttft, peak_gib=_peak_gib(device))
    except Exception as e:  # noqa: BLE001
        row.update(status=f"failed: {_reason(e)}")
    return row


def ours_ttft(model, spec: ModelSpec, plan: Plan) -> list[dict]:
    """Time to first token (batch 1) at each prompt length: median of `ttft_repeats` after a warm-up."""
    engine = make_engine(model, 1, max(plan.ttft_prompts) + 1, None)
    rows = [_ttft_row(model, spec, plan, OURS, model.backend, n, partial(_stamped_run, engine))
            for n in plan.ttft_prompts]
    del engine
    _free()
    return rows


# ---- peers -----------------------------------------------------------------------------------

def compiled_reference_decode(model, spec: ModelSpec, plan: Plan, batch: int = 1) -> dict:
    """gpt-fast's recipe on our graph with the reference ops: eager prefill into a static KV cache, then
    `torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)` fed its own argmax, no host
    sync per token. Falls back to fullgraph=False (noted in the row) when dynamo cannot trace it whole."""
    from ..model.backends import BACKENDS
    from ..model.kv_cache import KVCache
    from ..model.transformer import Decode, Prefill

    row = _decode_row(spec, COMPILE, batch, plan, backend="reference")
    module, device = model.module, model.module.device
    saved_ops = module.ops
    module.ops = BACKENDS["reference"]
    P, N = plan.decode_prompt, plan.decode_tokens
    try:
        cache = KVCache(model.args, batch, P + N + 4, module.dtype, device)
        mark_static = getattr(torch._dynamo, "mark_static_address", None)
        if mark_static is not None:
            mark_static(cache.data)  # mutated in place by the graph: a static input, as gpt-fast's buffers
        S = cache.max_seq_len
        prompts = torch.tensor(random_prompts(model.args.vocab_size, batch, P, seed=1000 + batch), device=device)

        def decode_one_token(tok, pos):
            logits = module(tok, Decode(pos, S), cache)[:, -1]
            return torch.argmax(logits, dim=-1, keepdim=True)

        with torch.no_grad():
            first = module(prompts, Prefill(0), cache, last_index=torch.full((batch,), P - 1, device=device))
            first = torch.argmax(first, dim=-1, keepdim=True)  # [B, 1]
        _reset_peak(device)
        notes = []
        for fullgraph in (True, False):
            torch._dynamo.reset()
            step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=fullgraph)
            pos = torch.full((batch,), P, dtype=torch.long, device=device)

            def generate(n):
                tok, out = first, []
                for _ in range(n):
                    nxt = step(tok, pos)
                    pos.add_(1)
                    tok = nxt.clone()  # the graph's output buffer is reused by the next replay
                    out.append(tok)
                return out

            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    generate(3)  # compile, then cudagraph warm-up and recording
                _sync(device)
                compile_s = time.perf_counter() - t0
                break
            except Exception as e:  # noqa: BLE001
                if not fullgraph:
                    raise
                notes.append(f"fullgraph=True failed ({_reason(e)[:160]}); fullgraph=False")
        skips = _cudagraph_skips()
        if skips:
            notes.append(f"inductor skipped CUDA graphs {skips} time(s)")
        with torch.no_grad():
            pos.fill_(P)
            _sync(device)
            t0 = time.perf_counter()
            toks = generate(N)
            _sync(device)
            dt = time.perf_counter() - t0
        row.update(status="ok", tok_s=batch * N / dt, ms_per_step=dt / N * 1e3, peak_gib=_peak_gib(device),
                   compile_s=compile_s, tokens0=[int(t[0, 0]) for t in [first] + toks[:N - 1]],
                   notes="; ".join(notes) or None)
    except Exception as e:  # noqa: BLE001
        row.update(status=f"failed: {_reason(e)}")
    finally:
        module.ops = saved_ops
        torch._dynamo.reset()
        _free()
    return row


def _cudagraph_skips() -> int:
    """How often Inductor declined to CUDA-graph a compiled region (0 where the counter is unknown)."""
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)))
    except Exception:  # noqa: BLE001 - a private counter: absent in some versions
        return 0


class _Stamps:
    """A transformers streamer that records when each generated token reaches the host."""

    def __init__(self, prompt_len: int):
        self.prompt_len, self.times, self.prompt_seen = prompt_len, [], False

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self.prompt_seen and value.dim() == 2 and value.shape[-1] == self.prompt_len:
            self.prompt_seen = True  # generate() first streams the prompt
            return
        self.times.append(now)

    def end(self) -> None:
        pass


def hf_model(model):
    """transformers' LlamaForCausalLM holding `model`'s (dense) tensors: the fused projections split into
    q/k/v and gate/up views, no copy. eos is unset so generation always runs max_new_tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..checkpoint.layouts import hf_plan
    from ..tiny import hf_config

    module, args = model.module, model.args
    params = dict(module.named_parameters(remove_duplicate=False))
    state = {}
    for target, parts in hf_plan(args).items():
        tensor, offset = params[target], 0
        for part in parts:
            state[part.name] = tensor[offset:offset + part.shape[0]] if tensor.dim() == 2 else tensor
            offset += part.shape[0]
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    cfg = LlamaConfig.from_dict({**hf_config(args), "eos_token_id": None, "pad_token_id": 0})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(module.dtype)
    try:
        with torch.device(module.device):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    hf.load_state_dict(state, strict=True, assign=True)
    hf.eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def _hf_generate(hf, prompts, new_tokens: int):
    ids = torch.tensor(prompts, device=hf.device)
    streamer = _Stamps(ids.shape[1])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static", streamer=streamer, pad_token_id=0)
    return t0, streamer.times, out[0, ids.shape[1]:].tolist()


def hf_rows(model, spec: ModelSpec, plan: Plan, emit=None) -> list[dict]:
    """transformers generate (greedy, static cache) on the same weights: TTFT per prompt length (cheap),
    then decode per batch (on CUDA transformers compiles its decode step for each batch size).
    emit(rows so far) after each row, so a child that times out still reports what it finished."""
    device = model.module.device
    rows, emit = [], emit or (lambda rows: None)
    try:
        hf = hf_model(model)
    except Exception as e:  # noqa: BLE001
        return missing_peer_rows("hf", spec, plan, [], f"failed: {_reason(e)}")
    for n in plan.ttft_prompts:
        rows.append(_ttft_row(model, spec, plan, HF, "transformers", n, partial(_hf_generate, hf)))
        emit(rows)
        _free()
    for b in plan.batches:
        row = _decode_row(spec, HF, b, plan, backend="transformers")
        try:
            prompts = random_prompts(model.args.vocab_size, b, plan.decode_prompt, seed=1000 + b)
            _reset_peak(device)
            t0 = time.perf_counter()
            _hf_generate(hf, prompts, plan.decode_tokens)
            warmup_s = time.perf_counter() - t0
            _, stamps, ids = _hf_generate(hf, prompts, plan.decode_tokens)
            tok_s, ms = _rate(stamps, b)
            row.update(status="ok", tok_s=tok_s, ms_per_step=ms, peak_gib=_peak_gib(device), tokens0=ids,
                       warmup_s=warmup_s)
        except Exception as e:  # noqa: BLE001
            row.update(status=f"failed: {_reason(e)}")
        rows.append(row)
        emit(rows)
        _free()
    del hf
    _free()
    return rows


def peer_unavailable(kind: str) -> Optional[str]:
    """Why peer `kind` cannot run here (a row status), or None."""
    if kind not in PEERS:
        raise ValueError(f"unknown peer {kind!r}")
    if kind == "hf" and importlib.util.find_spec("transformers") is None:
        return "skipped: transformers is not installed"
    return None


def peer_rows(kind: str, model, spec: ModelSpec, plan: Plan, emit=None) -> list[dict]:
    """The rows of one peer ("compile" | "hf") on a built model."""
    reason = peer_unavailable(kind)
    if reason:
        return missing_peer_rows(kind, spec, plan, [], reason)
    if kind == "compile":
        return [compiled_reference_decode(model, spec, plan, batch=1)]
    return hf_rows(model, spec, plan, emit)


def missing_peer_rows(kind: str, spec: ModelSpec, plan: Plan, have: list, status: str) -> list[dict]:
    """`have` plus a row with `status` for every decode batch / TTFT length of the peer it lacks."""
    provider = PEERS[kind]
    rows = list(have)
    done_b = {r["batch"] for r in have if "new_tokens" in r}
    done_t = {r["prompt_tokens"] for r in have if "new_tokens" not in r}
    if kind == "hf":
        rows += [dict(model=spec.name, provider=provider, backend="transformers", prompt_tokens=n, status=status)
                 for n in plan.ttft_prompts if n not in done_t]
    batches = (1,) if kind == "compile" else plan.batches
    rows += [_decode_row(spec, provider, b, plan, status=status) for b in batches if b not in done_b]
    return rows


def peer_rows_isolated(kind: str, spec: ModelSpec, plan: Plan, timeout_s: float) -> list[dict]:
    """`peer_rows` in a child process that rebuilds the model from the seed; a timeout or a crash becomes
    failed rows for what the child had not finished."""
    reason = peer_unavailable(kind)
    if reason:
        return missing_peer_rows(kind, spec, plan, [], reason)
    have, reason = _run_child(["peer", kind, spec.name], plan, timeout_s)
    return missing_peer_rows(kind, spec, plan, have, reason)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.communicate()


def experiment_provider(spec: ModelSpec, names) -> tuple[str, str]:
    """(how, name) of an experiment row: our CUDA-graph decode (eager where graphs cannot run: the CPU
    tests) with `names` on, named after them."""
    how = OURS_GRAPHS if spec.cuda else OURS_EAGER
    return how, f"{how} [{'+'.join(names)}]"


def experiment_rows(model, spec: ModelSpec, plan: Plan, sets, emit=None) -> list[dict]:
    """One batch-1 decode row (`ours_decode`, `experiment_provider`'s) per set of experiment names, each
    engine built, captured and run with the plan's kernel options plus those (`kernel_options_set`);
    `emit`ted as they come."""
    rows = []
    for names in sets:
        how, label = experiment_provider(spec, names)
        with kernel_options_set(model, plan.kernel_options(names)):
            rows.append(dict(ours_decode(model, spec, plan, how, 1, label=label), experiments=list(names)))
        if emit:
            emit(rows)
    return rows


def experiment_rows_isolated(spec: ModelSpec, plan: Plan, sets, timeout_s: float) -> list[dict]:
    """`experiment_rows` in a child process that rebuilds the model from the seed, so a kernel path that has
    never run on this GPU cannot take the report's own CUDA context down with it; a timeout or a crash
    becomes failed rows for the sets the child had not finished."""
    have, reason = _run_child(["experiments", spec.name, "--sets", json.dumps([list(n) for n in sets])], plan,
                              timeout_s)
    done = [tuple(r.get("experiments", ())) for r in have]
    missing = [dict(_decode_row(spec, experiment_provider(spec, n)[1], 1, plan, status=reason),
                    experiments=list(n)) for n in map(tuple, sets) if n not in done]
    return have + missing


def _run_child(args: list, plan: Plan, timeout_s: float) -> tuple[list, str]:
    """(rows the child `python -m codellama_rt.bench.e2e ARGS` wrote, the status for rows it did not) with a
    timeout that ends the child's whole process group."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        cmd = [sys.executable, "-m", "codellama_rt.bench.e2e", *args,
               "--plan", json.dumps(dataclasses.asdict(plan)), "--out", str(out)]
        # its own session, so a timeout ends the child's compile workers too; run in the scratch folder because
        # `python -m` puts the working directory on sys.path, where a checkout's kernels/ would shadow the
        # PyPI package `kernels` that transformers imports
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=d)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            reason = f"failed: timed out after {timeout_s:.0f} s"
        else:
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            reason = f"failed: child exited {proc.returncode}: {(lines[-1] if lines else '')[:300]}"
            if proc.returncode == 0:
                reason = "failed: child wrote no rows"
        try:
            have = json.loads(out.read_text()) if out.is_file() else []
        except json.JSONDecodeError:  # killed mid-write
            have = []
    return have, reason


def plan_from_json(text: str) -> Plan:
    """The Plan `_run_child` passes as JSON (`dataclasses.asdict`), its lists tuples again."""
    return Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})


def _child_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m codellama_rt.bench.e2e",
                                description="one peer, or the experiment rows of one model, in isolation")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("peer")
    q.add_argument("kind", choices=sorted(PEERS))
    e = sub.add_parser("experiments")
    e.add_argument("--sets", required=True, help="JSON list of lists of experiment names")
    for parser in (q, e):
        parser.add_argument("model", choices=sorted(MODELS))
        parser.add_argument("--plan", required=True)
        parser.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    plan = plan_from_json(a.plan)
    spec = MODELS[a.model]
    model = build(spec, plan.kernel_options())

    def emit(rows):  # write-then-rename: a kill leaves the last complete list
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        tmp.replace(a.out)

    if a.cmd == "peer":
        emit(peer_rows(a.kind, model, spec, plan, emit))
    else:
        emit(experiment_rows(model, spec, plan, json.loads(a.sets), emit))


if __name__ == "__main__":
    _child_main()
