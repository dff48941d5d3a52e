#!/usr/bin/env bash
# Set up (with test dependencies), then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Optional oracles (bitsandbytes for NF4, accelerate for transformers' 4-bit loading): their tests skip
# when these cannot be installed.
.venv/bin/python -m pip --disable-pip-version-check -q install -c scripts/constraints.txt bitsandbytes accelerate \
  || echo "bitsandbytes/accelerate unavailable: their oracle tests will be skipped"
# .venv/bin/pytest, not `python -m pytest`: that puts the working directory first on sys.path, where this
# repository's kernels/ would shadow the PyPI package `kernels` that transformers imports
# Tests run in parallel processes (pytest-xdist), one per core up to 4, handed out as workers free up; pass
# `-n 0` to run them in this process.
exec .venv/bin/pytest -q -n auto --maxprocesses 4 --dist worksteal "$@"
