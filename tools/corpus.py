"""The corpus the default model's tools share: tools/train_default_model.py trains on it and
tools/eval_default_model.py measures on its held-out part.

- which files: the `.py` files of the running interpreter's standard library, split by a hash of each
  file's relative path into training and held-out files (`corpus_split`), and the test suites that
  `--with-tests` adds (`test_suite_files`);
- how source is cut: runs of whole lines (`chunks`), plain causal token rows (`plain_tokens`, `rows`);
- the held-out functions the completion and infilling measures use (`held_out_functions`, `header`) and
  where a completion's function ends (`function_end`, `parses`).

The tools are scripts (`python tools/x.py`), whose own directory is on sys.path: they `import corpus`.
Tests load it by file path (tests/tool_modules.py).
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codellama_rt import Tokenizer

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "encodings",
                 "__pycache__"}
HELD_OUT_PER_MILLE = 50  # 5% of files, chosen by hash of the relative path
TEST_DIRS = ("test", "tests", "idle_test")  # the standard library's own test suites: `--with-tests`


# ---- files ------------------------------------------------------------------------------------

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def held_out(rel: Path) -> bool:
    """Whether the file at `rel` (relative to the standard library) is held out: by a hash of the path."""
    return int(hashlib.sha1(rel.as_posix().encode()).hexdigest(), 16) % 1000 < HELD_OUT_PER_MILLE


def corpus_split(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the standard library, each sorted by relative path."""
    root = root or stdlib_root()
    train, held = [], []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        (held if held_out(rel) else train).append(f)
    return train, held


def test_suite_files(root: Path | None = None) -> list[Path]:
    """Extra training files for `--with-tests`: the `.py` files under the standard library's test
    directories that parse as Python (its test suite also holds deliberately broken files), minus the
    ones whose hash would hold them out, so the held-out set stays exactly `corpus_split`'s. Sorted."""
    root = root or stdlib_root()
    excluded = EXCLUDED_DIRS - set(TEST_DIRS)
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if excluded.intersection(rel.parts[:-1]) or not set(TEST_DIRS).intersection(rel.parts[:-1]) \
                or held_out(rel):
            continue
        try:
            ast.parse(read_source(f))
        except (SyntaxError, ValueError):
            continue
        out.append(f)
    return out


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def chunks(text: str, max_chars: int, trim: bool = False) -> list[str]:
    """Split source into runs of whole lines of at most ~max_chars, preferring breaks at blank lines
    (which then start the next run, unless `trim` drops a run's leading blank lines)."""
    out, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if cur and size + len(line) > max_chars:
            cut = max((i for i, c in enumerate(cur) if not c.strip()), default=0)
            if cut < len(cur) // 2:  # no blank line in the second half: cut here
                cut = len(cur)
            out.append("".join(cur[:cut]))
            cur, size = cur[cut:], sum(len(c) for c in cur[cut:])
        cur.append(line)
        size += len(line)
    if cur:
        out.append("".join(cur))
    if trim:
        out = [c[len(c) - len(c.lstrip("\n")):] if c.strip() else c for c in out]
    return [c for c in out if c.strip()]


# ---- tokens -----------------------------------------------------------------------------------

def plain_tokens(files: list[Path], tok: Tokenizer, max_chars: int) -> np.ndarray:
    """Held-out text as plain causal examples, in file order: int32 [n_tokens]."""
    out = []
    for f in files:
        parts = chunks(read_source(f), max_chars)
        for k, p in enumerate(parts):
            out += tok.encode(p, add_bos=True, add_eos=k == len(parts) - 1)
    return np.asarray(out, dtype=np.int32)


def rows(tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens: int64 [n_rows, seq_len + 1]."""
    n = len(tokens) // (seq_len + 1)
    return torch.from_numpy(tokens[: n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)


# ---- held-out functions -----------------------------------------------------------------------

@dataclass(frozen=True)
class HeldOutFunction:
    src: str                # the function's source, dedented
    file_lines: tuple       # its file's lines (with their line ends)
    first_line: int         # index in file_lines of the function's first line


def held_out_functions(held_files, min_lines: int = 3, max_lines: int = 40) -> list[HeldOutFunction]:
    """Every function of the held-out files with min..max lines, in file order."""
    out = []
    for f in held_files:
        text = read_source(f)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = tuple(text.splitlines(keepends=True))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                src = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
                if min_lines <= src.count("\n") <= max_lines and parses(src) and header(src).endswith(":\n"):
                    out.append(HeldOutFunction(src, lines, node.lineno - 1))
    return out


def parses(src: str) -> bool:
    try:
        ast.parse(src)
        return True
    except SyntaxError:
        return False


def header(func_src: str) -> str:
    """The `def ...:` line(s) of a function, through the line where its signature ends."""
    body = ast.parse(func_src).body[0].body[0]
    return "".join(func_src.splitlines(keepends=True)[:body.lineno - 1])


def function_end(program: str, header_lines: int, hit_limit: bool) -> str:
    """`program` (a header of `header_lines` lines + its completion) cut before the first top-level line
    after the header; if the generation ran out of tokens inside the function, an unfinished last line
    is dropped (the statements before it must still parse)."""
    lines = program.splitlines(keepends=True)
    for i in range(header_lines, len(lines)):
        if lines[i].strip() and not lines[i][0].isspace():
            return "".join(lines[:i])
    if hit_limit and len(lines) > header_lines + 1 and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    return "".join(lines)
