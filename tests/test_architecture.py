"""The package's shape: no import cycle among its modules (lazy imports inside functions count: a cycle
they hide is still two modules that need each other), and no runtime module over ~400 lines unless its
docstring says why."""
from __future__ import annotations

import ast
from pathlib import Path

import codellama_rt
import codellama_rt.kernels

PACKAGE = "codellama_rt"
ROOTS = {PACKAGE: Path(codellama_rt.__file__).parent, f"{PACKAGE}.kernels": Path(codellama_rt.kernels.__file__).parent}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Every module of the installed package: dotted name -> file (package __init__s under the package's name)."""
    found = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("").parts
            if "default_model" in rel or (prefix == PACKAGE and rel[0] == "kernels"):
                continue
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            found[".".join((prefix, *parts))] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package's modules that `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module
                target = f"{base}.{a.name}"
                out.add(target if target in modules else base)
    return {m for m in out if m in modules and m != name}


def _cycle(graph: dict) -> list | None:
    """One import cycle of `graph` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_module_discovery_sees_the_layout():
    modules = _modules()
    for name in ("codellama_rt.api", "codellama_rt.model.transformer", "codellama_rt.checkpoint.loader",
                 "codellama_rt.engine.generate", "codellama_rt.cli.app", "codellama_rt.kernels.rms_norm"):
        assert name in modules
    imports = {name: _imports(name, modules[name], modules) for name in ("codellama_rt.api", "codellama_rt.cli.app",
                                                                         "codellama_rt.checkpoint.writer")}
    assert "codellama_rt.engine.generate" in imports["codellama_rt.api"]  # from .engine.generate import ...
    assert "codellama_rt.cli.generate" in imports["codellama_rt.cli.app"]  # from . import generate
    assert "codellama_rt.checkpoint.layouts" in imports["codellama_rt.checkpoint.writer"]


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them
    for name in graph:
        if modules[name].name == "__init__.py":
            graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_no_runtime_module_over_the_size_limit_without_a_reason():
    long = []
    for name, path in _modules().items():
        if name.startswith(f"{PACKAGE}.kernels"):
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if lines > MAX_LINES and f"over {MAX_LINES} lines" not in doc:
            long.append(f"{name} ({lines} lines)")
    assert not long, f"modules over {MAX_LINES} lines whose docstring does not say why: {long}"
