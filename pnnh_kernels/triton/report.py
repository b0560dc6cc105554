"""Ahead-of-time compile report of the PNNH Triton kernels against named cards' limits, no GPU needed.

``python -m pnnh_kernels.triton.report`` compiles, with ``triton.compile`` for sm_80 (A100) and sm_90
(H100, H200), every launch the launchers would make for the layer shapes it is given: the fused
forward (ReLU on and off, every autotune candidate), the training BatchNorm's statistics and apply
passes, the coder backward, the input gradient (every autotune candidate; eval and training mode)
and the three weight gradients (learner, encoder, decoder), in bf16, fp16 and fp32. It prints per
compile the registers, shared memory, stack and local memory (spills) and the instructions that
matter (tensor-core MMAs, async copies), and checks each against the limits of the cards:

    python -m pnnh_kernels.triton.report --shape 256x128x16x16  # NxCxHxW[,out=,k=,stride=,code=]
    python -m pnnh_kernels.triton.report --grid resnet --check      # exit 1 if a compile does not fit

``--model`` adds, for every sm_90 compile of a convolution mainloop (the forward, the input gradient
and the weight gradients), its mainloop's SASS per iteration by class and the static model's time on
an H200 (pnnh_kernels.mainloop: modelled, not measured; calibrated on the 994ebd4 kernels' Nsight
times, ``python -m pnnh_kernels.mainloop.calibration``). Its DRAM term counts each operand once.

``--grid resnet`` is every conv of ResNet-18/34/50 (PNNH variant) at the CIFAR shape (batch 256,
32 x 32) and the ImageNet shape (batch 64, 224 x 224). The resource numbers come from the cubin, read
with the ``cuobjdump`` that ships inside the triton wheel. Launches that compile to the same kernel
(same tiles, flags and specialisation) are compiled once and listed with the shapes that use them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pnnh_kernels.mainloop import sass
from pnnh_kernels.mainloop.model import LATENCY_READING, LaunchShape, modelled_time
from pnnh_kernels.shapes import argparse_type, shape_with_options
from pnnh_kernels.triton import kernels
from pnnh_kernels.triton.pnnh_conv_config import (
    ConvConfig,
    WgradTiles,
    block_size,
    cdiv,
    code_in_main_loop,
    config_for_card,
    deep_k,
    input_gradient_config,
    narrow_coder_backward,
    narrow_coder_epilogue,
    reduce_block_k,
    row_taps_allowed,
    tuning_configs,
    wgrad_card_splits,
    wgrad_programs,
    wgrad_rows,
    wgrad_split_rows,
    wgrad_tiles,
)

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}


@dataclass(frozen=True)
class Card:
    name: str
    target: str
    shared_memory_per_block: int  # the opt-in maximum of dynamic shared memory one block may use
    registers_per_block: int = 65536
    registers_per_thread: int = 255


# One documented place for the limits (CUDA programming guide, compute capabilities 8.0 and 9.0).
CARDS = {
    "A100": Card("A100", "sm_80", 166_912),
    "H100": Card("H100", "sm_90", 232_448),
    "H200": Card("H200", "sm_90", 232_448),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Pointers that are float32 whatever the data dtype (folded BatchNorm vectors, statistics, partials).
FLOAT32_POINTERS = {
    "scale_ptr", "shift_ptr", "out_ptr", "mean_part_ptr", "m2_part_ptr", "mean_ptr",
    "sum_dp_part_ptr", "sum_dpz_part_ptr", "coefficients_ptr",
}  # fmt: skip
INSTRUCTIONS = {
    "mma.sync": r"\bmma\.sync\b",
    "wgmma": r"\bwgmma\.mma_async\b",
    "cp.async": r"\bcp\.async\.(?:ca|cg)\b",
    "cp.async.bulk(TMA)": r"\bcp\.async\.bulk\b",
    "ldmatrix": r"\bldmatrix\b",
}


@dataclass(frozen=True)
class LayerShape:
    """One conv layer as the launchers see it (square kernel, stride and dilation)."""

    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: int = 3
    stride: int = 1
    c_b: int = -1  # code channels; -1: half of c_out, as the models' coders
    dilation: int = 1

    @property
    def code_channels(self) -> int:
        return self.c_out // 2 if self.c_b < 0 else self.c_b

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel - 1) // 2

    def output_size(self) -> tuple[int, int]:
        reach = self.dilation * (self.kernel - 1)
        return (
            (self.h + 2 * self.padding - reach - 1) // self.stride + 1,
            (self.w + 2 * self.padding - reach - 1) // self.stride + 1,
        )

    def __str__(self) -> str:
        tail = f"k{self.kernel}s{self.stride}" + (f"d{self.dilation}" if self.dilation > 1 else "")
        return f"{self.n}x{self.c_in}->{self.c_out}(b{self.code_channels})@{self.h}x{self.w}/{tail}"


def parse_shape(text: str) -> LayerShape:
    """``NxC_INxHxW[,out=C_OUT][,k=K][,stride=S][,code=C_B]`` (pnnh_kernels.shapes): C_OUT defaults
    to C_IN, K to 3, S to 1, C_B to C_OUT / 2 (``code=0``: no coder)."""
    (n, c_in, h, w), options = shape_with_options(
        text, {"out": 0, "k": 3, "stride": 1, "code": -1}, "--shape"
    )
    if options["k"] < 1 or options["stride"] < 1:
        raise ValueError(f"--shape: k and stride must be positive, got {text!r}")
    return LayerShape(
        n, c_in, options["out"] or c_in, h, w, options["k"], options["stride"], options["code"]
    )


def resnet_grid() -> list[LayerShape]:
    """Every distinct conv of ResNet-18/34/50 (pnnh_kernels.models.resnet, PNNH variant: a coder of
    half the input width on every conv but the stem's) at the CIFAR shape (batch 256, 32 x 32, 3x3
    stem) and the ImageNet shape (batch 64, 224 x 224, 7x7 stride-2 stem and max-pool), with the
    stride on the block's 3x3 conv (torchvision's v1.5 Bottleneck). Written out rather than read
    from built models: building them pretrains their coders, minutes on a CPU
    (tests/test_triton_compile.py checks the two agree on ResNet-18 at the CIFAR shape)."""
    shapes: dict[LayerShape, None] = {}
    for blocks, bottleneck in (((2, 2, 2, 2), False), ((3, 4, 6, 3), False), ((3, 4, 6, 3), True)):
        for n, size, imagenet in ((256, 32, False), (64, 224, True)):
            shapes.update(dict.fromkeys(resnet_shapes(blocks, bottleneck, n, size, imagenet)))
    return list(shapes)


def resnet_shapes(
    blocks: tuple[int, ...], bottleneck: bool, n: int, size: int, imagenet: bool
) -> list[LayerShape]:
    """The convs of one ResNet (see :func:`resnet_grid`), in order, repeats included."""
    shapes: list[LayerShape] = []

    def conv(c_in: int, c_out: int, kernel: int, stride: int) -> None:
        shapes.append(LayerShape(n, c_in, c_out, size, size, kernel, stride, c_in // 2))

    if imagenet:
        shapes.append(LayerShape(n, 3, 64, size, size, 7, 2, 0))
        size //= 4  # the stem's stride 2 and the max-pool's
    else:
        shapes.append(LayerShape(n, 3, 64, size, size, 3, 1, 0))
    channels = 64
    for stage, count in enumerate(blocks):
        width = 64 * 2**stage
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            if bottleneck:
                conv(channels, width, 1, 1)
                conv(width, width, 3, stride)
                size //= stride
                conv(width, 4 * width, 1, 1)
                channels = 4 * width
            else:
                conv(channels, width, 3, stride)
                size //= stride
                conv(width, width, 3, 1)
                channels = width
    return shapes


def model_shapes(model: torch.nn.Module, batch: int, size: int) -> list[LayerShape]:
    """The FusedPNNHConv shapes of ``model`` on a ``batch`` of ``size`` x ``size`` images, read with
    forward hooks on a one-image batch."""
    from pnnh_kernels.pnnh_conv import FusedPNNHConv

    shapes: dict[LayerShape, None] = {}

    def record(layer: FusedPNNHConv, inputs: tuple, _output: Any) -> None:
        _, c_in, h, w = inputs[0].shape
        geometry = layer.geometry
        shapes[
            LayerShape(batch, c_in, layer.out_channels, h, w, geometry.kernel_size[0],
                       geometry.stride[0], layer.code_channels, geometry.dilation[0])
        ] = None  # fmt: skip

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, FusedPNNHConv)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return list(shapes)


@dataclass(frozen=True)
class Launch:
    """One kernel launch a launcher would make: the kernel, its compile-time arguments, its runtime
    integers (for the JIT's specialisation) and its warps and stages."""

    name: str  # the kernel and the variant, e.g. "_conv_wgrad_kernel[learner, relu]"
    kernel: str  # its name in pnnh_kernels.triton.kernels (a name, so that launches pickle)
    constexprs: tuple[tuple[str, Any], ...]
    ints: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int
    max_registers: Optional[int] = None  # Triton's maxnreg, where the launcher sets one

    @property
    def fn(self) -> Any:
        return getattr(kernels, self.kernel)

    def compile_key(self, dtype: torch.dtype) -> tuple:
        """Launches with equal keys compile to the same kernel: the same compile-time arguments and
        the same JIT specialisation of the runtime integers (which are 1, which multiples of 16)."""
        hints = tuple((name, value == 1, value % 16 == 0) for name, value in self.ints)
        return (self.name, self.constexprs, hints, self.num_warps, self.num_stages,
                self.max_registers, dtype)  # fmt: skip


def _int_arguments(fn: Any, constexprs: dict[str, Any]) -> list[str]:
    return [name for name in fn.arg_names if name not in constexprs and not name.endswith("_ptr")]


# The card of each target whose size the launchers' tile choices assume (an H100/H200 for sm_90).
_TARGET_CARD = {"sm_80": ((8, 0), 108), "sm_90": ((9, 0), 132)}


def _config(shape: LayerShape, dtype: torch.dtype, target: str) -> ConvConfig:
    oh, ow = shape.output_size()
    capability, multiprocessors = _TARGET_CARD[target]
    return config_for_card(
        shape.c_in, shape.c_out, shape.code_channels, dtype, shape.n * oh * ow, capability,
        multiprocessors,
    )  # fmt: skip


def launches(
    shape: LayerShape,
    dtype: torch.dtype,
    target: str = "sm_80",
    config: Optional[ConvConfig] = None,
) -> list[Launch]:
    """Every launch of a training step and an eval forward of ``shape`` in ``dtype``, with the
    launchers' tile choices (pnnh_kernels.triton.pnnh_conv) on a card of ``target`` and every
    autotune candidate; ``config`` instead of the launchers' choice where given (an experiment's
    tiles)."""
    config = config if config is not None else _config(shape, dtype, target)
    c_b = shape.code_channels
    has_coder = c_b > 0
    oh, ow = shape.output_size()
    m = shape.n * oh * ow
    geometry = {
        "stride_h": shape.stride,
        "stride_w": shape.stride,
        "pad_h": shape.padding,
        "pad_w": shape.padding,
        "dil_h": shape.dilation,
        "dil_w": shape.dilation,
    }
    ints = {
        "M": m,
        "NHW": shape.n * shape.h * shape.w,
        "H": shape.h,
        "W": shape.w,
        "OH": oh,
        "OW": ow,
        "C_in": shape.c_in,
        "C_out": shape.c_out,
        "C_B": c_b,
        **geometry,
        # a channels_last weight [C_out, C_in, KH, KW], as the models hold it
        "w_stride_co": shape.kernel * shape.kernel * shape.c_in,
        "w_stride_ci": 1,
        "w_stride_kh": shape.kernel * shape.c_in,
        "w_stride_kw": shape.c_in,
    }
    common = {"INPUT_PRECISION": "tf32" if dtype == torch.float32 else "ieee", "UPCAST_DOT": False}
    result: list[Launch] = []

    def add(
        variant: str,
        fn: Any,
        constexprs: dict,
        warps: int,
        stages: int,
        max_registers: Optional[int] = None,
        **extra: int,
    ) -> None:
        constexprs = {**common, **constexprs}
        wanted = {**ints, **extra}
        used = {k: wanted[k] for k in _int_arguments(fn, constexprs)}
        name = f"{fn.__name__}[{variant}]"
        result.append(
            Launch(
                name,
                fn.__name__,
                tuple(sorted(constexprs.items())),
                tuple(sorted(used.items())),
                warps,
                stages,
                max_registers,
            )
        )

    def candidates(of: ConvConfig = config) -> Iterable[tuple[dict, int, int]]:
        for candidate in tuning_configs(of, dtype):
            yield dict(candidate.kwargs), candidate.num_warps, candidate.num_stages

    default = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k}
    forward = {
        "KH": shape.kernel,
        "KW": shape.kernel,
        "HAS_SCALE": True,
        "HAS_SHIFT": True,
        "HAS_CODER": has_coder,
        "HAS_ENCODER_BIAS": has_coder,
        "WRITE_STATS": False,
        "BLOCK_B": config.block_b,
    }
    epilogue_config = narrow_coder_epilogue(config)
    in_main_loop = code_in_main_loop(epilogue_config, c_b, shape.kernel, shape.kernel)
    for relu in (True, False):
        for tiles, warps, stages in candidates(epilogue_config):
            fused = {**forward, **tiles, "CODE_IN_MAIN_LOOP": in_main_loop, "Z_INPUT": False}
            add("relu" if relu else "linear", kernels._pnnh_conv_fwd_kernel,
                {**fused, "RELU": relu}, warps, stages)  # fmt: skip
            applied = {**forward, **tiles, "CODE_IN_MAIN_LOOP": False, "Z_INPUT": True}
            add("bn apply, relu" if relu else "bn apply, linear", kernels._pnnh_conv_fwd_kernel,
                {**applied, "RELU": relu}, warps, stages)  # fmt: skip
    # The models' convs have no bias before BatchNorm: no shift in the statistics pass.
    deep = deep_k(config)
    statistics = {**forward, **default, "HAS_SCALE": False, "HAS_SHIFT": False, "HAS_CODER": False}
    statistics.update(HAS_ENCODER_BIAS=False, CODE_IN_MAIN_LOOP=False, WRITE_STATS=True)
    statistics.update(BLOCK_K=deep.block_k)
    add("bn stats", kernels._pnnh_conv_fwd_kernel, {**statistics, "Z_INPUT": False, "RELU": False},
        deep.num_warps, deep.num_stages, deep.statistics_max_registers)  # fmt: skip
    # Input gradient: eval mode (scale folded, ReLU mask), training mode (BatchNorm's dz as it is:
    # no mask, no scale), and a layer without an output ReLU.
    for has_scale, relu in ((True, True), (False, False), (True, False)):
        dgrad_config = input_gradient_config(config, relu, shape.stride == 1, has_scale)
        for tiles, warps, stages in candidates(dgrad_config):
            dgrad = {"KH": shape.kernel, "KW": shape.kernel, "HAS_SCALE": has_scale,
                     "HAS_CODER": has_coder, "RELU": relu, "UNIT_STRIDE": shape.stride == 1,
                     **tiles}  # fmt: skip
            label = ("eval" if has_scale else "train-BN") + (", relu" if relu else "")
            add(label, kernels._pnnh_conv_dgrad_kernel, dgrad, warps, stages)
    _add_backward_passes(add, shape, config, dtype, oh, ow, _TARGET_CARD[target][1])
    return result


