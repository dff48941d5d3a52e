#!/usr/bin/env bash
# Set up, then run `generate` and `infill`. Usage: scripts/demo.sh [MODEL_DIR]
# Without MODEL_DIR this uses a tiny random-weight model built on the spot (its output is gibberish)
# until the embedded default model ships; point it at a downloaded CodeLlama for real output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL="${1:-}"
if [ -z "$MODEL" ]; then
  MODEL=.demo/tiny-random
  [ -f "$MODEL/config.json" ] || .venv/bin/python -m codellama_rt.tiny --out "$MODEL"
  echo "(no model given: tiny random weights, so the text below is noise; pass a CodeLlama directory for real output)"
fi
echo "== generate"
.venv/bin/codellama-rt generate --model "$MODEL" --max-new-tokens 40 'def fibonacci(n):'
echo "== infill"
.venv/bin/codellama-rt infill --model "$MODEL" --max-new-tokens 40 \
  --prefix $'def remove_non_ascii(s: str) -> str:\n    """ ' --suffix $'\n    return result\n'
