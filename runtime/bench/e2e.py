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
(`python -m codellama_rt.bench.child peer ...`) that rebuild the same weights from the seed, so a compile
that hangs or crashes costs its timeout and a "failed: ..." row, never the report.

Decode timing: a warm-up run, then a run whose per-token host timestamps (the engine syncs once per
token to stream) give tokens/s = batch * (n - 1) / (t_last - t_first); TTFT = first token - call start.

This module is the one face the report uses; the work lives in `plan` (what is measured), `bound` (the
bandwidth bound), `measure` (shared timing helpers), `ours` (our engine's rows), `peers` (torch.compile and
transformers) and `child` (rows measured in a child process with a timeout).
"""

from .bound import decode_bound, decode_step_bytes, weights_read_per_token
from .child import experiment_rows_isolated, peer_rows_isolated
from .measure import IdTokenizer, build, error_text, free_memory, random_prompts
from .ours import (Unavailable, engine_has_graphs, experiment_provider, experiment_rows, kernel_options_set,
                   make_engine, ours_decode, ours_ttft)
from .peers import compiled_reference_decode, hf_model, hf_rows, missing_peer_rows, peer_rows, peer_unavailable
from .plan import (COMPILE, CPU_ESTIMATES, CPU_MODELS, GPU_ESTIMATES, GPU_MODELS, HF, M100, MODELS, OURS,
                   OURS_EAGER, OURS_GRAPHS, PEERS, SEED, TINY, ModelSpec, Plan, make_plan, plan_from_json,
                   plan_uses_gpu)

__all__ = [
    "COMPILE", "CPU_ESTIMATES", "CPU_MODELS", "GPU_ESTIMATES", "GPU_MODELS", "HF", "M100", "MODELS", "OURS",
    "OURS_EAGER", "OURS_GRAPHS", "PEERS", "SEED", "TINY", "IdTokenizer", "ModelSpec", "Plan", "Unavailable",
    "build", "compiled_reference_decode", "decode_bound", "decode_step_bytes", "engine_has_graphs",
    "error_text", "experiment_provider", "experiment_rows", "experiment_rows_isolated", "free_memory",
    "hf_model", "hf_rows", "kernel_options_set", "make_engine", "make_plan", "missing_peer_rows",
    "ours_decode", "ours_ttft", "peer_rows", "peer_rows_isolated", "peer_unavailable", "plan_from_json",
    "plan_uses_gpu", "random_prompts", "weights_read_per_token",
]