def _add_backward_passes(
    add: Any,
    shape: LayerShape,
    config: ConvConfig,
    dtype: torch.dtype,
    oh: int,
    ow: int,
    multiprocessors: int,
) -> None:
    """The backward's first passes and weight gradients of :func:`launches` (``add`` records one)
    on a card of ``multiprocessors``."""
    c_b = shape.code_channels
    has_coder = c_b > 0
    # (label, C_x, C_g, kernel size, ReLU mask, stored in the weight's layout, H, W); training
    # BatchNorm's reads its stored dz (no mask) and writes the weight's gradient in place
    wgrads = [
        ("learner, relu", shape.c_in, shape.c_out, shape.kernel, True, False, shape.h, shape.w),
        ("learner", shape.c_in, shape.c_out, shape.kernel, False, False, shape.h, shape.w),
        ("learner, train-BN", shape.c_in, shape.c_out, shape.kernel, False, True, shape.h, shape.w),
    ]  # fmt: skip
    # The backward's first pass: the coder (with or without its code written for a trainable
    # coder's weight gradients) and training BatchNorm's per-tile sums, or the sums alone.
    block_b = block_size(c_b, config.block_b) if has_coder else 16
    passes = [(True, False, False), (True, True, False), (False, True, True)] if has_coder else []
    passes += [(False, True, False)]  # no coder: the BatchNorm sums only
    for coder_pass, bn_reduce, write_code in passes:
        first = {"HAS_CODER": coder_pass, "HAS_ENCODER_BIAS": coder_pass, "WRITE_CODE": write_code,
                 "BN_REDUCE": bn_reduce, "RELU": True,
                 "BLOCK_M": narrow_coder_backward(config).block_m,
                 "BLOCK_B": block_b,
                 "BLOCK_K": reduce_block_k(config, coder_pass, bn_reduce)}  # fmt: skip
        label = ("coder" if coder_pass else "no coder") + (", train-BN" if bn_reduce else "")
        label += ", code written" if write_code else ""
        add(label, kernels._pnnh_coder_bwd_kernel, first, config.num_warps, config.num_stages)
    if has_coder:
        wgrads += [("encoder", shape.c_in, c_b, 1, False, False, shape.h, shape.w),
                   ("decoder, relu", c_b, shape.c_out, 1, True, False, oh, ow),
                   ("decoder", c_b, shape.c_out, 1, False, False, oh, ow)]  # fmt: skip
    for label, c_x, c_g, kernel, relu, strided_out, height, width in wgrads:
        extra = {"C_x": c_x, "C_g": c_g, "H": height, "W": width,
                 "out_stride_g": kernel * kernel * c_x, "out_stride_x": 1,
                 "out_stride_kh": kernel * c_x, "out_stride_kw": c_x}  # fmt: skip
        if label.startswith("decoder"):
            extra.update(stride_h=1, stride_w=1)
        if kernel == 1:
            extra.update(pad_h=0, pad_w=0, dil_h=1, dil_w=1)
        stride = extra.get("stride_h", shape.stride)
        pad = extra.get("pad_h", shape.padding)
        rows = wgrad_rows((kernel, kernel), (stride, stride), (pad, pad), (height, width), (oh, ow))
        row_taps = row_taps_allowed(rows, (kernel, kernel))
        tiles = wgrad_tiles(config, c_x, c_g, dtype, relu, kernel * kernel, multiprocessors,
                            row_taps=row_taps, pixels=shape.n * oh * ow)  # fmt: skip
        extra["m_per_split"] = 8 * tiles.block_m
        wgrad = {"KH": kernel, "KW": kernel, "RELU": relu, "STRIDED_OUT": strided_out,
                 "ROW_TAPS": tiles.row_taps, "BLOCK_X": tiles.block_x, "BLOCK_G": tiles.block_g,
                 "BLOCK_M": tiles.block_m, **rows}  # fmt: skip
        add(label, kernels._conv_wgrad_kernel, wgrad, config.num_warps, tiles.stages,
            **extra)  # fmt: skip


