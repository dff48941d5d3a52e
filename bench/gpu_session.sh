#!/usr/bin/env bash
# One device call (under 10 minutes): the GPU test suite, then the serving engine's concurrency and prefix
# bench (SERVE_S seconds, default 90, 0 skips it), then speculative decoding's oracle and draft rows at 7B bf16 (SPEC_S
# seconds, default 120, 0 skips them), then the benchmark report (end-to-end decode vs
# the bandwidth bound, TTFT, memory, peers, kernel rows, AOT resources, plots), then the batch-1 GEMV sweep
# (SWEEP_S seconds, default 60, 0 skips it; SWEEP_KINDS, default attention,int4), then the pytest-benchmark
# micro-benchmarks (MICRO_S seconds, default 0: off, to stay well inside the 10-minute call; their JSON beside
# the report, for `pytest bench --benchmark-compare`) into $OUT (or bench/results). The report runs its kernel
# rows first, then the bars' models and their experiment rows (what decides the defaults), then the peers.
# Usage (device tool): bash bench/gpu_session.sh
# Uses the machine's own torch/triton (the device image has them) and this checkout's sources, not installed.
# The report gets what is left of SESSION_S seconds (default 480) once the tests are done and skips, and
# lists, whatever no longer fits. Each step has its own time limit, so a hang still leaves the logs of the
# others (and report.json holds every unit finished before a kill).
# The CPU kernel tests (Triton interpreter) are not run here: CI runs them, and the image's numpy is too new
# for triton 3.6's interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
session_s=${SESSION_S:-480}
sweep_s=${SWEEP_S:-60}
sweep_kinds=${SWEEP_KINDS:-attention,int4}  # dense was swept on the H200 (bench/results/NVIDIA-H200-2026-11-26)
tests_s=${TESTS_S:-200}
card=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown)
dest="${OUT:-bench/results}/${card}-$(date +%Y-%m-%d)"
mkdir -p "$dest"
# No pip install (the machine has no network, and pip's editable build wants to fetch setuptools): the
# package is put on PYTHONPATH as setup.py's package_dir maps it, through links in a scratch folder.
pkg=$(mktemp -d)
mkdir "$pkg/codellama_rt"
for f in "$PWD"/runtime/*; do ln -s "$f" "$pkg/codellama_rt/"; done
ln -s "$PWD/kernels" "$pkg/codellama_rt/kernels"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import codellama_rt, codellama_rt.kernels, codellama_rt.bench" || { echo "codellama_rt does not import"; exit 1; }
nvidia-smi 2>&1 | head -20  # not kept: the device returns at most 8 files
# run from tests/: `python -m pytest` puts the working directory on sys.path, and the root's kernels/ would
# shadow the PyPI package `kernels` that transformers imports
(cd tests && timeout -k 10 "$tests_s" "$py" -m pytest -q -rfE -m gpu .) 2>&1 | tee "$dest/gpu-tests.txt" | tail -40
serve_s=${SERVE_S:-90}
if [ "$serve_s" -gt 0 ]; then
  timeout -k 10 "$serve_s" "$py" bench/engine_load.py --out "$dest/engine_load.json" 2>&1 | tail -3
fi
spec_s=${SPEC_S:-120}
if [ "$spec_s" -gt 0 ]; then
  # speculative decoding's verify machinery at 7B bf16 (issue 22: an oracle proposer, k = 8, >= 5x plain), and the
  # model drafting for itself with eager one-id steps and as CUDA graphs (experiment draft_graphs); its
  # table is appended to gpu-tests.txt (the device returns few files)
  timeout -k 10 "$spec_s" "$py" bench/speculative.py --random CodeLlama-7b --device cuda --rounds 1 \
    --rows oracle,oracle-fixed,draft-self,draft-self-graphs --new-tokens 128 2>&1 | tail -6 | tee -a "$dest/gpu-tests.txt"
fi
left=$((session_s - SECONDS))
if [ "$left" -lt 90 ]; then left=90; fi
echo "tests took ${SECONDS} s; report budget ${left} s"
timeout -k 10 $((left + 60)) "$py" bench/report.py --report "$dest" --budget-s "$left" 2>&1 | tee "$dest/report.log" | tail -60
if [ "$sweep_s" -gt 0 ]; then
  timeout -k 10 $((sweep_s + 30)) "$py" bench/gemv_sweep.py --out "$dest" --budget-s "$sweep_s" --kinds "$sweep_kinds" 2>&1 | grep "^best\|failed\|needs CUDA" | tail -20
  mv -f "$dest/sweep.json" "$dest/gemv-sweep.json" 2>/dev/null
fi
micro_s=${MICRO_S:-0}
if [ "$micro_s" -gt 0 ] && "$py" -c "import pytest_benchmark" 2>/dev/null; then
  # from the scratch package folder: the repository root or bench/ on sys.path would shadow PyPI's `kernels`
  store=$(mktemp -d) root=$PWD
  (cd "$pkg" && timeout -k 10 "$micro_s" "$py" -m pytest "$root/bench" -q -p no:cacheprovider --benchmark-only \
    --benchmark-storage "file://$store" --benchmark-save micro) 2>&1 | tail -30
  find "$store" -name "*micro*.json" -exec cp {} "$dest/micro-benchmarks.json" \;
elif [ "$micro_s" -gt 0 ]; then
  echo "micro-benchmarks skipped: pytest-benchmark is not installed on this machine"
fi
echo "report in $dest (session ${SECONDS} s)"
