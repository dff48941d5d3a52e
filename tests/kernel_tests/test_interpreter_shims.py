"""The interpreter shims: refused on Triton versions they were not written for, and never imported by the
CUDA launch path (kernels import and compile without them)."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("version", ["3.5.1", "3.7.0", "4.0.0", "3.60.0", "nightly"])
def test_unsupported_triton_versions_are_refused_with_the_range(version):
    from codellama_rt.kernels._interpreter_shims import SUPPORTED_RANGE, check_triton_version

    with pytest.raises(ImportError, match=f"triton{SUPPORTED_RANGE}.*found triton {version}"):
        check_triton_version(version)


@pytest.mark.parametrize("version", ["3.6.0", "3.6.1", "3.6.0+git1234abcd"])
def test_supported_triton_versions_pass(version):
    from codellama_rt.kernels._interpreter_shims import check_triton_version

    check_triton_version(version)


def test_setup_pins_the_supported_range():
    from pathlib import Path

    from codellama_rt.kernels._interpreter_shims import SUPPORTED_RANGE

    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert f'"triton{SUPPORTED_RANGE}"' in setup


@pytest.mark.slow
def test_kernels_import_and_compile_ahead_of_time_without_the_shims():
    """Importing every kernel module and the backend table, and typing an AOT launch (what a CUDA process
    does), loads no interpreter shim; the first CPU launch does."""
    code = (
        "import sys, torch\n"
        "import codellama_rt.model.backends\n"
        "from codellama_rt.kernels import aot, rms_norm\n"
        "from codellama_rt.bench.common import aot_models\n"
        "rms_norm.aot_configs(aot_models()[:1])\n"
        "assert 'codellama_rt.kernels._interpreter_shims' not in sys.modules\n"
        "rms_norm.rms_norm(torch.ones(1, 16), torch.ones(16), 1e-5)\n"
        "assert 'codellama_rt.kernels._interpreter_shims' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_launch_leaves_the_language_as_it_found_it():
    """The shims patch triton.language (and .core, .math) for a whole grid, device functions included
    (tl.sum reaches the language through triton.language.core); after the launch every name is the
    original again, and the kernel's result is right."""
    import torch
    import triton.language as tl

    from codellama_rt.kernels import rms_norm

    modules = (tl, tl.core, tl.math, tl.core.tensor)

    def snapshot():
        return {(id(m), n): getattr(m, n) for m in modules for n in dir(m) if not n.startswith("__")}

    before = snapshot()
    x, w = torch.randn(3, 40), torch.rand(40)
    torch.testing.assert_close(rms_norm.rms_norm(x, w, 1e-5), rms_norm.rms_norm_ref(x, w, 1e-5),
                               rtol=1e-5, atol=1e-6)
    after = snapshot()
    assert after.keys() == before.keys()
    changed = [key[1] for key in before if after[key] is not before[key]]
    assert not changed, changed
