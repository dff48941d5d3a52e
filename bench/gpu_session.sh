#!/usr/bin/env bash
# One device call (under 9 minutes): the GPU test suite, then the benchmark report (end-to-end decode vs
# the bandwidth bound, TTFT, memory, peers, kernel rows, AOT resources, plots) into $OUT (or bench/results).
# Usage (device tool): bash bench/gpu_session.sh
# Uses the machine's own torch/triton (the device image has them); installs this package without deps.
# The report gets what is left of SESSION_S seconds (default 520) once the tests are done and skips, and
# lists, whatever no longer fits.
set -uo pipefail
cd "$(dirname "$0")/.."
session_s=${SESSION_S:-520}
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown)
dest="${OUT:-bench/results}/${card}-$(date +%Y-%m-%d)"
mkdir -p "$dest"
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python -m pip install -q --no-deps -e .
nvidia-smi > "$dest/nvidia-smi.txt" 2>&1
python -m pytest -q -m gpu tests 2>&1 | tee "$dest/gpu-tests.txt" | tail -20
python -m pytest -q -x tests/kernel_tests tests/test_triton_backend.py 2>&1 | tail -3 | tee -a "$dest/gpu-tests.txt"
left=$((session_s - SECONDS))
if [ "$left" -lt 90 ]; then left=90; fi
echo "tests took ${SECONDS} s; report budget ${left} s"
python bench/report.py --report "$dest" --budget-s "$left" 2>&1 | tee "$dest/report.log" | tail -40
echo "report in $dest (session ${SECONDS} s)"
