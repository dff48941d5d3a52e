"""What an end-to-end report measures: the provider names, the benchmark models (`ModelSpec`, `MODELS`),
the measurement matrix (`Plan`, `make_plan`) and its JSON form for child processes."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from ..model.config import ModelArgs
from ..kernels.options import DEFAULT_OPTIONS, EXPERIMENTS, KernelOptions

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


def plan_from_json(text: str) -> Plan:
    """The Plan `_run_child` passes as JSON (`dataclasses.asdict`), its lists tuples again."""
    return Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})
