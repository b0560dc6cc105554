"""The ``pnnh`` command (also ``python -m pnnh_kernels``): one module per subcommand in this package,
named after it, each with ``add_arguments(parser)`` and ``run(args)``, and optionally
``check(args)``: the checks of the arguments that need no real work, run first. An error raised by
``check`` (see USAGE_ERRORS) is the user's: it is printed as one line, ``pnnh COMMAND: error:
MESSAGE``, with argparse's exit status 2. An error raised by ``run`` keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from pnnh_kernels.backends import BackendUnavailableError

# What a command's check(args) raises for arguments that cannot work: a bad value (ValueError), a
# file or folder named that is missing or unusable (OSError), an optional dependency the command
# needs that is not installed (ImportError), a backend this machine cannot run.
USAGE_ERRORS = (ValueError, OSError, ImportError, BackendUnavailableError)

# name, help, module with add_arguments(parser) and run(args)
SUBCOMMANDS = (
    (
        "demo",
        "train plain, residual and PNNH deep nets on real digits and compare",
        "pnnh_kernels.commands.demo",
    ),
    (
        "analyze",
        "dissipating-input curves, Cantelli bounds and depth/coder studies on digits",
        "pnnh_kernels.commands.analyze",
    ),
    (
        "train",
        "train a PNNH, plain or residual ResNet on CIFAR-10/100, image folders or synthetic data",
        "pnnh_kernels.commands.train",
    ),
    (
        "report",
        "Markdown report and plots from a pytest bench/ --benchmark-json file",
        "pnnh_kernels.commands.report",
    ),
    (
        "ledger",
        "count every launch of a training step, its bytes and FLOPs, against the ResNet layer",
        "pnnh_kernels.commands.ledger",
    ),
    (
        "profile",
        "run one warmed-up layer or training step for Nsight (docs/profiling.md)",
        "pnnh_kernels.commands.profile",
    ),
    (
        "info",
        "the environment, every backend's availability with the reason, and what auto runs",
        "pnnh_kernels.commands.info",
    ),
)


class _Version(argparse.Action):
    """``--version``, which asks git for the revision only when given (argparse's own version
    action takes its text when the parser is built: two git processes on every command)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from pnnh_kernels.version import version_string

        print(version_string())  # on stdout, as argparse's version action prints
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pnnh", description="PNNH kernels, models and experiments")
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, module_name in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        # Every option's default in --help (pnnh train --help showed none of them).
        subparser = commands.add_parser(
            name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        module.add_arguments(subparser)
        for action in subparser._actions:
            # argparse prints nothing, not even the default, for an option without help text.
            if action.help is None and action.option_strings and action.default is not None:
                action.help = "(default: %(default)s)"
        subparser.set_defaults(run=module.run, check_arguments=getattr(module, "check", None))
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.check_arguments is not None:
        try:
            args.check_arguments(args)
        except USAGE_ERRORS as error:
            message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            print(f"pnnh {args.command}: error: {message or type(error).__name__}", file=sys.stderr)
            raise SystemExit(2) from None
    args.run(args)
