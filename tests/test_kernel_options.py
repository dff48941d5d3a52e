"""Kernel options (kernels/options.py): validated once, carried by the backend (its ops bound to them by
`resolve_backend`, `load(kernel_options=...)`), never read from the environment by a launch."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import codellama_rt as cl
from codellama_rt.model.backends import BACKENDS, resolve_backend
from codellama_rt.kernels.options import DEFAULT_OPTIONS, EXPERIMENTS, KernelOptions, parse_experiments

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
CPU = torch.device("cpu")


def test_defaults_and_normalisation():
    """No experiments and PDL on by default; any iterable of names becomes a frozenset (hashable, equal
    options compare equal)."""
    assert DEFAULT_OPTIONS == KernelOptions() == KernelOptions(experiments=[], pdl=True)
    names = sorted(EXPERIMENTS)
    opts = KernelOptions(experiments=(n for n in reversed(names)))
    assert opts.experiments == frozenset(names) and isinstance(opts.experiments, frozenset)
    assert hash(opts) == hash(KernelOptions(experiments=set(names)))
    assert all(opts.has(n) for n in names) and not any(DEFAULT_OPTIONS.has(n) for n in names)
    assert [n for n in names if KernelOptions(experiments={names[0]}).has(n)] == names[:1]


@pytest.mark.parametrize("fields, match", [
    (dict(experiments={"norm_gemv", "fast_please"}), "unknown experiment.*fast_please.*int4_mma"),
    (dict(experiments="norm_gemv"), "iterable of experiment names"),
    (dict(experiments=[1]), "names"),
    (dict(experiments=None), "iterable"),
    (dict(pdl=1), "pdl must be True or False"),
    (dict(pdl="0"), "pdl must be True or False"),
    (dict(cpu_integer_activations=None), "cpu_integer_activations must be True or False"),
])
def test_bad_options_raise_value_error(fields, match):
    with pytest.raises(ValueError, match=match):
        KernelOptions(**fields)


def test_has_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="unknown experiment 'norm_gemw'"):
        DEFAULT_OPTIONS.has("norm_gemw")


def test_from_env_reads_the_given_mapping():
    """CODELLAMA_RT_EXPERIMENTS: a comma list (spaces and empty items ignored); CODELLAMA_RT_PDL=0: PDL off;
    an unknown name is refused naming the variable and listing the known ones."""
    names = sorted(EXPERIMENTS)
    assert KernelOptions.from_env({}) == DEFAULT_OPTIONS
    env = {"CODELLAMA_RT_EXPERIMENTS": " , ".join(reversed(names)) + ",", "CODELLAMA_RT_PDL": "0"}
    assert KernelOptions.from_env(env) == KernelOptions(experiments=names, pdl=False)
    assert KernelOptions.from_env({"CODELLAMA_RT_PDL": "1"}).pdl
    assert parse_experiments(" a,, b ,") == {"a", "b"}
    with pytest.raises(ValueError, match=f"CODELLAMA_RT_EXPERIMENTS: unknown experiment.*fast_please.*{names[0]}"):
        KernelOptions.from_env({"CODELLAMA_RT_EXPERIMENTS": f"{names[0]},fast_please"})
    with pytest.raises(ValueError, match="CODELLAMA_RT_PDL='banana' is invalid"):
        KernelOptions.from_env({"CODELLAMA_RT_PDL": "banana"})


def test_no_launch_path_reads_the_environment():
    """Only `KernelOptions.from_env` may read the environment: a captured CUDA graph would freeze whatever a
    launch read."""
    readers = [p.name for p in sorted(KERNELS.glob("*.py"))
               if p.name != "options.py" and re.search(r"os\.environ|getenv", p.read_text())]
    assert readers == []
    assert len(list(KERNELS.glob("*.py"))) > 5  # the folder really was scanned


def test_a_pdl_kernel_cannot_launch_without_options():
    from codellama_rt.kernels._triton import pdl_enabled
    from codellama_rt.kernels.gemv import _gemv_kernel

    x = torch.empty(1)
    with pytest.raises(TypeError, match="_gemv_kernel.*options"):
        _gemv_kernel.on(x)
    assert _gemv_kernel.on(x, DEFAULT_OPTIONS) is _gemv_kernel.interp  # the interpreter never gets PDL
    assert not pdl_enabled(CPU, DEFAULT_OPTIONS)
    assert not pdl_enabled(torch.device("cuda", 0), KernelOptions(pdl=False))  # off before any CUDA query
    assert not pdl_enabled(torch.device("cuda", 0), False)


# ---- the backend carries them ---------------------------------------------------------------------

def test_resolve_backend_binds_the_triton_ops():
    """Every triton op that takes options is bound to the backend's; the others (prefill/verify attention, int8)
    and the reference backend are left as they are; equal options give the same Backend."""
    opts = KernelOptions(experiments={"attn_one_pass"}, pdl=False)
    tri = resolve_backend("triton", CPU, opts)
    assert tri.options == opts and tri.name == "triton"
    bound = {op for op in ("rms_norm", "rotary", "rotary_attention_decode", "swiglu", "linear", "linear_swiglu",
                           "norm_linear", "linear_int4", "linear_nf4")}
    for op in bound:
        assert getattr(tri, op).keywords == {"options": opts}, op
        assert getattr(tri, op).func is getattr(BACKENDS["triton"], op), op
    assert tri.attention_prefill is BACKENDS["triton"].attention_prefill
    assert tri.attention_verify is BACKENDS["triton"].attention_verify
    assert tri.linear_int8 is BACKENDS["triton"].linear_int8
    assert resolve_backend("triton", CPU, KernelOptions(experiments=["attn_one_pass"], pdl=False)) is tri
    assert resolve_backend("triton", CPU).options == DEFAULT_OPTIONS
    assert resolve_backend("reference", CPU, opts) is BACKENDS["reference"]
    with pytest.raises(ValueError, match="options must be a KernelOptions"):
        resolve_backend("triton", CPU, {"pdl": False})


def _decode_inputs(B=1, H=4, Hkv=2, S=512, D=16):
    """A decode step's arguments for `rotary_attention_decode` (fp32, CPU), with a split KV cache."""
    from codellama_rt.kernels.rotary import rope_tables

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, 1, D, generator=g) for n in (H, Hkv, Hkv))
    cos, sin = rope_tables(D, S, 1e4)
    caches = [torch.randn(B, Hkv, S, D, generator=g) for _ in range(2)]
    lengths = torch.full((B,), S, dtype=torch.long)
    return q, k, v, cos, sin, (lengths - 1)[:, None], *caches, lengths - 1, lengths


