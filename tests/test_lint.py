"""The repository passes `ruff check` (rules and exclusions: ruff.toml at the root)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff_command() -> list[str]:
    """ruff from this interpreter's environment (`pip install -e .[test]`), else from PATH; skips without it."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    if found := shutil.which("ruff"):
        return [found]
    pytest.skip("ruff is not installed (it is in the `test` extra: pip install -e '.[test]')")


def test_ruff_check_passes():
    proc = subprocess.run([*ruff_command(), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"
