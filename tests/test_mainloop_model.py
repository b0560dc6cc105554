"""The static mainloop model (pnnh_kernels.mainloop): SASS reading, the model's terms, and its
calibration against the H200's Nsight Compute times of the 994ebd4 kernels.

Compiles need Triton's ahead-of-time path, which the test process (TRITON_INTERPRET=1) does not
have: they run in processes of their own (the report's CLI; the calibration's compile driver)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from pnnh_kernels.mainloop import calibration, sass
from pnnh_kernels.mainloop.model import (
    CALIBRATED,
    CARDS,
    LaunchShape,
    modelled_time,
    resident_ctas,
    tensor_rate,
)

LISTING = """
        Function : outer_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x0 */
        /*0010*/                   IMAD R2, R3, R4, RZ ;                  /* 0x0 */
        /*0020*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;  /* 0x0 */
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;  /* 0x0 */
        /*0040*/                   IADD3 R7, R7, 0x1, RZ ;                /* 0x0 */
        /*0050*/                   ISETP.GE.AND P0, PT, R7, R8, PT ;     /* 0x0 */
        /*0060*/              @!P0 BRA 0x20 ;                             /* 0x0 */
        /*0070*/                   FFMA R9, R9, R10, R11 ;                /* 0x0 */
        /*0080*/                   HMMA.16816.F32.BF16 R12, R14, R16, R12 ;  /* 0x0 */
        /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;         /* 0x0 */
        /*00a0*/               @P1 BRA 0x70 ;                             /* 0x0 */
        /*00b0*/                   EXIT ;                                 /* 0x0 */
        /*00c0*/                   BRA 0xc0;                              /* 0x0 */
        Function : second_kernel
        /*0000*/                   EXIT ;                                 /* 0x0 */