def test_a_backend_with_an_experiment_runs_its_path(monkeypatch):
    """A triton backend resolved with "attn_one_pass" launches decode attention's pass 1 alone (the same
    output); the default backend still launches pass 2."""
    from codellama_rt.kernels import attention_decode

    reduce = attention_decode._decode_reduce_kernel
    launches = []

    class Counting:
        def __getitem__(self, grid, real=reduce.interp):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(reduce, "interp", Counting())
    want = resolve_backend("triton", CPU).rotary_attention_decode(*_decode_inputs())
    assert len(launches) == 1
    got = resolve_backend("triton", CPU, KernelOptions(experiments={"attn_one_pass"})).rotary_attention_decode(
        *_decode_inputs())
    assert len(launches) == 1 and torch.equal(got, want)


# ---- load(kernel_options=...) ---------------------------------------------------------------------

def test_load_takes_kernel_options(hf_checkpoint, monkeypatch):
    """None is the library default whatever the environment says; a KernelOptions or a dict of its fields
    reaches the model's backend."""
    path, _ = hf_checkpoint()
    monkeypatch.setenv("CODELLAMA_RT_EXPERIMENTS", "attn_rope")  # the library never reads it
    monkeypatch.setenv("CODELLAMA_RT_PDL", "0")
    assert cl.load(path, backend="triton").module.ops.options == KernelOptions()
    opts = cl.KernelOptions(experiments={"attn_rope"})
    assert cl.load(path, backend="triton", kernel_options=opts).module.ops.options is opts
    got = cl.load(path, backend="triton", kernel_options={"experiments": ["attn_rope"], "pdl": False})
    assert got.module.ops.options == KernelOptions(experiments={"attn_rope"}, pdl=False)


@pytest.mark.parametrize("value, match", [
    ("attn_rope", "kernel_options='attn_rope' is invalid"),
    (["attn_rope"], "kernel_options=.* is invalid"),
    ({"experiments": ["fast_please"]}, "kernel_options: unknown experiment.*fast_please"),
    ({"pdl": "no"}, "kernel_options: pdl must be True or False"),
    ({"experiment": ["attn_rope"]}, "kernel_options: unknown field.*'experiment'.*cpu_integer_activations"),
    ({"cpu_integer_activations": 0}, "kernel_options: cpu_integer_activations must be True or False"),
])
def test_load_refuses_bad_kernel_options(tmp_path, value, match):
    with pytest.raises(ValueError, match=match):  # before the path is looked at
        cl.load(tmp_path / "no-model", backend="triton", kernel_options=value)
