#!/usr/bin/env bash
# Set up (with test dependencies), then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Optional oracles (bitsandbytes for NF4, accelerate for transformers' 4-bit loading): their tests skip
# when these cannot be installed.
.venv/bin/python -m pip --disable-pip-version-check -q install -c scripts/constraints.txt bitsandbytes accelerate \
  || echo "bitsandbytes/accelerate unavailable: their oracle tests will be skipped"
exec .venv/bin/python -m pytest -q "$@"
