"""The GPU experiment that tells the static mainloop model's two readings apart (run by
device_check.sh; issue #23).

Every Triton mainloop the model was calibrated on loads 128 x 128 x 64 tiles, so its bytes, its
iterations and its MMA work are proportional, and two readings fit the measured H200 times equally
well (pnnh_kernels.mainloop.model): a cost per byte loaded from the L2 (the calibrated constants)
and a cost per mainloop iteration (``LATENCY_READING``). They disagree on what to build next. This
times one mainloop, the forward statistics pass, in four tilings that separate them: K steps 64 and
32 channels deep (the same bytes, twice the iterations) at 3 and 4 pipeline stages. The L2 reading
predicts the 32-deep steps about as fast as the 64-deep ones; the latency reading predicts them
nearly twice as slow, and 4 stages no faster than 3 under either. Each row puts the measured time
beside both modelled ones, compiled for sm_90 as the report compiles them.

A second table does the same for the training weight gradient (the stored dz): a program per tap
in 64-pixel steps (an A100's 128 KiB pipeline) and in 128-pixel steps (sm_90's 208 KiB: the same
bytes in half the iterations, which only the latency reading rewards; 128x16x16: L2 reading 62.9
-> 59.5 us, latency reading 67.8 -> 43.5), and sm_90's default since 2026-12-08, a program per
kernel row (row taps: a gradient tile loaded once for three taps; 50.2 / 35.5 us).

    python -m bench.mainloop_experiment [--shape 256x128x16x16] [--out DIR]

Without a GPU it prints the modelled columns alone (and says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

VARIANTS = ((64, 3), (32, 3), (64, 4), (32, 4))  # (channels per K step, pipeline stages)
KERNEL = "_pnnh_conv_fwd_kernel[bn stats]"
# The weight gradient's variants, (a program per kernel row, pipeline budget): a program per tap
# in an A100's budget (64-pixel steps at 128 x 128 channel tiles) and in sm_90's own (128-pixel
# steps), and sm_90's default, row taps.
WGRAD_VARIANTS = ((False, 128 * 1024), (False, 208 * 1024), (True, 208 * 1024))
WGRAD_KERNEL = "_conv_wgrad_kernel[learner, train-BN]"


def launchers_config(shape):
    """The launchers' sm_90 configuration of ``shape`` on a 132-multiprocessor card."""
    from pnnh_kernels.triton.pnnh_conv_config import config_for_card

    oh, ow = shape.output_size()
    return config_for_card(
        shape.c_in, shape.c_out, shape.code_channels, torch.bfloat16, shape.n * oh * ow, (9, 0), 132
    )


def variant_config(shape, block_k: int, stages: int):
    """The launchers' sm_90 configuration of ``shape`` with the variant's K step and stages, in the
    calibration's 128 x 128 tiles (the statistics pass at 128 registers, as the launchers ran them
    there until 256 x 128 tiles became the sm_90 default at 128x128x16x16)."""
    from pnnh_kernels.triton.pnnh_conv_config import config_for_card

    oh, ow = shape.output_size()
    config = config_for_card(
        shape.c_in, shape.c_out, shape.code_channels, torch.bfloat16, shape.n * oh * ow, (9, 0), 132
    )
    return dataclasses.replace(
        config, block_m=128, block_n=128, block_k=block_k, num_stages=stages,
        statistics_max_registers=128,
    )  # fmt: skip


def modelled_us(shape, config, kernel: str = KERNEL) -> tuple[float, float, int, int, str]:
    """(L2 reading, latency reading, SASS per iteration, shared bytes, tiles) of one launch, the
    statistics pass unless ``kernel`` names another of the report's launches."""
    from pnnh_kernels.triton import report

    (launch,) = [x for x in report.launches(shape, torch.bfloat16, "sm_90", config) if x.name == kernel]
    row = report.compile_row(launch, "bf16", "sm_90", with_model=True)
    if row.modelled_us is None or row.latency_reading_us is None or row.mainloop is None:
        raise RuntimeError(f"{kernel}: no mainloop the model reads in its sm_90 compile")
    return row.modelled_us, row.latency_reading_us, row.mainloop["total"], row.shared_bytes, row.tiles


