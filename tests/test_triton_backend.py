"""End to end: the unchanged module graph on backend="triton" (interpreter on CPU, fp32) gives the
reference backend's logits and greedy tokens on tiny checkpoints written by transformers."""
from __future__ import annotations

import pytest

import codellama_rt as cl

REL_TOL = 2e-3  # max|Δ| / max|ref| (issue bar)

CONFIGS = [
    pytest.param(dict(dim=256, n_heads=4, n_kv_heads=4, rope_theta=1e4), id="mha-d64"),
    pytest.param(dict(dim=256, n_heads=4, n_kv_heads=1, rope_theta=1e6), id="gqa4-d64"),
    pytest.param(dict(dim=512, n_heads=8, n_kv_heads=1, rope_theta=1e6), id="gqa8-d64"),
]
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n"


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS)
def test_triton_backend_matches_reference(hf_checkpoint, cfg):
    path, _ = hf_checkpoint(n_layers=2, ffn=160, **cfg)
    ref = cl.load(path, backend="reference", max_seq_len=128, max_batch_size=2)
    tri = cl.load(path, backend="triton", max_seq_len=128, max_batch_size=2)
    assert tri.backend == "triton" and ref.backend == "reference"
    ids = ref.tokenizer.encode(PROMPT)
    a, b = tri.logits(ids), ref.logits(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() < REL_TOL
    prompts = [PROMPT, "import os"]
    got = tri.generate(prompts, max_new_tokens=10)
    want = ref.generate(prompts, max_new_tokens=10)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_auto_backend_is_cpu_on_cpu(hf_checkpoint):
    """On a CPU, auto is the reference ops with torch's packed int4 kernel (tests/test_int4_cpu.py)."""
    path, _ = hf_checkpoint()
    assert cl.load(path, backend="auto", device="cpu").backend == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_bitwise_experiments_keep_the_tokens(hf_checkpoint, monkeypatch, quantize):
    """The one-pass and rope-in-attention experiments compute the paths they replace bit for bit, so decoding
    through a model loaded with them on (`kernel_options`, a KernelOptions or a dict; GQA, split decode
    attention, split-K int4 GEMVs in the interpreter) gives the default options' tokens."""
    from codellama_rt.kernels import attention_decode, int4

    reduce_kernels = [attention_decode._decode_reduce_kernel] + ([int4._int4_splitk_reduce_kernel] if quantize else [])
    launches = {k: 0 for k in reduce_kernels}
    for k in reduce_kernels:
        real = k.interp

        class Counting:
            def __getitem__(self, grid, k=k, real=real):
                launches[k] += 1
                return real[grid]

        monkeypatch.setattr(k, "interp", Counting())
    # one layer: the experiments replace kernels inside a layer, and the int4 GEMVs are the interpreter's
    # slowest programs
    path, _ = hf_checkpoint(n_layers=1, ffn=256, dim=256, n_heads=4, n_kv_heads=2, rope_theta=1e6)
    prompts = [PROMPT, "import os"]
    on = ["attn_one_pass", "int4_one_pass", "attn_rope"]
    runs = []
    for options in (None, {"experiments": on} if quantize else cl.KernelOptions(experiments=on)):
        model = cl.load(path, backend="triton", max_seq_len=128, max_batch_size=2, quantize=quantize,
                        kernel_options=options)
        assert model.module.ops.options.experiments == (set(on) if options else set())
        runs.append([c.token_ids for c in model.generate(prompts, max_new_tokens=8, temperature=0.8, seed=3)])
        if options is None:  # the default path splits (so the experiments have partials to combine) ...
            assert all(launches.values()), launches
            launches = dict.fromkeys(launches, 0)
    assert not any(launches.values()), launches  # ... and with them on, no second pass runs
    assert runs[0] == runs[1] and all(len(t) == 8 for t in runs[0])


@pytest.mark.slow
def test_experiments_keep_the_greedy_tokens(hf_checkpoint):
    """Every experiment on and PDL off (on the CPU the bitwise experiments run and the CUDA-only ones change
    nothing): the default options' greedy tokens."""
    from codellama_rt.kernels.options import EXPERIMENTS

    path, _ = hf_checkpoint(n_layers=2, ffn=256, dim=256, n_heads=4, n_kv_heads=2, rope_theta=1e6)
    runs = []
    for options in (None, cl.KernelOptions(experiments=EXPERIMENTS, pdl=False)):
        model = cl.load(path, backend="triton", max_seq_len=128, kernel_options=options)
        runs.append(model.generate(PROMPT, max_new_tokens=8).token_ids)
    assert runs[0] == runs[1] and len(runs[0]) == 8


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int4", "nf4"])
def test_frag_experiment_decodes_through_the_fragment_gemv(hf_checkpoint, monkeypatch, quantize):
    """A bf16 int4 / NF4 model loaded with the experiment "int4_frag" / "nf4_frag": its decode rows run the
    fragment-order GEMV (the Gluon kernel's Triton twin in the interpreter; prefill keeps the GPTQ / bitsandbytes
    layout GEMM) and its greedy tokens are the default options' (the two paths differ by fp32 summation order and
    weight rounding)."""
    import importlib

    import torch

    twin = getattr(importlib.import_module(f"codellama_rt.kernels.{quantize}_frag"), f"_{quantize}_frag_gemv_twin")
    real, launches = twin.interp, []

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(twin, "interp", Counting())
    path, _ = hf_checkpoint(n_layers=2, ffn=256, dim=256, n_heads=4, n_kv_heads=2, rope_theta=1e6)
    runs = []
    for options in (None, {"experiments": [f"{quantize}_frag"]}):
        model = cl.load(path, backend="triton", max_seq_len=128, quantize=quantize, dtype=torch.bfloat16,
                        kernel_options=options)
        runs.append(model.generate(PROMPT, max_new_tokens=6).token_ids)
        assert bool(launches) == (options is not None)
    assert runs[0] == runs[1] and len(runs[0]) == 6
