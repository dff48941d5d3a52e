"""The scripts in tools/ and bench/ as modules for the tests, loaded by file path.

tools/ is not a package: its scripts run as `python tools/x.py`, which puts tools/ on sys.path, and they
import their shared modules (tools/corpus.py, tools/probes.py) by plain name. Neither tools/ nor the
repository root goes on sys.path here: the root would let this repository's kernels/ shadow the PyPI
package `kernels` that transformers imports. Instead each file is loaded with importlib under the name
a script would import it by, the shared modules first, so a tool's `from corpus import ...` finds them
in sys.modules. bench/'s scripts import only the package; each loads as `bench_<name>`.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"
BENCH = TOOLS.parent / "bench"
SHARED = ("corpus", "probes", "copy_edit")  # in dependency order: probes and copy_edit import corpus


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as the module `name` (loaded once; its shared modules before it)."""
    for dep in SHARED:
        if dep != name:
            _load(dep, TOOLS / f"{dep}.py")
        else:
            break
    return _load(name, TOOLS / f"{name}.py")


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as the module `bench_<name>` (loaded once)."""
    return _load(f"bench_{name}", BENCH / f"{name}.py")


def _load(name: str, path: Path) -> ModuleType:
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() != path:
            raise ImportError(f"a module named {name!r} other than {path} is already imported")
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as the import system does (dataclasses look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
