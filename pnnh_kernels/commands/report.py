"""``pnnh report BENCH.json``: the Markdown report and plots of a benchmark run, with the paper's
claims checked (pnnh_kernels.benchmarking.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pnnh_kernels.benchmarking.report import load, load_study, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench_json", type=Path, help="output of pytest bench/ --benchmark-json=FILE")
    parser.add_argument("--out", type=Path, default=Path("bench_report"), help="output folder")
    parser.add_argument(
        "--study",
        type=Path,
        help="analysis.json of pnnh analyze --preset params: accuracy against parameters, for the "
        "parameter-efficiency claim",
    )


def check(args: argparse.Namespace) -> None:
    """The results file, read before anything is written: a missing or foreign file is one line."""
    load(args.bench_json)
    if args.study is not None:
        load_study(args.study)
    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out: {args.out} exists and is not a folder")


def run(args: argparse.Namespace) -> None:
    path = write_report(args.bench_json, args.out, args.study)
    print(path.read_text())
    print(f"written to {path}")