"""


def test_listing_is_read_into_loops_and_classes():
    functions = sass.parse(LISTING)
    assert list(functions) == ["outer_kernel", "second_kernel"]
    body = functions["outer_kernel"]
    assert len(body) == 13
    assert len(functions["second_kernel"]) == 1
    found = sass.loops(body)
    # two loops (0x20-0x60, 0x70-0xa0) and the trailing self-branch (0xc0), a loop of no MMA
    assert [(loop.start, loop.end) for loop in found] == [(0x20, 0x60), (0x70, 0xA0), (0xC0, 0xC0)]
    loop = sass.mainloop(body)
    assert loop is not None
    assert (loop.start, loop.end) == (0x20, 0x60)
    assert loop.counts() == {
        "tensor": 1, "global": 1, "shared": 0, "integer": 2, "float": 0, "barrier": 0, "control": 1,
    }  # fmt: skip
    assert loop.mma_flops_per_warp == 2 * 64 * 128 * 16 // 4
    assert loop.global_load_bytes_per_warp == 32 * 16
    assert sass.mma_flops_per_warp("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16
    assert sass.mma_flops_per_warp("HMMA.1688.F32.TF32") == 2 * 16 * 8 * 8
    assert sass.mma_flops_per_warp("QGMMA.64x128x32.F32.E4M3.E4M3") == 2 * 64 * 128 * 32 // 4
    h100 = CARDS["H100"]
    assert tensor_rate(h100, {"HGMMA.64x128x16.F32.BF16": 4}) == 4096
    assert tensor_rate(h100, {"HGMMA.64x128x8.F32.TF32": 4}) == 2048
    assert tensor_rate(h100, {"QGMMA.64x128x32.F32.E4M3.E4M3": 4}) == 8192
    assert sass.classify("FFMA") == "float"
    assert sass.classify("BAR.SYNC") == "barrier"
    assert sass.load_width("LDG.E.U16") == 2
    assert sass.load_width("LDG.E") == 4


def test_an_outer_loop_is_not_the_mainloop():
    nested = """
        Function : nested
        /*0000*/                   HMMA.16816.F32.BF16 R0, R2, R4, R0 ;   /* 0x0 */
        /*0010*/                   HMMA.16816.F32.BF16 R0, R2, R4, R0 ;   /* 0x0 */
        /*0020*/               @P0 BRA 0x0 ;                              /* 0x0 */
        /*0030*/                   IADD3 R7, R7, 0x1, RZ ;                /* 0x0 */
        /*0040*/               @P1 BRA 0x0 ;                              /* 0x0 */
    """
    loop = sass.mainloop(sass.parse(nested)["nested"])
    assert loop is not None
    assert (loop.start, loop.end) == (0x0, 0x20)


def test_resident_ctas_follow_the_tightest_limit():
    h100 = CARDS["H100"]
    # each case binds one limit, the other two allowing more
    assert resident_ctas(h100, warps=8, registers=32, shared_bytes=98_304) == 2  # shared memory
    assert resident_ctas(h100, warps=8, registers=255, shared_bytes=1_024) == 1  # registers
    assert resident_ctas(h100, warps=16, registers=16, shared_bytes=0) == 4  # threads
    # registers are allocated per warp in 256s: 129 per thread costs 136
    assert resident_ctas(h100, warps=4, registers=129, shared_bytes=0) == 65536 // (136 * 32 * 4)


def test_more_instructions_or_fewer_warps_cost_issue_time():
    listing = sass.KernelListing("outer_kernel", 13, sass.mainloop(sass.parse(LISTING)["outer_kernel"]))
    shape = LaunchShape(ctas=1056, warps=8, registers=128, shared_bytes=98_304,
                        mainloop_flops=1056 * 8 * 65_536 * 40.0, dram_bytes=1e6)  # fmt: skip
    modelled = modelled_time(listing, shape)
    assert modelled.iterations == pytest.approx(40)
    assert modelled.bound == "L2"  # 512 bytes loaded per 65,536 FLOP of each warp
    assert modelled.seconds > modelled.issue_seconds  # the other terms and the fixed cost add
    loop = listing.mainloop
    more_integer = loop.instructions + tuple(i for i in loop.instructions if i.kind == "integer")
    heavier = dataclasses.replace(listing, mainloop=dataclasses.replace(loop, instructions=more_integer))
    assert modelled_time(heavier, shape).iterations == modelled.iterations
    assert modelled_time(heavier, shape).issue_seconds > modelled.issue_seconds
    single = dataclasses.replace(shape, shared_bytes=200_000)  # one CTA resident: fewer warps
    assert modelled_time(listing, single).issue_seconds > modelled.issue_seconds


TRAINING_MAINLOOPS = r"bn stats|dgrad_kernel\[train-BN\]|learner, train-BN"


@pytest.mark.skipif(not sass.cuobjdump().exists(), reason="triton's cuobjdump is not installed")
def test_the_report_models_the_current_mainloops_at_the_first_stage(tmp_path):
    rows_path = tmp_path / "rows.json"
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        [sys.executable, "-m", "pnnh_kernels.triton.report", "--shape", "256x64x32x32",
         "--dtype", "bf16", "--card", "H200", "--model", "--only", TRAINING_MAINLOOPS,
         "--json", str(rows_path), "--jobs", "1"],
        check=True, capture_output=True, env=environment,
    )  # fmt: skip
    rows = json.loads(rows_path.read_text())
    modelled = {row["kernel"]: row for row in rows if row["modelled_us"] is not None}
    assert {"_pnnh_conv_fwd_kernel[bn stats]", "_pnnh_conv_dgrad_kernel[train-BN]",
            "_conv_wgrad_kernel[learner, train-BN]"} <= set(modelled)  # fmt: skip
    for row in modelled.values():
        loop = row["mainloop"]
        assert loop["tensor"] > 0
        assert loop["total"] == sum(v for k, v in loop.items() if k != "total")
        assert 1 < row["modelled_us"] < 10_000
        assert row["bound"] in ("issue", "tensor", "L2", "memory")


def _history_has_the_measured_commit() -> bool:
    probe = subprocess.run(
        ["git", "-C", str(calibration.REPOSITORY), "cat-file", "-e", calibration.COMMIT + "^{commit}"],
        capture_output=True,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(not _history_has_the_measured_commit(), reason="a clone without git history")
def test_the_model_reproduces_the_measured_triton_kernels_within_20_percent():
    found = calibration.points(("triton",))
    fitted = calibration.fitted(found)
    assert len(fitted) == 20  # 5 mainloops x 4 shapes: none lost to a failed match
    errors = {
        (p.measured.role, p.measured.channels): round(p.error(), 3) for p in fitted
    }  # fmt: skip
    assert all(abs(e) <= 0.2 for e in errors.values()), errors
    # The check can fail: the same points with the L2 term dropped (a model that reads only issue,
    # tensor and DRAM time) miss by more than 20%.
    without_l2 = dataclasses.replace(CALIBRATED, l2_bytes_per_second=1e30)
    assert max(abs(p.error(without_l2)) for p in fitted) > 0.2


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize(("channels", "size"), [(64, 32), (128, 16), (256, 8), (512, 4)])
def test_the_report_sizes_the_weight_gradient_as_its_launcher(channels, size, target, monkeypatch):
    """The model's grid of the training weight gradient is the launcher's (taps, split count and
    its cap for an H100/H200's 132 multiprocessors), in the generic tiles and in sm_90's own (row
    taps, their tiles and stages: taken at 64, 128 and 512 channels, not at 256x8x8)."""
    from pnnh_kernels.conv_geometry import ConvGeometry
    from pnnh_kernels.triton import availability, pnnh_conv, pnnh_conv_config, report

    monkeypatch.setattr(availability, "_INTERPRETER", False)  # the GPU's tiles
    monkeypatch.setattr(pnnh_conv_config, "STUB_MULTIPROCESSORS", 132)
    shape = report.LayerShape(256, channels, channels, size, size)
    (launch,) = [
        x for x in report.launches(shape, torch.bfloat16, target)
        if x.name.endswith("[learner, train-BN]")
    ]  # fmt: skip
    modelled = report.model_launch(launch, torch.bfloat16, registers=128, shared=0)
    if target == "sm_90":
        config = pnnh_conv_config.config_for_card(
            channels, channels, channels // 2, torch.bfloat16, 256 * size * size, (9, 0), 132
        )
    else:
        config = pnnh_conv_config.choose_config(channels, channels, channels // 2, torch.bfloat16)
    weight_layout = ((channels, channels, 3, 3), (9 * channels, 1, 3 * channels, channels))
    plan = pnnh_conv._wgrad_plan(
        (256, channels, size, size), channels, (size, size), (3, 3),
        ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1)), config, torch.bfloat16, "ieee", False,
        weight_layout, torch.device("cpu"), False,
    )  # fmt: skip
    assert modelled is not None
    assert modelled.ctas == plan.site.grid[0] * plan.site.grid[1] * plan.site.grid[2]
    constants = dict(launch.constexprs)
    for name in ("ROW_TAPS", "BLOCK_X", "BLOCK_G", "BLOCK_M"):
        assert plan.site.constants[name] == constants[name], name
    assert plan.site.constants["num_stages"] == launch.num_stages
    assert constants["ROW_TAPS"] == (target == "sm_90" and channels != 256)


@pytest.mark.skipif(not sass.cuobjdump().exists(), reason="triton's cuobjdump is not installed")
def test_the_ledger_shows_the_modelled_mainloop_times():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "pnnh_kernels", "ledger", "--shape", "256x64x32x32",
         "--backend", "triton", "--model"],
        check=True, capture_output=True, text=True, env=environment,
    )  # fmt: skip
    rows = [  # the launch rows of the Triton ledger (numbered), not the comparison's
        line for line in result.stdout.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]  # fmt: skip
    assert "modelled H200 mainloop (us)" in result.stdout
    labelled = {
        row.split("|")[3].strip(): float(row.split("|")[9]) for row in rows if row.split("|")[9].strip()
    }
    assert set(labelled) == {
        "_pnnh_conv_fwd_kernel (statistics)", "_pnnh_conv_dgrad_kernel", "_conv_wgrad_kernel",
    }  # fmt: skip
    assert all(1 < value < 10_000 for value in labelled.values())
    (step,) = [line for line in result.stdout.splitlines() if line.startswith("modelled step, H200")]
    assert "not measured" in step
    assert "the cuDNN ResNet layer's kernels measured 440.6 us" in step


@pytest.mark.skipif(not _history_has_the_measured_commit(), reason="a clone without git history")
def test_the_latency_reading_also_reproduces_the_measured_triton_kernels():
    """The other reading of the same points (no L2 limit, a cost per iteration) fits them too: the
    calibration cannot tell the two apart, which is why the report prints both."""
    from pnnh_kernels.mainloop.model import LATENCY_READING

    fitted = calibration.fitted(calibration.points(("triton",)))
    assert max(abs(p.error(LATENCY_READING)) for p in fitted) <= 0.2
    # It can fail: without its latency term (and with no L2 limit) it misses by far.
    without_latency = dataclasses.replace(LATENCY_READING, latency_cycles=0.0)
    assert max(abs(p.error(without_latency)) for p in fitted) > 0.2


def test_cudnn_kernels_are_read_with_their_tiles_and_checked_against_the_l2_term():
    kernels = calibration.cudnn_kernels()
    assert len(kernels) == 12  # fprop, dgrad, wgrad at four stages; split-K reductions left out
    (fprop,) = [k for k in kernels if k.role == "fprop" and k.channels == 256]
    assert fprop.tile == (256, 128, 64)
    # 16,384 pixels x 256 channels in 256 x 128 tiles, K = 9 x 256: 64 x 2 tiles of (256 + 128) rows
    assert fprop.tile_l2_bytes == 64 * 2 * 384 * 2304 * 2
    assert fprop.flops == 2.0 * 16384 * 256 * 2304
    # the finding of docs/perf/mainloop_model_2026-12-07.md: 11 of the 12 beat the L2 term
    beaten = [k for k in kernels if k.seconds < k.l2_floor_seconds(CALIBRATED)]
    assert len(beaten) == 11
    assert calibration.cudnn_verdict(kernels, CALIBRATED).startswith(
        "cuDNN beats the model's floor for its own tiles in 11 of 12"
    )


def test_the_weight_gradient_fills_the_gpu_where_that_saves_the_busiest_multiprocessor_steps():
    """The traffic cap leaves 256 x 256 channels at 8 x 8 (16,384 pixels, 64-pixel steps) one split:
    36 programs of 128 x 128 channels on 132 multiprocessors. Three splits (108 programs of 86
    steps) beat two (128) and four (two programs of 64 on some); at 128 x 128 channels at 16 x 16 the
    cap's 7 splits (126 programs) stay, since 8 (144) would put two programs of 128 steps on some
    multiprocessors instead of one of 147. On a tie (72 programs: one split of 256 steps, or two
    of 128 with two programs on some multiprocessors) the larger where two programs fit one
    multiprocessor, else the smaller (the partials would buy nothing)."""
    from pnnh_kernels.triton.pnnh_conv_config import side_by_side, wgrad_fill_target

    assert wgrad_fill_target(1, 16384, 64, 36, 132) == 3
    assert wgrad_fill_target(7, 65536, 64, 18, 132) == 7
    assert wgrad_fill_target(1, 16384, 64, 72, 132, two_per_multiprocessor=True) == 2
    assert wgrad_fill_target(1, 16384, 64, 72, 132, two_per_multiprocessor=False) == 1
    assert wgrad_fill_target(1, 4096, 64, 288, 132) == 1  # already more programs than multiprocessors
    # a traffic cap past the fill (64 x 64 channels, 3 row-tap programs a tile, 262,144 pixels in
    # 128-pixel steps, cap 56): kept where two programs share a multiprocessor; where they cannot,
    # 44 splits (132 programs of 47 steps), not 56 (two programs of 37 on 36 multiprocessors), for
    # row-tap launches (trim_past_fill); a program per tap keeps its count
    assert wgrad_fill_target(56, 262144, 128, 3, 132, True, trim_past_fill=True) == 56
    assert wgrad_fill_target(56, 262144, 128, 3, 132, False, trim_past_fill=True) == 44
    assert wgrad_fill_target(56, 262144, 128, 3, 132, False) == 56
    # 256-wide gradient tiles on sm_90 (147,456 bytes): one per multiprocessor; 64 x 128 on an A100
    # (73,728): two
    assert not side_by_side(147_456, (9, 0))
    assert side_by_side(73_728, (8, 0))


def test_the_weight_gradient_takes_256_wide_gradient_tiles_on_sm90_where_their_grid_is_wide():
    """sm_90 in 16-bit: 256 x 128 tiles at 512 x 512 channels (72 programs for 132
    multiprocessors), 128 x 128 at 256 x 256 (18 would be too few); never on sm_80 or in fp32; and
    the pipeline sized to the H100's shared memory (128-pixel steps beside 128 x 128 tiles)."""
    from pnnh_kernels.triton.pnnh_conv_config import (
        config_for_card,
        wgrad_shared_bytes,
        wgrad_tiles,
    )

    hopper, ampere = ((9, 0), 132), ((8, 0), 108)

    def tiles(channels, size, card, dtype=torch.bfloat16, relu=False, row_taps=False):
        pixels = 256 * size * size
        config = config_for_card(channels, channels, channels // 2, dtype, pixels, *card)
        chosen = wgrad_tiles(
            config, channels, channels, dtype, relu, 9, card[1], row_taps=row_taps, pixels=pixels
        )
        assert wgrad_shared_bytes(chosen, dtype, relu) <= config.wgrad_shared_budget
        return (chosen.block_x, chosen.block_g, chosen.block_m) + (("rows",) if chosen.row_taps else ())

    assert tiles(512, 4, hopper) == (128, 256, 64)
    assert tiles(512, 4, hopper, relu=True) == (128, 256, 64)
    assert tiles(256, 8, hopper) == (128, 128, 128)
    assert tiles(128, 16, hopper) == (128, 128, 128)
    assert tiles(128, 16, hopper, relu=True) == (128, 128, 64)
    assert tiles(512, 4, ampere) == (64, 128, 64)
    assert tiles(512, 4, hopper, dtype=torch.float32)[1] == 64
    # a program per kernel row where the rows allow (sm_90, 16-bit): three accumulators, the image
    # tile at 64; not where their split partials would move more than the kernel's operands
    # (256x8x8: 5 splits' 24 MB against 17)
    assert tiles(64, 32, hopper, row_taps=True) == (64, 64, 128, "rows")
    assert tiles(128, 16, hopper, row_taps=True) == (64, 128, 128, "rows")
    assert tiles(128, 16, hopper, relu=True, row_taps=True) == (64, 128, 128, "rows")
    assert tiles(512, 4, hopper, row_taps=True) == (64, 128, 128, "rows")
    assert tiles(256, 8, hopper, row_taps=True) == (128, 128, 128)
    assert tiles(512, 4, ampere, row_taps=True) == (64, 128, 64)
    assert tiles(512, 4, hopper, dtype=torch.float32, row_taps=True) == (64, 64, 64)


# The modelled training step (issue #23): a PNNH layer's Triton step on an H200, its convolution
# mainloops at the static model's time and every other launch at its roofline, over the cuDNN ResNet
# layer's kernels as Nsight Compute measured them on an H200 (2026-11-28). The issue's target is
# 0.8x at every stage; today's kernels are modelled at 0.72 / 0.67 / 0.81 / 0.88x (the kernels of
# 743f8f9, before the mainloops' integer work was cut and the weight gradient filled the GPU: 0.88 /
# 0.94 / 1.32 / 1.12x; of 4ee2d43, before the weight gradient's row taps: 0.80 / 0.70 / 0.81 /
# 0.89x; both fail this ratchet). The bounds hold today's values with 0.02 of room: a change that
# makes the modelled step slower fails here, and one that makes it faster lowers them.
MODELLED_STEP_RATCHET = {"64x32x32": 0.74, "128x16x16": 0.69, "256x8x8": 0.83, "512x4x4": 0.90}
MODELLED_STEP_TARGET = 0.8

_MODELLED_STEP = r"""
import json
from pnnh_kernels.commands.ledger import CIFAR_STAGES, _modelled
from pnnh_kernels.ledger import CARDS, step_ledger
from pnnh_kernels.mainloop.calibration import cudnn_layer_seconds

cudnn = cudnn_layer_seconds()
ratios = {}
for channels, size in CIFAR_STAGES:
    ledger = step_ledger("pnnh-layer", 256, channels, size, backend="triton", dtype="bf16")
    seconds = ledger.modelled_seconds(CARDS["H200"], _modelled(256, channels, size, "bf16", True))
    ratios[f"{channels}x{size}x{size}"] = seconds / cudnn[channels]
print(json.dumps(ratios))
"""


@pytest.mark.skipif(not sass.cuobjdump().exists(), reason="triton's cuobjdump is not installed")
def test_the_modelled_training_step_holds_its_ratchet_against_the_cudnn_layer():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _MODELLED_STEP], check=True, capture_output=True, text=True,
        env=environment,
    )  # fmt: skip
    ratios = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(ratios) == set(MODELLED_STEP_RATCHET)
    over = {stage: round(r, 3) for stage, r in ratios.items() if r > MODELLED_STEP_RATCHET[stage]}
    assert not over, f"modelled step over its ratchet (x the cuDNN layer): {over}"
    # Where the issue's target stands (not asserted: two of four stages meet it).
    print({stage: f"{r:.2f}x (target {MODELLED_STEP_TARGET}x)" for stage, r in ratios.items()})


