"""Kernel benchmarks: `python bench/kernel_rows.py --out DIR` (see codellama_rt.bench.kernels)."""
from codellama_rt.bench.kernels import main

if __name__ == "__main__":
    main()