def specialise(launch: Launch, dtype: torch.dtype) -> tuple[dict[str, str], dict[str, Any], dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, specialised like a JIT launch: an int equal
    to 1 becomes a constant, a multiple of 16 is marked divisible by 16 (as are the pointers), which
    is what lets the compiler vectorise loads. Without these hints the compiled code differs from
    what a GPU launch compiles (per-element pointers, and spills that never happen)."""
    types: dict[str, str] = {}
    constexprs = dict(launch.constexprs)
    attrs: dict[tuple[int, ...], list] = {}
    divisible = [["tt.divisibility", 16]]
    ints = dict(launch.ints)
    for index, name in enumerate(launch.fn.arg_names):
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*fp32" if name in FLOAT32_POINTERS else "*" + TRITON_TYPES[dtype]
            attrs[(index,)] = divisible
        elif ints[name] == 1:
            constexprs[name] = 1
            types[name] = "constexpr"
        else:
            types[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(index,)] = divisible
    return types, constexprs, attrs


def compile_launch(launch: Launch, dtype: torch.dtype, target: str) -> Any:
    types, constexprs, attrs = specialise(launch, dtype)
    source = ASTSource(launch.fn, types, constexprs, attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    if launch.max_registers is not None:
        options["maxnreg"] = launch.max_registers
    return triton.compile(source, target=TARGETS[target], options=options)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in ``cubin``."""
    (usage,) = sass.resource_usage(cubin).values()
    return usage


@dataclass
class Row:
    kernel: str
    dtype: str
    target: str
    tiles: str
    warps: int
    stages: int
    registers: int
    shared_bytes: int
    stack: int
    local: int
    instructions: dict[str, int]
    shapes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # sm_90 with --model: the mainloop's SASS per iteration by class, and the modelled time
    mainloop: Optional[dict[str, int]] = None
    modelled_us: Optional[float] = None
    bound: str = ""
    latency_reading_us: Optional[float] = None  # the same, modelled under model.LATENCY_READING


def model_launch(
    launch: Launch, dtype: torch.dtype, registers: int, shared: int
) -> Optional[LaunchShape]:
    """What the static model needs of a convolution mainloop's launch: its grid (as the launchers
    make it; weight-gradient splits for an H100's 132 multiprocessors), the MMA work and DRAM bytes
    with each operand read or written once. None for the other kernels."""
    c, i = dict(launch.constexprs), dict(launch.ints)
    size = torch.finfo(dtype).bits // 8
    taps = c.get("KH", 1) * c.get("KW", 1)
    ratio = i["H"] * i["W"] / (i["OH"] * i["OW"])  # input pixels per output pixel
    if launch.kernel == "_pnnh_conv_fwd_kernel" and not c["Z_INPUT"]:
        ctas = cdiv(i["M"], c["BLOCK_M"]) * cdiv(i["C_out"], c["BLOCK_N"])
        flops = 2.0 * i["M"] * i["C_out"] * taps * i["C_in"]
        operands = i["M"] * ratio * i["C_in"] + i["C_out"] * taps * i["C_in"] + i["M"] * i["C_out"]
    elif launch.kernel == "_pnnh_conv_dgrad_kernel":
        ctas = cdiv(i["NHW"], c["BLOCK_M"]) * cdiv(i["C_in"], c["BLOCK_N"])
        flops = 2.0 * i["NHW"] * i["C_in"] * taps * i["C_out"]
        reads = 2 if c["RELU"] else 1  # dy (or dz), and y where read
        operands = reads * i["NHW"] / ratio * i["C_out"] + i["C_out"] * taps * i["C_in"]
        operands += i["NHW"] * i["C_in"]
    elif launch.kernel == "_conv_wgrad_kernel":
        # as pnnh_conv._wgrad_plan sizes it, for an H100/H200's 132 multiprocessors
        pixels, c_x, c_g, kernel = i["M"], i["C_x"], i["C_g"], (c["KH"], c["KW"])
        reads = 1 + c["RELU"]  # dy (or dz), and y where read
        program = WgradTiles(
            c["BLOCK_X"], c["BLOCK_G"], c["BLOCK_M"], launch.num_stages, row_taps=c["ROW_TAPS"]
        )
        card = ((9, 0), 132)
        splits = wgrad_card_splits(program, c_x, c_g, kernel, pixels, dtype, c["RELU"], card)
        splits, _ = wgrad_split_rows(pixels, c["BLOCK_M"], splits)
        ctas = wgrad_programs(program, c_x, c_g, kernel) * splits
        flops = 2.0 * pixels * taps * c_x * c_g
        operands = pixels * ratio * c_x + reads * pixels * c_g
        if splits > 1:  # float32 partials, written and read back by the reduction
            operands += 2 * splits * taps * c_x * c_g * 4 // size
    else:
        return None
    warps = launch.num_warps
    return LaunchShape(ctas, warps, registers, shared, flops, operands * size)


def _mainloop_step_flops(launch: Launch) -> Optional[int]:
    """MMA work of one mainloop iteration of the CTA (one K step of its tile), where known."""
    c = dict(launch.constexprs)
    if launch.kernel in ("_pnnh_conv_fwd_kernel", "_pnnh_conv_dgrad_kernel"):
        if c.get("Z_INPUT"):
            return None
        return 2 * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"]
    if launch.kernel == "_conv_wgrad_kernel":
        return 2 * c["BLOCK_X"] * c["BLOCK_G"] * c["BLOCK_M"] * (c["KW"] if c["ROW_TAPS"] else 1)
    return None


# The ledger's names of the Triton launches the model reads, by BatchNorm mode, and the report's
# variant of each (the first candidate of a variant is the launchers' default tiles).
_LEDGER_VARIANTS = {
    True: {
        "_pnnh_conv_fwd_kernel (statistics)": "_pnnh_conv_fwd_kernel[bn stats]",
        "_pnnh_conv_dgrad_kernel": "_pnnh_conv_dgrad_kernel[train-BN]",
        "_conv_wgrad_kernel": "_conv_wgrad_kernel[learner, train-BN]",
    },
    False: {
        "_pnnh_conv_fwd_kernel (fused)": "_pnnh_conv_fwd_kernel[relu]",
        "_pnnh_conv_dgrad_kernel": "_pnnh_conv_dgrad_kernel[eval, relu]",
        "_conv_wgrad_kernel": "_conv_wgrad_kernel[learner, relu]",
    },
}


def modelled_mainloops(
    shape: LayerShape, dtype: torch.dtype, training: bool, latency_reading: bool = False
) -> dict[str, float]:
    """The static model's H200 time (seconds; modelled) of a PNNH layer's convolution mainloops at
    ``shape``, by the ledger's launch names (``pnnh ledger --model``): the launchers' default tiles,
    sm_90. The learner's weight gradient only (the coder's 1x1 ones share its ledger name).
    ``latency_reading``: under model.LATENCY_READING instead of the calibrated constants."""
    wanted = _LEDGER_VARIANTS[training]
    by_variant = {variant: name for name, variant in wanted.items()}
    chosen: dict[str, Launch] = {}
    for launch in launches(shape, dtype, "sm_90"):
        if launch.name in by_variant and launch.name not in chosen:
            chosen[launch.name] = launch
    times: dict[str, float] = {}
    for variant, launch in chosen.items():
        row = _compile_row((launch, TRITON_TYPES[dtype], "sm_90", True))
        modelled_us = row.latency_reading_us if latency_reading else row.modelled_us
        if modelled_us is not None:
            times[by_variant[variant]] = modelled_us * 1e-6
    return times


def compile_row(launch: Launch, dtype_name: str, target: str, with_model: bool = False) -> Row:
    """One launch compiled for ``target`` and read (its mainloop modelled on sm_90 if asked)."""
    return _compile_row((launch, dtype_name, target, with_model))


def _compile_row(job: tuple[Launch, str, str, bool]) -> Row:
    launch, dtype_name, target, with_model = job
    compiled = compile_launch(launch, DTYPES[dtype_name], target)
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    constexprs = dict(launch.constexprs)
    mainloop, modelled_us, bound, latency_us = None, None, "", None
    if with_model and target == "sm_90":
        step = _mainloop_step_flops(launch)
        per_warp = None if step is None else step // launch.num_warps
        (listing,) = sass.listings(compiled.asm["cubin"], per_warp).values()
        if listing.mainloop is not None:
            mainloop = {**listing.mainloop.counts(), "total": len(listing.mainloop)}
        shape = model_launch(launch, DTYPES[dtype_name], usage.get("REG", 0), compiled.metadata.shared)
        if shape is not None and listing.mainloop is not None:
            modelled = modelled_time(listing, shape)
            modelled_us, bound = modelled.seconds * 1e6, modelled.bound
            latency_us = modelled_time(listing, shape, constants=LATENCY_READING).seconds * 1e6
    return Row(
        kernel=launch.name,
        dtype=dtype_name,
        target=target,
        tiles=",".join(f"{k[6:]}={v}" for k, v in constexprs.items() if k.startswith("BLOCK_")),
        warps=launch.num_warps,
        stages=launch.num_stages,
        registers=usage.get("REG", -1),
        shared_bytes=int(compiled.metadata.shared),
        stack=usage.get("STACK", -1),
        local=usage.get("LOCAL", -1),
        instructions={name: len(re.findall(pattern, ptx)) for name, pattern in INSTRUCTIONS.items()},
        mainloop=mainloop,
        modelled_us=modelled_us,
        bound=bound,
        latency_reading_us=latency_us,
    )


def problems(row: Row, card: Card) -> list[str]:
    """What keeps the compiled kernel from launching well on ``card`` (empty: it fits)."""
    found = []
    if min(row.registers, row.stack, row.local) < 0:
        found.append("resources unreadable: cuobjdump's report did not parse")
    if row.shared_bytes > card.shared_memory_per_block:
        found.append(f"{card.name}: shared memory {row.shared_bytes} > {card.shared_memory_per_block}")
    if row.registers * 32 * row.warps > card.registers_per_block:
        found.append(f"{card.name}: {row.registers} registers x {32 * row.warps} threads > 65536")
    if row.stack or row.local:
        found.append(f"spills (stack {row.stack}, local {row.local})")
    return found


def report_rows(
    shapes: list[LayerShape],
    dtype_names: list[str],
    card_names: list[str],
    jobs: int = 1,
    only: Optional[str] = None,
    with_model: bool = False,
) -> list[Row]:
    """One row per distinct compile of the launches of ``shapes`` (those whose name matches the
    regular expression ``only``, if given), checked against the named cards."""
    targets = sorted({CARDS[name].target for name in card_names})
    unique: dict[tuple, tuple[Launch, str, str, bool]] = {}
    used_by: dict[tuple, list[str]] = {}
    for dtype_name in dtype_names:
        for shape in shapes:
            for target in targets:
                for launch in launches(shape, DTYPES[dtype_name], target):
                    if only is not None and not re.search(only, launch.name):
                        continue
                    key = (*launch.compile_key(DTYPES[dtype_name]), target)
                    if with_model and target == "sm_90":  # the model reads the grid: per shape
                        key = (*key, str(shape))
                    unique.setdefault(key, (launch, dtype_name, target, with_model))
                    used_by.setdefault(key, []).append(str(shape))
    keys = list(unique)
    if not keys:
        raise ValueError(f"no launch matches --only {only!r}" if only else "no launches to compile")
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_compile_row, [unique[k] for k in keys]))
    else:
        rows = [_compile_row(unique[k]) for k in keys]
    for key, row in zip(keys, rows):
        row.shapes = sorted(set(used_by[key]))
        for name in card_names:
            if CARDS[name].target == row.target:
                row.problems += problems(row, CARDS[name])
    return rows