def test_the_cudnn_layer_is_summed_from_its_nsight_kernels():
    sums = calibration.cudnn_layer_seconds()
    assert {c: round(s * 1e6) for c, s in sums.items()} == {64: 441, 128: 282, 256: 216, 512: 208}


def test_the_gpu_experiment_times_a_correct_weight_gradient():
    """What bench/mainloop_experiment.py times on a GPU is the training weight gradient: run here on
    the interpreter at a small shape in each of its variants, against PyTorch's."""
    pytest.importorskip("triton")
    from bench.mainloop_experiment import WGRAD_VARIANTS, wgrad_step
    from pnnh_kernels.triton import report
    from pnnh_kernels.triton.pnnh_conv_config import INTERPRETER_CONFIG, forced_config, wgrad_tiles

    # 128 channels, 144 pixels, sm_90's tiles: 64- and 128-pixel steps, two splits either way
    shape = report.parse_shape("2x128x8x9")
    sm90 = dataclasses.replace(
        INTERPRETER_CONFIG, block_n=128, wgrad_image_tile=128, num_stages=3, wgrad_splits=2
    )
    steps = []
    for row_taps, budget in WGRAD_VARIANTS:
        config = dataclasses.replace(sm90, wgrad_shared_budget=budget, wgrad_row_taps=row_taps)
        tiles = wgrad_tiles(config, 128, 128, torch.bfloat16, False, 9, 0, row_taps=True, pixels=144)
        steps.append((tiles.row_taps, tiles.block_m))
        run, x, dz, out = wgrad_step(shape, config, "cpu")
        out.fill_(float("nan"))
        with forced_config(config):
            run()
        expected = torch.nn.grad.conv2d_weight(x.double(), tuple(out.shape), dz.double(), padding=1)
        torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    assert steps == [(False, 64), (False, 128), (True, 128)]


