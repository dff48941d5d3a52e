"""The benchmark report: `python bench/report.py --report DIR [--quick] [--only NAMES]`
(the same as `codellama-rt bench --report DIR`; see codellama_rt.bench.report)."""
from codellama_rt.bench.report import main

if __name__ == "__main__":
    main()
