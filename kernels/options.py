"""Kernel options: which kernel paths a model's launches take (the experiments, programmatic dependent
launch), as one explicit value the backend binds into its ops (`resolve_backend`) instead of something a
launch reads from the environment; a captured CUDA graph then replays the paths its model was built with.
The environment variables below are only the command line's defaults (`KernelOptions.from_env`).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Optional

EXPERIMENTS_ENV = "CODELLAMA_RT_EXPERIMENTS"
PDL_ENV = "CODELLAMA_RT_PDL"


# ---- experiments -------------------------------------------------------------------------------
#
# Kernel paths that are built and tested (interpreter, AOT compile, `gpu` tests) but not yet the default,
# because no GPU run has measured them against the path they would replace. KernelOptions(experiments=...)
# turns them on (CLI: --experiments, default CODELLAMA_RT_EXPERIMENTS, a comma-separated list of the names
# below); the benchmark report measures each (a decode row per experiment beside the default one), so one
# device call shows which to make the default.

@dataclass(frozen=True)
class Experiment:
    doc: str
    weights: tuple  # the weight formats whose decode it changes: "dense" (16-bit), "int4", "nf4"
    prefill: tuple = ()  # the weight formats whose prefill it changes


EXPERIMENTS = {
    "int4_mma": Experiment("int4 decode rows (M <= 16) on the tensor-core GEMV (kernels/int4.py)", ("int4",)),
    "int4_frag": Experiment("int4 decode rows (M <= 16, bf16, input widths of whole 64s) on the Gluon tensor-core GEMV "
                            "from a fragment-order copy of the weight made on first use (kernels/int4_frag.py)",
                            ("int4",)),
    "nf4_frag": Experiment("NF4 decode rows (M <= 16, bf16/fp16, blocksize 64, input widths of whole 64s) on the "
                           "Gluon tensor-core GEMV with a per-lane shared-memory pair table, from a fragment-order "
                           "copy of the weight made on first use (kernels/nf4_frag.py)", ("nf4",)),
    "nf4_dequant_gemm": Experiment("NF4 prefill rows (M > 16): the weight dequantized by a Triton kernel (bitwise "
                                   "bitsandbytes'), then the dense GEMM (cuBLAS), instead of the fused dequant-GEMM "
                                   "(kernels/nf4_dequant.py)", (), prefill=("nf4",)),
    "int4_dequant_gemm": Experiment("int4 prefill rows (M > 16): the weight dequantized by a Triton kernel, then "
                                    "the dense GEMM (cuBLAS), instead of the fused dequant-GEMM "
                                    "(kernels/int4_dequant.py)", (), prefill=("int4",)),
    "draft_graphs": Experiment("speculate='draft' with greedy requests: the draft's one-id steps of a proposal as "
                               "one CUDA graph replay (runtime/engine/draft_graph.py)", ()),
    "norm_gemv": Experiment("batch-1 decode's RMSNorm (and residual add) inside the next dense GEMV "
                            "(kernels/gemv.py)", ("dense",)),
    "attn_one_pass": Experiment("decode attention's split combine done by each head's last program, no second "
                                "launch (kernels/attention_decode.py)", ("dense", "int4", "nf4")),
    "int4_one_pass": Experiment("int4 split-K GEMV partials summed by each column block's last program, no "
                                "second launch (kernels/int4.py)", ("int4",)),
    # every model's lm_head is dense
    "attn_rope": Experiment("decode's rotary and KV-cache write inside decode attention, no launch of their "
                            "own (kernels/attention_decode.py)", ("dense", "int4", "nf4")),
    "gemv_prefetch": Experiment("the dense GEMV asks for its weights into L2 before waiting on the previous "
                                "kernel (PDL launches only; kernels/gemv.py)", ("dense", "int4", "nf4")),
}


def parse_experiments(text: str) -> frozenset:
    """A comma-separated list of experiment names -> the set of them (spaces and empty items ignored;
    names are checked by KernelOptions)."""
    return frozenset(n.strip() for n in text.split(",") if n.strip())


@dataclass(frozen=True)
class KernelOptions:
    """The kernel paths one model's launches take.

    experiments: names of EXPERIMENTS to turn on (any iterable of str; kept as a frozenset).
    pdl: launch kernels that support it with programmatic dependent launch (sm_90+ GPUs only).
    cpu_bf16_prefill: the cpu backend multiplies int8, int4 and NF4 weights by prefill rows (more than 16 in a call)
    in bf16 (activations, weights and outputs rounded to bf16, sums in fp32) on CPUs with AVX512-BF16 or AMX,
    where that GEMM measured ~3.5x torch's fp32 one; False keeps fp32 (`kernels/cpu_gemm.py`).
    cpu_integer_activations: on CPUs whose native kernels are built for AVX2 without AVX-512, the cpu backend
    rounds decode rows (up to 16 in a call) to integers before multiplying integer weights, so the products are
    integers: int16 in blocks of 64 inputs against int8 weights (`int8_format.quantize_x16`: ~1e-5 of each
    block's largest input; one row ~1.2-1.4x the fp32 products' rate, a 9-row verify pass ~0.7x), int8 in blocks
    of 32 against int4 weights (`quantize_x8`: up to 1/254 of each block's largest, llama.cpp's q4_0 x q8_0
    arithmetic; one row ~1.2x, nine ~1.4x). NF4 keeps fp32 products. False keeps fp32 products everywhere.
    """

    experiments: frozenset = frozenset()
    pdl: bool = True
    cpu_bf16_prefill: bool = True
    cpu_integer_activations: bool = True

    def __post_init__(self):
        names = self.experiments
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise ValueError(f"experiments must be an iterable of experiment names, got {names!r}")
        names = frozenset(names)
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"experiments must be names (str), got {sorted(map(repr, names))}")
        unknown = sorted(names - EXPERIMENTS.keys())
        if unknown:
            raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; "
                             f"expected some of {', '.join(EXPERIMENTS)}")
        for name in ("pdl", "cpu_bf16_prefill", "cpu_integer_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "experiments", names)

    def has(self, name: str) -> bool:
        """Whether experiment `name` (a key of EXPERIMENTS) is on."""
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
        return name in self.experiments

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "KernelOptions":
        """The options CODELLAMA_RT_EXPERIMENTS (comma-separated names) and CODELLAMA_RT_PDL ("0": off, "1": on)
        ask for in `environ` (default: os.environ), read once; a ValueError names the variable."""
        environ = os.environ if environ is None else environ
        pdl = environ.get(PDL_ENV, "1").strip()
        if pdl not in ("0", "1", ""):
            raise ValueError(f"{PDL_ENV}={pdl!r} is invalid: expected 0 (off) or 1 (on)")
        try:
            return cls(experiments=parse_experiments(environ.get(EXPERIMENTS_ENV, "")), pdl=pdl != "0")
        except ValueError as e:
            raise ValueError(f"{EXPERIMENTS_ENV}: {e}") from None


DEFAULT_OPTIONS = KernelOptions()
_FIELDS = tuple(f.name for f in fields(KernelOptions))


def parse_kernel_options(value) -> KernelOptions:
    """`kernel_options` as given to `load`: None (`KernelOptions()`), a KernelOptions, or a dict of its
    fields; anything else, or a bad field, is a ValueError naming `kernel_options`."""
    if value is None:
        return KernelOptions()
    if isinstance(value, KernelOptions):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"kernel_options={value!r} is invalid: expected a KernelOptions, a dict of its fields "
                         f"({', '.join(_FIELDS)}) or None")
    unknown = sorted(set(value) - set(_FIELDS), key=str)
    if unknown:
        raise ValueError(f"kernel_options: unknown field(s) {', '.join(map(repr, unknown))}; "
                         f"expected {', '.join(_FIELDS)}")
    try:
        return KernelOptions(**value)
    except ValueError as e:
        raise ValueError(f"kernel_options: {e}") from None
