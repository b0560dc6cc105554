"""The ``pnnh`` command (also ``python -m pnnh_kernels``)."""

from __future__ import annotations

import argparse
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    from pnnh_kernels import __version__, demo

    parser = argparse.ArgumentParser(prog="pnnh", description="PNNH kernels, models and experiments")
    parser.add_argument("--version", action="version", version=f"pnnh-kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo", help="train plain, residual and PNNH deep nets on real digits and compare"
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)

    from pnnh_kernels.benchmarking import report

    report_parser = commands.add_parser(
        "report", help="Markdown report and plots from a pytest bench/ --benchmark-json file"
    )
    report.add_arguments(report_parser)
    report_parser.set_defaults(run=report.run)

    from pnnh_kernels import profile_step

    profile_parser = commands.add_parser(
        "profile", help="run one warmed-up layer or training step for Nsight (docs/profiling.md)"
    )
    profile_step.add_arguments(profile_parser)
    profile_parser.set_defaults(run=profile_step.run)

    from pnnh_kernels.analysis import run as analysis

    analyze_parser = commands.add_parser(
        "analyze", help="dissipating-input curves, Cantelli bounds and depth/coder studies on digits"
    )
    analysis.add_arguments(analyze_parser)
    analyze_parser.set_defaults(run=analysis.run)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
