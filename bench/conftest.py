"""pytest-benchmark micro-benchmarks of the kernels and the engine (see README.md, "Micro-benchmarks").

    pytest bench --benchmark-only          # from the repository root; or: cd bench && pytest --benchmark-only

On a GPU: real CodeLlama-7B shapes, the triton backend beside the reference; on the CPU: the reference
backend at small shapes (a run takes seconds). Each run is saved with pytest-benchmark's file storage as
`NNNN_<card>_<commit>_<date>.json`, by default under `bench/.benchmarks/<card>/`; the machine info in it
names the card and the code (`codellama_rt.bench.common.provenance`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's default for --benchmark-storage


def card() -> str:
    from codellama_rt.bench.common import card_name

    return card_name()


def card_slug() -> str:
    from codellama_rt.bench.common import card_slug as slug

    return slug({"card": card()})


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own pytest_configure reads the options
def pytest_configure(config):
    """Save every run, named after the card: --benchmark-save NAME or --benchmark-autosave's commit_date tag
    (the default) become `<card>_<NAME or tag>`; without --benchmark-storage, one storage per card under
    bench/.benchmarks, so --benchmark-compare compares runs on the same card."""
    if not config.pluginmanager.hasplugin("benchmark"):
        return
    from pytest_benchmark.utils import get_tag

    opt = config.option
    if opt.benchmark_skip or opt.benchmark_disable:
        return
    opt.benchmark_save = f"{card_slug()}_{opt.benchmark_save or opt.benchmark_autosave or get_tag()}"
    opt.benchmark_autosave = None
    if opt.benchmark_storage == DEFAULT_STORAGE:
        opt.benchmark_storage = f"file://{HERE / '.benchmarks' / card_slug()}"


def pytest_benchmark_update_machine_info(config, machine_info):
    """The card and the versions beside pytest-benchmark's machine info (CPU, Python, host)."""
    import triton

    machine_info.update(card=card(), torch=torch.__version__, triton=triton.__version__,
                        cuda=torch.version.cuda if torch.cuda.is_available() else None)


def pytest_benchmark_update_commit_info(config, commit_info):
    """The code that ran (version, source digest, commit or why it is unknown): pytest-benchmark's own
    commit info is that of the working directory's git, which need not be the code's."""
    from codellama_rt.bench.provenance import provenance

    commit_info["codellama_rt"] = provenance()


def pytest_collection_finish(session):
    """pytest put this folder on sys.path to import the benchmark modules; take it off again, or its
    scripts would shadow packages of the same names for the code under test (a bench/kernels.py once hid
    PyPI's `kernels`, which transformers imports)."""
    while str(HERE) in sys.path:
        sys.path.remove(str(HERE))


# ---- what the benchmarks run on --------------------------------------------------------------------

CUDA = torch.cuda.is_available()
# GPU: CodeLlama-7B's widths, a 2k-token prefill and a 4k-token KV cache; CPU: a small model's
SHAPES = (dict(dim=4096, heads=32, kv_heads=32, head_dim=128, ffn=11008, tokens=2048, cache=4096, dtype=torch.bfloat16)
          if CUDA else
          dict(dim=256, heads=4, kv_heads=2, head_dim=64, ffn=704, tokens=64, cache=256, dtype=torch.float32))
BACKEND_NAMES = ("triton", "reference") if CUDA else ("reference",)


@pytest.fixture(scope="session")
def shapes() -> dict:
    return dict(SHAPES)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(params=BACKEND_NAMES)
def ops(request, device):
    """The backend's op table (`codellama_rt.model.backends`): what the model calls."""
    from codellama_rt.model.backends import resolve_backend

    return resolve_backend(request.param, device)


@pytest.fixture
def timed(benchmark, device):
    """benchmark(fn) that waits for the GPU after each call, so a round times the kernels, not the launch.
    Given `nbytes`, the median's GB/s goes into the saved JSON's extra_info."""
    def run(fn, *, nbytes: int | None = None):
        if device.type == "cuda":
            def call():
                fn()
                torch.cuda.synchronize()
        else:
            call = fn
        result = benchmark(call)
        if nbytes:
            benchmark.extra_info["bytes"] = nbytes
            benchmark.extra_info["gbps_median"] = nbytes / benchmark.stats.stats.median / 1e9
        return result
    return run