def wgrad_step(
    shape, config, device: str
) -> tuple[Callable[[], None], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(run, x, dz, out): one launch of the training weight gradient as the launchers make it (x
    and a stored dz in, a bf16 weight-shaped gradient out, the split partials' reduction
    included), on random ``shape`` tensors; run it under ``forced_config(config)``."""
    from pnnh_kernels.conv_geometry import ConvGeometry
    from pnnh_kernels.triton import pnnh_conv

    n, c, h, w = shape.n, shape.c_in, shape.h, shape.w
    x, dz = (
        torch.randn(n, c, h, w, device=device, dtype=torch.bfloat16).to(
            memory_format=torch.channels_last
        )
        for _ in range(2)
    )
    out = torch.empty(c, c, 3, 3, device=device, dtype=torch.bfloat16).to(
        memory_format=torch.channels_last
    )
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))

    def run() -> None:
        pnnh_conv._wgrad(x, dz, None, (h, w), (3, 3), geometry, config, out=out)

    return run, x, dz, out


def wgrad_measured_us(shape, config) -> Optional[float]:
    """The training weight gradient alone (wgrad_step), as measured_us times it; None without a
    GPU."""
    if not torch.cuda.is_available():
        return None
    import triton

    from pnnh_kernels.triton.pnnh_conv_config import forced_config

    run = wgrad_step(shape, config, "cuda")[0]
    with forced_config(config):
        run()  # compile
        return 1000.0 * triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")


def _row(leading: list[str], modelled: tuple, measured: Optional[float]) -> str:
    """One table row: the ``leading`` cells, then modelled_us's columns, the measured time and
    each reading's error against it (blank without a GPU)."""
    l2, latency, sass, shared, _ = modelled
    errors = ["", ""] if measured is None else [
        f"{l2 / measured - 1:+.0%}", f"{latency / measured - 1:+.0%}",
    ]  # fmt: skip
    time = "" if measured is None else f"{measured:.1f}"
    cells = [*leading, str(sass), str(shared), f"{l2:.1f}", f"{latency:.1f}", time, *errors]
    return "| " + " | ".join(cells) + " |"


def measured_us(shape, config) -> Optional[float]:
    """The statistics pass alone, CUDA events (triton.testing.do_bench: caches cleared between
    runs, median); None without a GPU."""
    if not torch.cuda.is_available():
        return None
    import triton

    from pnnh_kernels.conv_geometry import ConvGeometry
    from pnnh_kernels.triton import pnnh_conv
    from pnnh_kernels.triton.pnnh_conv_config import cdiv, forced_config

    n, c, h, w = shape.n, shape.c_in, shape.h, shape.w
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).to(
        memory_format=torch.channels_last
    )
    weight = torch.randn(c, c, 3, 3, device="cuda", dtype=torch.bfloat16).to(
        memory_format=torch.channels_last
    )
    z = torch.empty_like(x)
    tiles = cdiv(n * h * w, config.block_m)
    partials = tuple(torch.empty(2, tiles, c, device="cuda").unbind(0))
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))

    def run() -> None:
        pnnh_conv._launch_forward(
            x, weight, None, None, None, None, None, geometry, False, z=z, partials=partials,
            config=config,
        )  # fmt: skip

    with forced_config(config):
        run()  # compile
        return 1000.0 * triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")


def main(argv: Optional[list[str]] = None) -> None:
    from pnnh_kernels.triton import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256x128x16x16", help="NxCxHxW (3x3, stride 1, C -> C)")
    parser.add_argument("--out", type=Path, help="also write the table to DIR")
    args = parser.parse_args(argv)
    shape = report.parse_shape(args.shape)
    if (shape.c_in, shape.kernel, shape.stride) != (shape.c_out, 3, 1):
        parser.error(f"--shape: expected NxCxHxW of a 3x3, stride-1, C -> C layer, got {args.shape}")
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    lines = [
        f"# The model's two readings against one mainloop, {args.shape} bf16 "
        f"({datetime.date.today()}, {card or 'no GPU: modelled only'})",
        "",
        "Modelled for an H200 (the calibration's card; an H100's DRAM is slower, its SMs the same); "
        f"measured on {card or 'nothing'}.",
        "",
        "| K step / stages | SASS per iteration | shared (B) | L2 reading (µs, modelled) "
        "| latency reading (µs, modelled) | measured (µs) | L2 reading error | latency reading error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for block_k, stages in VARIANTS:
        config = variant_config(shape, block_k, stages)
        modelled = modelled_us(shape, config)
        lines.append(_row([f"{block_k} / {stages}"], modelled, measured_us(shape, config)))
    lines += [
        "",
        "The statistics pass in the launchers' sm_90 tiles (256 x 128 at 128 channels since "
        "2026-12-07, where both readings model it faster) against the calibration's 128 x 128:",
        "",
        "| tiles | SASS per iteration | shared (B) | L2 reading (µs, modelled) | latency reading (µs, "
        "modelled) | measured (µs) | L2 reading error | latency reading error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config in (variant_config(shape, 64, 3), launchers_config(shape)):
        modelled = modelled_us(shape, config)
        lines.append(_row([modelled[4]], modelled, measured_us(shape, config)))
    lines += [
        "",
        f"The training weight gradient ({WGRAD_KERNEL}; the split partials' reduction, a launch "
        "of its own, in the measured time, not in the modelled one):",
        "",
        "| a program per | pipeline budget (KiB) | tiles | SASS per iteration | shared (B) | L2 "
        "reading (µs, modelled) | latency reading (µs, modelled) | measured (µs) | L2 reading error "
        "| latency reading error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row_taps, budget in WGRAD_VARIANTS:
        config = dataclasses.replace(
            variant_config(shape, 64, 3), wgrad_shared_budget=budget, wgrad_row_taps=row_taps
        )
        modelled = modelled_us(shape, config, WGRAD_KERNEL)
        measured = wgrad_measured_us(shape, config)
        program = "kernel row" if row_taps else "tap"
        lines.append(_row([program, str(budget // 1024), modelled[4]], modelled, measured))
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = (card or "modelled").lower().replace(" ", "-")
        (args.out / f"mainloop_experiment_{name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
