"""Ahead-of-time compilation of every Triton kernel at the launch configurations the launchers use,
for sm_80 and sm_90, without a GPU: the resource table the compile test checks and bench/ reports.
The model shapes come from the caller (`shapes.ModelShape`s; the runtime's are
`codellama_rt.bench.common.aot_models()`), so kernels/ never imports the runtime's presets."""
from __future__ import annotations

import importlib

from ._triton import SHARED_LIMIT, CompiledResources, LaunchConfig, compile_for

KERNEL_MODULES = ("rms_norm", "rotary", "swiglu", "attention_prefill", "attention_decode", "nf4", "nf4_frag",
                  "nf4_dequant", "int4", "int4_frag", "int4_dequant", "gemv")
ARCHS = (80, 90)


def all_configs(models) -> list[LaunchConfig]:
    """Every module's `aot_configs(models)` for `models` (ModelShapes), in KERNEL_MODULES order."""
    configs = []
    for name in KERNEL_MODULES:
        configs += importlib.import_module(f"{__package__}.{name}").aot_configs(models)
    return configs


def resource_table(models, archs=ARCHS) -> list[CompiledResources]:
    """`compile_for` of every config of `all_configs(models)` for each of `archs`."""
    return [compile_for(cfg, arch) for cfg in all_configs(models) for arch in archs]


def problems(rows: list[CompiledResources]) -> list[str]:
    """Spills and shared memory over the card's limit, one line each (empty when all is well)."""
    out = []
    for r in rows:
        if r.spills:
            out.append(f"{r.kernel} [{r.label}] sm_{r.arch}: spills (stack {r.stack_bytes} B, local {r.local_bytes} B)")
        if r.shared_bytes > SHARED_LIMIT[r.arch]:
            out.append(f"{r.kernel} [{r.label}] sm_{r.arch}: shared {r.shared_bytes} B > {SHARED_LIMIT[r.arch]} B")
    return out


def format_table(rows: list[CompiledResources]) -> str:
    """A Markdown table: kernel, config, arch, warps, registers, shared memory, spills."""
    lines = ["| kernel | config | arch | warps | registers | shared (B) | spill (B) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.label} | sm_{r.arch} | {r.num_warps} | {r.registers} | {r.shared_bytes} | "
                     f"{r.stack_bytes + r.local_bytes} |")
    return "\n".join(lines)

