#!/usr/bin/env bash
# One device call: the GPU test suite, then the kernel benchmark report into $OUT (or bench/results).
# Usage (device tool): bash bench/gpu_session.sh
# Uses the machine's own torch/triton (the device image has them); installs this package without deps.
set -uo pipefail
cd "$(dirname "$0")/.."
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown)
dest="${OUT:-bench/results}/${card}-$(date +%Y-%m-%d)"
mkdir -p "$dest"
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python -m pip install -q --no-deps -e .
nvidia-smi > "$dest/nvidia-smi.txt" 2>&1
python -m pytest -q -m gpu tests 2>&1 | tee "$dest/gpu-tests.txt" | tail -20
python -m pytest -q -x tests/kernel_tests tests/test_triton_backend.py 2>&1 | tail -3 | tee -a "$dest/gpu-tests.txt"
python bench/kernels.py --out "$dest" 2>&1 | tail -60
echo "report in $dest"