@pytest.mark.skipif(not sass.cuobjdump().exists(), reason="triton's cuobjdump is not installed")
def test_the_gpu_experiment_separates_the_two_readings(tmp_path):
    """bench/mainloop_experiment.py (device_check.sh runs it on a GPU) prints its modelled columns
    without one: the readings disagree on the 32-deep K steps, which is what the experiment is for."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        [sys.executable, "-m", "bench.mainloop_experiment", "--out", str(tmp_path)],
        check=True, capture_output=True, env=environment, cwd=calibration.REPOSITORY,
    )  # fmt: skip
    (written,) = tmp_path.glob("mainloop_experiment_*.md")
    rows = {
        row.split("|")[1].strip(): [cell.strip() for cell in row.split("|")[2:-1]]
        for row in written.read_text().splitlines()
        if row.startswith("| ") and "/" in row.split("|")[1] and "K step" not in row
    }
    assert set(rows) == {"64 / 3", "32 / 3", "64 / 4", "32 / 4"}
    l2 = {k: float(v[2]) for k, v in rows.items()}
    latency = {k: float(v[3]) for k, v in rows.items()}
    # the L2 reading: the same bytes, about the same time; the latency reading: twice the steps
    assert abs(l2["32 / 3"] / l2["64 / 3"] - 1) < 0.1
    assert latency["32 / 3"] / latency["64 / 3"] > 1.3
    # the weight gradient's 128-pixel steps: the same bytes, two thirds of the time or less only
    # under the latency reading
    wgrads = {
        (cells[1].strip(), cells[2].strip()): [cell.strip() for cell in cells[3:-1]]
        for cells in (row.split("|") for row in written.read_text().splitlines())
        if len(cells) > 3 and cells[1].strip() in ("tap", "kernel row")
    }
    assert set(wgrads) == {("tap", "128"), ("tap", "208"), ("kernel row", "208")}
    per_tap, deeper = wgrads[("tap", "128")], wgrads[("tap", "208")]
    row_taps = wgrads[("kernel row", "208")]
    assert abs(float(deeper[3]) / float(per_tap[3]) - 1) < 0.1
    assert float(deeper[4]) / float(per_tap[4]) < 0.75
    # row taps: a gradient tile loaded once for three taps, faster under both readings
    assert float(row_taps[3]) < float(deeper[3])
    assert float(row_taps[4]) < float(deeper[4])
