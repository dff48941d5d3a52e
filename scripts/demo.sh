#!/usr/bin/env bash
# Set up, then run `generate` and `infill`. Usage: scripts/demo.sh [MODEL_DIR]
# Without MODEL_DIR this runs the embedded default model (a small model this project trained on
# Python's standard library; see runtime/default_model/README.md). Point it at a downloaded
# CodeLlama for real completions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=()
[ -n "${1:-}" ] && model=(--model "$1")
echo "== generate"
.venv/bin/codellama-rt generate "${model[@]}" --max-new-tokens 48 $'def fibonacci(n):\n'
echo "== infill"
.venv/bin/codellama-rt infill "${model[@]}" --max-new-tokens 32 \
  --prefix $'def read_config(path):\n    with open(path) as f:\n' --suffix $'    return json.loads(data)\n'
