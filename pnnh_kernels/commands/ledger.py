"""``pnnh ledger``: every device launch of one training step of a PNNH layer (or block) and of the
ResNet layer (or block) it replaces, with bytes, FLOPs and roofline times, counted on the CPU
(pnnh_kernels.ledger)."""

from __future__ import annotations

import argparse
import sys

from pnnh_kernels.ledger import CARDS, DEFAULT_CARDS, format_comparison, format_ledger, step_ledger
from pnnh_kernels.ledger.steps import DTYPES, StepLedger, backend_unavailable_reason
from pnnh_kernels.shapes import argparse_type, image_shape

# ResNet-18's CIFAR stages at batch 256: (channels, spatial size)
CIFAR_STAGES = ((64, 32), (128, 16), (256, 8), (512, 4))
DEFAULT_BACKENDS = ("triton", "cuda")


@argparse_type
def _shape(text: str) -> tuple[int, int, int]:
    """(batch, channels, size) of ``NxCxSxS`` (the ledger's steps take square images)."""
    n, c, h, _ = image_shape(text, "--shape", square=True)
    return n, c, h


def _cards(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in CARDS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected names among {sorted(CARDS)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        type=_shape,
        default=(256, 128, 16),
        help="NxCxHxW of the input, square (256x128x16x16 by default)",
    )
    parser.add_argument(
        "--cifar-stages",
        action="store_true",
        help="the totals at ResNet-18's four CIFAR stage shapes (batch from --shape) instead",
    )
    parser.add_argument(
        "--backend", choices=("triton", "cuda", "torch"), action="append",
        help="PNNH backend(s) to count (repeatable; default: triton and cuda; one this "
        "installation lacks is left out, with a line saying what to install)",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--block", action="store_true", help="two layers (a BasicBlock) per step")
    parser.add_argument("--eval", action="store_true", help="BatchNorm in eval mode")
    parser.add_argument("--cards", type=_cards, default=DEFAULT_CARDS, help="e.g. H100,A100,H200")
    parser.add_argument(
        "--totals-only", action="store_true", help="only the comparison, not each launch"
    )
    model_help = (
        "beside each Triton convolution launch, the static mainloop model's H200 time (modelled "
        "from its sm_90 SASS, compiled here: about 15 s a shape; needs triton)"
    )
    parser.add_argument("--model", action="store_true", help=model_help)


def _modelled(batch: int, channels: int, size: int, dtype: str, training: bool) -> dict[str, float]:
    from pnnh_kernels.triton import interpreter_enabled, report

    if interpreter_enabled():
        raise SystemExit("pnnh ledger --model: unset TRITON_INTERPRET (kernels compile ahead of time)")
    shape = report.LayerShape(batch, channels, channels, size, size)
    return report.modelled_mainloops(shape, DTYPES[dtype], training)


def _modelled_step_line(
    ledger: StepLedger, modelled: dict[str, float], dtype: str, training: bool
) -> str:
    """The step's modelled H200 time, and where Nsight measured the cuDNN layer of the same shape
    (batch 256, bf16, training BatchNorm, the CIFAR stages) that time beside it."""
    from pnnh_kernels.mainloop.calibration import cudnn_layer_seconds

    seconds = ledger.modelled_seconds(CARDS["H200"], modelled)
    line = (
        f"modelled step, H200: {seconds * 1e6:.1f} us (the convolution mainloops at the static "
        "model's time, every other launch at its roofline; not measured)"
    )
    stage = (ledger.channels, ledger.size)
    if ledger.batch == 256 and dtype == "bf16" and training and stage in CIFAR_STAGES:
        cudnn = cudnn_layer_seconds()[ledger.channels]
        line += (
            f"; the cuDNN ResNet layer's kernels measured {cudnn * 1e6:.1f} us (H200, Nsight "
            f"Compute, 2026-11-28): {seconds / cudnn:.2f}x"
        )
    return line


def _countable(args: argparse.Namespace) -> list[str]:
    """The requested backends this installation can count. One it lacks (triton, where triton is not
    installed) is left out with a line on stderr saying what to install, and the rest are counted:
    they run on meta tensors and need no GPU. The command stops only when none of the backends
    asked for can be counted, or --model lacks triton."""
    requested = args.backend or list(DEFAULT_BACKENDS)
    dtype = DTYPES[args.dtype]
    missing = {name: backend_unavailable_reason(name, dtype) for name in dict.fromkeys(requested)}
    missing = {name: reason for name, reason in missing.items() if reason is not None}
    if args.model and "triton" in missing:
        raise SystemExit(
            f"pnnh ledger --model: expected the triton backend (the model reads its kernels): "
            f"{missing['triton']}"
        )
    backends = [name for name in requested if name not in missing]
    if not backends:
        raise SystemExit(
            f"pnnh ledger --backend: expected a backend this installation can count, got "
            f"{', '.join(missing)}: {'; '.join(missing.values())}"
        )
    for name, reason in missing.items():
        print(f"pnnh ledger: the {name} backend is left out: {reason}", file=sys.stderr)
    return backends


def run(args: argparse.Namespace) -> None:
    backends = _countable(args)
    kind = "block" if args.block else "layer"
    batch = args.shape[0]
    shapes = CIFAR_STAGES if args.cifar_stages else ((args.shape[1], args.shape[2]),)
    for channels, size in shapes:
        common = dict(dtype=args.dtype, training_norm=not args.eval)
        baseline = step_ledger(f"resnet-{kind}", batch, channels, size, **common)
        ledgers = [
            step_ledger(f"pnnh-{kind}", batch, channels, size, backend=backend, **common)
            for backend in backends
        ]
        if not (args.totals_only or args.cifar_stages):
            for ledger in (baseline, *ledgers):
                modelled = None
                if args.model and ledger.label.startswith("pnnh") and "[triton]" in ledger.label:
                    modelled = _modelled(batch, channels, size, args.dtype, not args.eval)
                print(format_ledger(ledger, args.cards[0], modelled))
                if modelled is not None:
                    print(_modelled_step_line(ledger, modelled, args.dtype, not args.eval) + "\n")
        print(format_comparison(ledgers, baseline, args.cards))
