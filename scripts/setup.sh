#!/usr/bin/env bash
# Create .venv and install codellama-rt (editable) with the serve extra (`codellama-rt serve`).
# Usage: scripts/setup.sh [--test]
# A CPU-only machine gets torch 2.13.0 first so pip never pulls the multi-GB CUDA build by accident;
# set TORCH_SPEC to choose another torch (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
extra="[serve]"
[ "${1:-}" = "--test" ] && extra="[serve,test]"
# Without build isolation, so the build sees the venv's torch and compiles the native CPU kernels (csrc/;
# skipped with a notice where no C++ compiler works).
pip install "setuptools>=64" wheel
pip install --use-pep517 --no-build-isolation -c scripts/constraints.txt -e ".${extra}"
