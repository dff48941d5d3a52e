"""Our engine's rows: decode tokens/s with CUDA graphs on and off, time to first token, and the
experiment rows (the same decode with extra kernel paths bound into the backend)."""
from __future__ import annotations

import contextlib
import inspect
import time
from typing import Optional

from ..model.backends import resolve_backend
from ..engine.generate import Engine
from ..kernels.options import KernelOptions
from ..engine.sampling import SamplingParams
from .measure import (cold_prompts, decode_rate, decode_row, error_text, free_memory, peak_gib, random_prompts,
                      reset_peak, ttft_row)
from .plan import OURS, OURS_EAGER, OURS_GRAPHS, ModelSpec, Plan


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


def ours_decode(model, spec: ModelSpec, plan: Plan, provider: str, batch: int, label: Optional[str] = None) -> dict:
    """One decode row of our engine: graphs on (OURS_GRAPHS) or off (OURS_EAGER); label: the row's provider
    name when it is not `provider` (an experiment row)."""
    row = decode_row(spec, label or provider, batch, plan, backend=model.backend)
    device = model.module.device
    try:
        engine = make_engine(model, batch, plan.decode_prompt + plan.decode_tokens, provider == OURS_GRAPHS)
    except Unavailable as e:
        return {**row, "status": f"unavailable: {e}"}
    prompts = random_prompts(model.args.vocab_size, batch, plan.decode_prompt, seed=1000 + batch)
    try:
        reset_peak(device)
        _stamped_run(engine, prompts, plan.decode_tokens)  # warm-up: JIT, graph capture, cache allocation
        _, stamps, ids = _stamped_run(engine, prompts, plan.decode_tokens)
        tok_s, ms = decode_rate(stamps, batch)
        row.update(status="ok", tok_s=tok_s, ms_per_step=ms, peak_gib=peak_gib(device), tokens0=ids,
                   graph_captures=getattr(engine, "captures", None))
    except Exception as e:  # noqa: BLE001 - a failed measurement is a row, not a crash
        row.update(status=f"failed: {error_text(e)}")
    finally:
        del engine
        free_memory()
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


def _cold_run(engine: Engine):
    """`_stamped_run` on `engine` with each call's prompts changed in their first id (a new one per call), so
    the engine's prefix cache never serves a repeat: TTFT rows time a cold prefill of the whole prompt."""
    fresh = cold_prompts(engine.model.args.vocab_size)

    def run(prompts, new_tokens: int):
        return _stamped_run(engine, fresh(prompts), new_tokens)
    return run


def ours_ttft(model, spec: ModelSpec, plan: Plan, label: str = OURS) -> list[dict]:
    """Time to first token (batch 1, a cold prompt) at each prompt length: median of `ttft_repeats` after a
    warm-up."""
    try:
        engine = make_engine(model, 1, max(plan.ttft_prompts) + 1, None)
    except Unavailable as e:
        return [dict(model=spec.name, provider=label, backend=model.backend, prompt_tokens=n,
                     status=f"unavailable: {e}") for n in plan.ttft_prompts]
    rows = [ttft_row(model, spec, plan, label, model.backend, n, _cold_run(engine)) for n in plan.ttft_prompts]
    del engine
    free_memory()
    return rows


def experiment_provider(spec: ModelSpec, names) -> tuple[str, str]:
    """(how, name) of an experiment row: our CUDA-graph decode (eager where graphs cannot run: the CPU
    tests) with `names` on, named after them."""
    how = OURS_GRAPHS if spec.cuda else OURS_EAGER
    return how, f"{how} [{'+'.join(names)}]"


def experiment_rows(model, spec: ModelSpec, plan: Plan, sets, emit=None) -> list[dict]:
    """Per set of experiment names, with the plan's kernel options plus those (`kernel_options_set`): a batch-1
    decode row (`ours_decode`, `experiment_provider`'s) where one of them changes this weight format's decode,
    and TTFT rows (`ours_ttft`, labelled alike) where one changes its prefill; `emit`ted as they come."""
    from ..kernels.options import EXPERIMENTS

    weights, rows = spec.quantize or "dense", []
    for names in sets:
        how, label = experiment_provider(spec, names)
        with kernel_options_set(model, plan.kernel_options(names)):
            if any(weights in EXPERIMENTS[n].weights for n in names):
                rows.append(dict(ours_decode(model, spec, plan, how, 1, label=label), experiments=list(names)))
            if any(weights in EXPERIMENTS[n].prefill for n in names):
                rows += [dict(r, experiments=list(names)) for r in ours_ttft(model, spec, plan, label=label)]
        if emit:
            emit(rows)
    return rows