def format_model_table(rows: list[Row]) -> str:
    """The modelled rows: one per launch and shape (sm_90, H200, modelled, not measured)."""
    header = (
        "| kernel | shape | tiles | warps/stages | mainloop SASS per iteration: total (tensor / "
        "global / shared / integer / float / barrier) | modelled H200 time (µs) | bound "
        "| latency reading (µs, modelled) |"
    )
    lines = [header, "|" + "---|" * 8]
    for row in sorted(rows, key=lambda r: (r.shapes, r.kernel)):
        if row.modelled_us is None or row.mainloop is None:
            continue
        loop = row.mainloop
        classes = " / ".join(
            str(loop[k]) for k in ("tensor", "global", "shared", "integer", "float", "barrier")
        )
        lines.append(
            f"| {row.kernel} | {row.shapes[0]} | {row.tiles} | {row.warps}/{row.stages} "
            f"| {loop['total']} ({classes}) | {row.modelled_us:.1f} | {row.bound} "
            f"| {row.latency_reading_us:.1f} |"
        )
    return "\n".join(lines)


def format_table(rows: list[Row]) -> str:
    header = (
        "| kernel | dtype | target | tiles | warps/stages | regs | smem (B) "
        "| stack/local (spills) | instructions | shapes | fits |"
    )
    lines = [header, "|" + "---|" * 11]
    for row in sorted(rows, key=lambda r: (r.kernel, r.dtype, r.target, -r.shared_bytes)):
        used = ", ".join(f"{name} x{count}" for name, count in row.instructions.items() if count)
        shapes = row.shapes[0] + (f" (+{len(row.shapes) - 1})" if len(row.shapes) > 1 else "")
        lines.append(
            f"| {row.kernel} | {row.dtype} | {row.target} | {row.tiles} | {row.warps}/{row.stages} "
            f"| {row.registers} | {row.shared_bytes} | {row.stack}/{row.local} "
            f"| {used or 'no tensor-core MMA'} | {shapes} | {'; '.join(row.problems) or 'yes'} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pnnh_kernels.triton.report", description=__doc__.splitlines()[0]
    )
    shape_help = (
        "NxC_INxHxW[,out=C_OUT][,k=K][,stride=S][,code=C_B] (defaults: C_OUT = C_IN, K 3, S 1, "
        "C_B = C_OUT / 2); repeatable"
    )
    parser.add_argument(
        "--shape", type=argparse_type(parse_shape), action="append", default=[], help=shape_help
    )
    grid_help = "every conv of ResNet-18/34/50, CIFAR and ImageNet"
    parser.add_argument("--grid", choices=["resnet"], help=grid_help)
    parser.add_argument("--dtype", choices=list(DTYPES), action="append")
    parser.add_argument("--card", choices=list(CARDS), action="append")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--only", metavar="REGEX", help="only the launches whose name matches")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a compile does not fit a card")
    model_help = "also read each sm_90 mainloop's SASS and print its modelled H200 time"
    parser.add_argument("--model", action="store_true", help=model_help)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    shapes = list(args.shape) + (resnet_grid() if args.grid == "resnet" else [])
    if not shapes:
        shapes = [LayerShape(256, 64, 64, 32, 32)]  # ResNet-18's first CIFAR stage
    cards = args.card or list(CARDS)
    rows = report_rows(shapes, args.dtype or list(DTYPES), cards, args.jobs, args.only, args.model)
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    print(f"triton {triton.__version__}; {len(shapes)} layer shapes, {len(rows)} distinct compiles; "
          f"cards: {', '.join(cards)}\n")  # fmt: skip
    print(format_table(rows))
    if args.model:
        print("\nThe static mainloop model (pnnh_kernels.mainloop), H200, modelled, not measured:\n")
        print(format_model_table(rows))
    failing = [row for row in rows if row.problems]
    print(
        f"\n{len(failing)} of {len(rows)} compiles do not fit." if failing else "\nEvery compile fits."
    )
    if args.check and failing:
        sys.exit(1)


if __name__ == "__main__":
    main()
