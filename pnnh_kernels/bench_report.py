"""``python -m pnnh_kernels.bench_report BENCH.json``: the claims report (see benchmarking.report)."""

from pnnh_kernels.benchmarking.report import main

if __name__ == "__main__":
    main()
