"""The tile and autotuning policy of the fused convolution's Triton kernels: the configuration of
each launch (tile sizes, warps, stages, the weight gradient's tiles and split count, where the code
is encoded) and the autotuner's candidates. Pure functions of a launch's shape, dtype and device,
memoised where the launchers ask on every call; the launchers (pnnh_kernels.triton.pnnh_conv) use
them, and the ahead-of-time report (pnnh_kernels.triton.report) compiles what they choose.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton

from pnnh_kernels.backends.fused_common import capped_wgrad_splits
from pnnh_kernels.observer import modelled_capability, modelled_multiprocessors
from pnnh_kernels.triton.availability import interpreter_enabled

# Shared memory one block may use: an A100's opt-in maximum is 166,912 bytes, an H100/H200's
# 232,448. The weight gradient's pipeline is sized to a budget below the card's (every card's
# configuration but sm_90's 16-bit one takes the A100's, sm_90's its own); ``python -m
# pnnh_kernels.triton.report --check`` checks the compiled kernels against each card's limit.
WGRAD_SHARED_MEMORY_BUDGET = 128 * 1024
HOPPER_WGRAD_SHARED_MEMORY_BUDGET = 208 * 1024


@dataclass(frozen=True)
class ConvConfig:
    """Tile sizes of the conv kernels (M: pixels, N: output or input channels, K: reduction chunk,
    B: code channels). Each is a power of two >= 16, as ``tl.dot`` needs."""

    block_m: int
    block_n: int
    block_k: int
    block_b: int
    num_warps: int = 4
    num_stages: int = 2
    wgrad_splits: Optional[int] = None  # None: chosen from the GPU's size (see wgrad_splits)
    # The forward statistics pass's register cap (Triton's maxnreg), None: the compiler's choice.
    statistics_max_registers: Optional[int] = None
    # The weight gradient's image-channel tile is at most this (see wgrad_tiles).
    wgrad_image_tile: int = 64
    # The weight gradient's gradient-channel tile where the grid of such tiles is wide enough
    # (wgrad_tiles); None: the output tile's width, at most 128 in 16-bit and 64 in fp32.
    wgrad_gradient_tile: Optional[int] = None
    # The shared memory the weight gradient's pipeline may take (wgrad_tiles halves its pixel step
    # until it fits).
    wgrad_shared_budget: int = WGRAD_SHARED_MEMORY_BUDGET
    # The statistics pass's and the training input gradient's K chunk and stages where they go
    # deeper than block_k (deep_k); None: block_k and num_stages.
    deep_block_k: Optional[int] = None
    deep_stages: Optional[int] = None
    # The weight gradient reduces a kernel row's three taps a program where its rows allow
    # (wgrad_tiles: the kernel's ROW_TAPS).
    wgrad_row_taps: bool = False


# One large-block configuration for the CPU interpreter: it runs one Python program per tile, so
# fewer, larger tiles keep the tests fast.
INTERPRETER_CONFIG = ConvConfig(
    block_m=64, block_n=64, block_k=64, block_b=64, num_warps=1, num_stages=1
)

_forced_config: Optional[ConvConfig] = None


def forcing() -> bool:
    """Whether a test's :func:`forced_config` is in force (every launch takes its tiles, none
    autotunes)."""
    return _forced_config is not None


@contextlib.contextmanager
def forced_config(config: ConvConfig) -> Iterator[None]:
    """Run every launch in the block with ``config`` (tests use it to exercise the chunked paths)."""
    global _forced_config
    previous, _forced_config = _forced_config, config
    try:
        yield
    finally:
        _forced_config = previous


def cdiv(a: int, b: int) -> int:
    # Integer arithmetic on the host: triton.cdiv is a constexpr function there (~4 µs a call).
    return -(-a // b)


def block_size(size: int, cap: int) -> int:
    return max(16, min(cap, 1 << max(0, size - 1).bit_length()))


def choose_config(
    c_in: int,
    c_out: int,
    c_b: int,
    dtype: torch.dtype,
    pixels: int = 0,
    device: Optional[torch.device] = None,
) -> ConvConfig:
    """The tiles of a layer's launches: ``pixels`` (its output pixels) and ``device`` choose the
    larger sm_90 tiles (:func:`large_tiles`); without them, the tiles every card runs."""
    if _forced_config is not None:
        return _forced_config
    if interpreter_enabled():
        return INTERPRETER_CONFIG
    return _launch_config(c_in, c_out, c_b, dtype, pixels, device)


def config_for_card(
    c_in: int,
    c_out: int,
    c_b: int,
    dtype: torch.dtype,
    pixels: int,
    capability: tuple[int, int],
    multiprocessors: int,
) -> ConvConfig:
    """The GPU configuration of a layer on a card (the ahead-of-time report asks per target)."""
    large = large_tiles(c_in, c_out, dtype, pixels, capability, multiprocessors)
    config = _gpu_config(c_in, c_out, c_b, dtype, capability[0] == 9, large == "wide", large == "tall")
    # 128-deep K steps in the statistics pass and the training input gradient (deep_k) where the
    # grid has at most one tile per multiprocessor: their 196 KB pipeline leaves one CTA per
    # multiprocessor, which such a grid gets anyway, and they halve the mainloop iterations for the
    # same bytes. The static model: at 512x512x4x4 (128 x 128 tiles) 59.4 / 63.4 -> 58.5 / 40.3 us
    # (statistics) and 60.0 / 63.9 -> 58.8 / 40.7 (input gradient), at 256x256x8x8 (128 x 256, 2
    # stages) 46.4 / 39.9 -> 46.0 / 30.9 and 45.9 / 39.2 -> 45.7 / 30.3 (calibrated / latency
    # reading). Beside 256 x 128 tiles they spilled (48-240 bytes), and the 128-register cap of
    # 128 x 128 statistics passes spilled 48.
    tiles = cdiv(pixels, config.block_m) * cdiv(c_out, config.block_n)
    sm90_16 = capability[0] == 9 and torch.finfo(dtype).bits <= 16
    if sm90_16 and min(c_in, c_out) >= 128 and config.block_m == 128 and tiles <= multiprocessors:
        # 196,608 bytes of operands either way: 3 stages of 128 x 128, 2 of 128 x 256
        stages = 2 if config.block_n > 128 else 3
        config = replace(config, deep_block_k=128, deep_stages=stages)
    return config


@functools.lru_cache(maxsize=256)  # asked every training step
def deep_k(config: ConvConfig) -> ConvConfig:
    """The statistics pass's and the training input gradient's configuration: ``config`` with its
    deep K steps and stages where it has them (and no register cap: one CTA per multiprocessor)."""
    if config.deep_block_k is None:
        return config
    return replace(
        config, block_k=config.deep_block_k, num_stages=config.deep_stages or config.num_stages,
        statistics_max_registers=None,
    )  # fmt: skip


# Cached by device: a CUDA device's card never changes, and a meta or CPU-stub device stands for
# one fixed card (ledger.cards.MODELLED_CARD, host_cost's sm_90 stand-in); a recording that modelled
# another card would need this cache cleared.
@functools.lru_cache(maxsize=4096)  # the launchers ask on every call
def _launch_config(
    c_in: int, c_out: int, c_b: int, dtype: torch.dtype, pixels: int, device: Optional[torch.device]
) -> ConvConfig:
    card = None if device is None else launch_card(device)
    if card is None:
        return _gpu_config(c_in, c_out, c_b, dtype)  # the tiles every card runs
    return config_for_card(c_in, c_out, c_b, dtype, pixels, *card)


# 128 x 256 tiles (8 warps, 147 KB of shared memory at 3 stages) load 85 FLOP per byte where
# 128 x 128 load 64: the static model (both its readings) puts the forward statistics and the training
# input gradient at 256x256x8x8 about 20% faster with them. On sm_90 they compile without spills
# (211-254 registers) in every variant but two input gradients, which keep 128-wide tiles
# (narrow_input_gradient): with a ReLU mask (24 bytes) and in a strided layer (32). On sm_80
# (mma.sync) they spilled 32-104 bytes, so only sm_90 takes them. Only where both channel counts
# reach 256, and where the grid of wide tiles still gives WIDE_TILE_FILL of the multiprocessors a
# tile (at 512x512x4x4 it would give 64 tiles to 132 multiprocessors, and the model puts it slower
# than 128-wide tiles).
WIDE_TILE_FILL = 0.75


# 256-pixel tiles (beside 64 or 128 output channels) load 51 / 85 FLOP per byte where 128-pixel ones
# load 43 / 64: the static model puts the forward statistics pass and the training input gradient
# at 64x64x32x32 about 11% faster (256 x 64, under both its readings) and at 128x128x16x16 18-20%
# under its calibrated reading and 8% under its latency reading (256 x 128: 59.0 / 45.6 -> 48.1 /
# 42.1 us and 58.8 / 44.8 -> 47.1 / 41.2). sm_90 in 16-bit only (on sm_80 256-pixel tiles spilled),
# from 64 input channels, and where the grid of them gives WIDE_TILE_FILL of the multiprocessors a
# tile (at 512x512x4x4 it would give 64 to 132). Where 128 x 256 tiles are chosen they are kept:
# at 256x256x8x8 the model puts 256 x 128 slightly behind them.
def large_tiles(
    c_in: int,
    c_out: int,
    dtype: torch.dtype,
    pixels: int,
    capability: tuple[int, int],
    multiprocessors: int,
) -> str:
    """sm_90's larger tiles for a layer on a card: "wide" (128 x 256, see WIDE_TILE_FILL), "tall"
    (256 pixels beside 64 or 128 output channels, see above) or "" (128 x 128 at most)."""
    if capability[0] != 9 or torch.finfo(dtype).bits > 16:
        return ""
    fill = WIDE_TILE_FILL * multiprocessors
    if min(c_in, c_out) >= 256 and cdiv(pixels, 128) * cdiv(c_out, 256) >= fill:
        return "wide"
    block_n = block_size(c_out, 128)
    if c_in >= 64 and block_n >= 64 and cdiv(pixels, 256) * cdiv(c_out, block_n) >= fill:
        return "tall"
    return ""


@functools.lru_cache(maxsize=256)  # asked every backward step: a cached lookup, no replace()
def narrow_input_gradient(
    config: ConvConfig, relu: bool, unit_stride: bool, scaled: bool = False
) -> ConvConfig:
    """The input gradient keeps 128 x 128 tiles at most with a ReLU mask or a stride, and 128-pixel
    tiles beside 128 channels with a scale (eval mode): sm_90's wide and tall ones spilled there
    (128 x 256: 24 bytes with the mask, 32 in a stride-2 layer's general path; 256 x 64: 48-104
    bytes with the mask; 256 x 128: 104 bytes with the scale)."""
    if (config.block_n > 128 or config.block_m > 128) and (relu or not unit_stride):
        return replace(config, block_m=min(config.block_m, 128), block_n=min(config.block_n, 128))
    if config.block_m > 128 and config.block_n > 64 and scaled:
        return replace(config, block_m=128)
    return config


@functools.lru_cache(maxsize=256)  # asked every backward step: one cached lookup
def input_gradient_config(config: ConvConfig, relu: bool, unit_stride: bool, scaled: bool) -> ConvConfig:
    """The input gradient's configuration: :func:`narrow_input_gradient`'s, and for training
    BatchNorm's dz (no mask, no scale) at tiles kept as they were, its deep K steps (:func:`deep_k`)."""
    narrowed = narrow_input_gradient(config, relu, unit_stride, scaled)
    if relu or scaled or narrowed != config:
        return narrowed
    return deep_k(config)


@functools.lru_cache(maxsize=256)  # asked every forward: a cached lookup
def narrow_coder_epilogue(config: ConvConfig) -> ConvConfig:
    """The fused forward and the training apply pass (the launches with the coder's epilogue) keep
    128-pixel tiles beside more than 64 output channels: 256 x 128 tiles spilled 176-312 bytes on
    sm_90 there (the code chunk's accumulator beside the output tile's)."""
    if config.block_m > 128 and config.block_n > 64:
        return replace(config, block_m=128)
    return config


@functools.lru_cache(maxsize=256)  # asked every backward step
def narrow_coder_backward(config: ConvConfig) -> ConvConfig:
    """The backward's first pass (the coder and BatchNorm's sums) keeps 128-pixel tiles: sm_90's
    256-pixel ones spilled 16-32 bytes there (a 256 -> 64 1x1 layer with a 128-channel code)."""
    return replace(config, block_m=128) if config.block_m > 128 else config


@functools.lru_cache(maxsize=4096)  # the launchers ask on every call; a pure function of its key
def _gpu_config(
    c_in: int,
    c_out: int,
    c_b: int,
    dtype: torch.dtype,
    hopper: bool = False,
    wide: bool = False,
    tall: bool = False,
) -> ConvConfig:
    # GPU: bf16/fp16 tiles twice as deep as fp32 for the same shared memory per stage. In fp32 with
    # 64-wide output tiles the training-mode input gradient spilled 16 bytes on sm_80 (8 warps at
    # 128 registers) with 32-deep chunks and not with 16-deep ones.
    deep = 64 if dtype != torch.float32 else (32 if c_out > 64 else 16)
    block_n = 256 if wide else block_size(c_out, 128)
    sixteen_bit = torch.finfo(dtype).bits <= 16
    # sm_90, 16-bit: 256-pixel tiles where large_tiles says (cuDNN's fprop takes 256 x 64 and 256 x
    # 128 at these shapes too).
    # sm_90, 16-bit, 128 x 128 tiles: the forward statistics pass held to 128 registers, which lets
    # two CTAs share a multiprocessor (at 128x128x16x16 it took 134: one CTA; capped, 124 and no
    # spills, 11 more instructions per iteration; the model's latency reading 66 -> 46 us).
    hopper_16 = hopper and sixteen_bit
    capped = hopper_16 and block_n == 128 and not tall
    wgrad_budget = HOPPER_WGRAD_SHARED_MEMORY_BUDGET if hopper_16 else WGRAD_SHARED_MEMORY_BUDGET
    return ConvConfig(
        block_m=256 if tall else 128,
        block_n=block_n,
        block_k=block_size(c_in, deep),
        # Beside 128-wide output tiles the code is encoded in the epilogue (code_in_main_loop), in
        # 32-channel chunks: a 64-channel chunk in the main loop there spilled 112 bytes on sm_80.
        # On sm_90 in 16-bit, 64-channel chunks beside 128-wide tiles (182 registers, no spills; at
        # 256-wide tiles they spilled): the apply pass re-reads x_s once per chunk, half as often.
        block_b=block_size(c_b, 64 if c_out <= 64 or (hopper_16 and not wide) else 32),
        # 4 warps spilled (255 registers) on the 128-pixel tiles in the sm_90 compile report; 8 do not.
        num_warps=8,
        num_stages=3,
        statistics_max_registers=128 if capped else None,
        # sm_90, 16-bit: 128 x 128 channel tiles in the weight gradient (64 FLOP per byte loaded
        # where 64 x 128 load 43; 128 registers on sm_90, no spills; on sm_80 they spilled).
        wgrad_image_tile=128 if hopper_16 else 64,
        # sm_90, 16-bit: 256-wide gradient tiles where their grid is wide enough (85 FLOP per byte
        # loaded where 128 x 128 load 64), and the pipeline sized to an H100's 227 KB per block
        # rather than an A100's 163 (128-pixel steps beside 128 x 128 tiles: half the iterations).
        wgrad_gradient_tile=256 if hopper_16 else None,
        wgrad_shared_budget=wgrad_budget,
        # sm_90, 16-bit: a weight-gradient program per kernel row where the rows allow (a gradient
        # tile loaded once for three taps; modelled at 64 channels 111.6 / 77.7 -> 76.5 / 51.7 us).
        wgrad_row_taps=hopper_16,
    )


@dataclass(frozen=True)
class WgradTiles:
    block_x: int  # image channels per program
    block_g: int  # gradient channels per program
    block_m: int  # pixels per step of the reduction
    stages: int  # of the software pipeline
    # a program reduces a kernel row's three taps (the kernel's ROW_TAPS): three image tiles a step
    row_taps: bool = False


def wgrad_shared_bytes(tiles: WgradTiles, dtype: torch.dtype, relu: bool) -> int:
    """Shared memory of the weight-gradient kernel as Triton's software pipeline lays it out: every
    stage holds the image and gradient tiles, every stage but one also each extra tile read beside
    the gradient (the output for the ReLU mask). It matched triton
    3.9's sm_90 compiles in sixteen cases (bf16/fp32, ReLU on/off, 64/128 channels, 2-3 stages) and
    the 256 KiB launch failure of triton 3.6 on an H200; the ahead-of-time report stays the judge."""
    element = torch.finfo(dtype).bits // 8
    image_tiles = 3 if tiles.row_taps else 1
    stages = tiles.stages
    operands = stages * (image_tiles * tiles.block_x + tiles.block_g) * tiles.block_m
    extra = (stages - 1) * tiles.block_g * tiles.block_m * int(relu)
    return (operands + extra) * element


# 256-wide gradient tiles only where their grid (channel tiles x taps, before any split) gives at
# least this fraction of the multiprocessors a program: at 512x512x4x4 72 programs for 132 (the
# static model: 69 -> 59 us under its calibrated reading, 77 -> 69 under its latency reading), at
# 256x256x8x8 18, which only the splits' float32 partials could fill (the model put 7 splits of
# them at 48 / 43 us against 65 / 52 for 128 x 128 tiles in 3, but their traffic takes the step
# past the ledger's 0.8x byte budget).
WIDE_GRADIENT_TILE_FILL = 0.5


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments, asked on every launch
def wgrad_tiles(
    config: ConvConfig,
    c_x: int,
    c_g: int,
    dtype: torch.dtype,
    relu: bool,
    taps: int,
    multiprocessors: int,
    *,
    row_taps: bool,
    pixels: int,
) -> WgradTiles:
    """Tiles of one weight-gradient launch of ``taps`` kernel taps on a card of ``multiprocessors``
    (0: no card; no wide gradient tiles): channel tiles as wide as the configuration's output tile
    (the gradient's up to ``config.wgrad_gradient_tile`` where WIDE_GRADIENT_TILE_FILL holds), and a
    reduction step two K-chunks deep, halved until the pipeline's shared memory fits
    ``config.wgrad_shared_budget`` (at 128 x 128 channel tiles a 128-pixel step needed 256 KiB with
    the ReLU mask: more than any card has).

    ``row_taps``: the launch's rows allow a program per kernel row (wgrad_rows' SAME_ROWS, three
    taps a row); with ``config.wgrad_row_taps`` it takes them (row_tap_tiles) where their split
    partials' traffic allows (row_tap_partials_fit; ``pixels``: the output pixels reduced)."""
    if row_taps and config.wgrad_row_taps:
        tiles = row_tap_tiles(config, c_x, c_g, dtype, relu)
        if row_tap_partials_fit(tiles, config, c_x, c_g, dtype, relu, taps, pixels, multiprocessors):
            return tiles
    # 128 x 128 channel tiles spilled on sm_80 (bf16: 16 bytes at 128 registers), and fp32 spilled
    # at 64 x 128: the image tile stays at 64 channels (128 on sm_90 in 16-bit:
    # config.wgrad_image_tile), the gradient tile at 128 (bf16/fp16) or 64.
    gradient_cap = 128 if torch.finfo(dtype).bits <= 16 else 64
    block_x = block_size(c_x, min(config.block_n, config.wgrad_image_tile))
    block_g = block_size(c_g, min(config.block_n, gradient_cap))
    wide = config.wgrad_gradient_tile
    if wide is not None and c_g >= wide and multiprocessors > 0:
        programs = cdiv(c_x, block_x) * cdiv(c_g, wide) * taps
        if programs >= WIDE_GRADIENT_TILE_FILL * multiprocessors:
            block_g = wide
    tiles = WgradTiles(block_x, block_g, 2 * config.block_k, config.num_stages)
    # Image tiles under 64 channels compile to mma.sync, not wgmma, and keep the A100's budget: at
    # 32 x 128 channels, 128-pixel steps and the ReLU mask they spilled 32 bytes on sm_90.
    budget = config.wgrad_shared_budget
    if block_x < 64:
        budget = min(budget, WGRAD_SHARED_MEMORY_BUDGET)
    while tiles.block_m > 16 and wgrad_shared_bytes(tiles, dtype, relu) > budget:
        tiles = replace(tiles, block_m=tiles.block_m // 2)
    return tiles


def row_tap_tiles(config: ConvConfig, c_x: int, c_g: int, dtype: torch.dtype, relu: bool) -> WgradTiles:
    """Tiles of a weight gradient whose programs each reduce a kernel row's three taps (ROW_TAPS):
    three float32 accumulators, so the image tile stays at 64 channels beside a gradient tile of up
    to 128 (at 64 x 128, 8 warps: 200 registers on sm_90, no spills); 128-pixel steps in as many
    stages as ``config.wgrad_shared_budget`` takes, at least two (at 64 x 128 two: 160 KiB), the
    step halved only where two stages do not fit."""
    gradient_cap = 128 if torch.finfo(dtype).bits <= 16 else 64
    block_x = block_size(c_x, min(config.block_n, 64))
    block_g = block_size(c_g, min(config.block_n, gradient_cap))
    tiles = WgradTiles(block_x, block_g, 2 * config.block_k, config.num_stages, row_taps=True)
    budget = config.wgrad_shared_budget
    while tiles.stages > 2 and wgrad_shared_bytes(tiles, dtype, relu) > budget:
        tiles = replace(tiles, stages=tiles.stages - 1)
    while tiles.block_m > 16 and wgrad_shared_bytes(tiles, dtype, relu) > budget:
        tiles = replace(tiles, block_m=tiles.block_m // 2)
    return tiles


# Row taps give a channel tile a third as many programs, so filling the GPU takes up to three times
# the splits, and each split's float32 partials are the whole weight gradient. They are taken only
# where those partials (written and read back) move at most this fraction of the bytes the kernel
# reads anyway (the image and the gradient rows): at 64x64x32x32 44 splits move 13 MB against 67, at
# 128x128x16x16 22 move 26 MB against 34; at 256x256x8x8 5 would move 24 MB against 17 (and take
# the step to 0.84x the ResNet layer's bytes, past the ledger's 0.8x budget), where a program per
# tap needs 3 splits. The static model at 256x8x8: row taps in 3 splits (72 programs) 57.8 / 56.1
# us against 60.8 / 48.6 for a program per tap: no gain under both readings.
ROW_TAP_PARTIAL_TRAFFIC = 1.0


def row_tap_partials_fit(
    tiles: WgradTiles,
    config: ConvConfig,
    c_x: int,
    c_g: int,
    dtype: torch.dtype,
    relu: bool,
    taps: int,
    pixels: int,
    multiprocessors: int,
) -> bool:
    """Whether a row-tap launch's split partials stay within ROW_TAP_PARTIAL_TRAFFIC on a card of
    ``multiprocessors`` (sm_90's: row taps are its configuration's alone). Without a card, or
    with the configuration's own split count (tests), nothing is filled and they are taken."""
    if multiprocessors == 0 or config.wgrad_splits is not None:
        return True
    kernel = (taps // 3, 3)  # row taps: three taps a row
    card = ((9, 0), multiprocessors)
    splits = wgrad_card_splits(tiles, c_x, c_g, kernel, pixels, dtype, relu, card)
    splits, _ = wgrad_split_rows(pixels, tiles.block_m, splits)
    partials = 0 if splits == 1 else 2 * splits * taps * c_x * c_g * 4
    image_bytes = pixels * c_x * (torch.finfo(dtype).bits // 8)
    gradient_bytes = wgrad_gradient_bytes(pixels, c_g, dtype, relu)
    return partials <= ROW_TAP_PARTIAL_TRAFFIC * (image_bytes + gradient_bytes)


# Set by pnnh_kernels.benchmarking.host_cost's stub launch path, whose CPU tensors stand for a
# GPU's: the multiprocessors of the card it stands for (None: CPU tensors are not split).
STUB_MULTIPROCESSORS: Optional[int] = None
STUB_CAPABILITY = (9, 0)  # the stub's target: sm_90


@functools.lru_cache(maxsize=16)
def _multiprocessors(index: Optional[int]) -> int:
    # torch.cuda.get_device_properties costs microseconds a call; a device's count never changes.
    device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return torch.cuda.get_device_properties(device).multi_processor_count


def wgrad_rows(
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    image_hw: tuple[int, int],
    out_hw: tuple[int, int],
) -> dict[str, bool]:
    """How a weight gradient's image rows follow its output pixels, as the kernel's constexprs:
    ``DIRECT_ROWS``, output pixel m reads image pixel m (a 1x1 tap, stride 1, no padding before the
    image, and the image as large as the output, which rules out padding after it); else
    ``SAME_ROWS``, tap (kh, kw) of pixel m reads image pixel m plus a constant (stride 1 and the
    image as large as the output: "same" padding); else neither (coordinates per row)."""
    same = stride == (1, 1) and image_hw == out_hw
    direct = same and kernel == (1, 1) and padding == (0, 0)
    return {"DIRECT_ROWS": direct, "SAME_ROWS": same and not direct}


def row_taps_allowed(rows: dict[str, bool], kernel: tuple[int, int]) -> bool:
    """Whether a weight gradient whose rows are ``rows`` (:func:`wgrad_rows`) may take a program per
    kernel row (the kernel's ROW_TAPS: SAME_ROWS and three taps a row)."""
    return rows["SAME_ROWS"] and kernel[1] == 3


def wgrad_programs_per_tile(tiles: WgradTiles, kernel: tuple[int, int]) -> int:
    """Programs of one channel tile (before any split): one per tap, or per kernel row."""
    return kernel[0] if tiles.row_taps else kernel[0] * kernel[1]


def wgrad_programs(tiles: WgradTiles, c_x: int, c_g: int, kernel: tuple[int, int]) -> int:
    """Programs of a weight-gradient launch before any split: channel tiles x programs a tile."""
    return cdiv(c_x, tiles.block_x) * cdiv(c_g, tiles.block_g) * wgrad_programs_per_tile(tiles, kernel)


def wgrad_gradient_bytes(pixels: int, c_g: int, dtype: torch.dtype, relu: bool) -> int:
    """Bytes of the gradient rows a weight gradient reads: dy (or dz), and y where its ReLU mask
    is formed (dense images of ``pixels`` x ``c_g`` elements)."""
    return pixels * c_g * (torch.finfo(dtype).bits // 8) * (1 + relu)


def wgrad_card_splits(
    tiles: WgradTiles,
    c_x: int,
    c_g: int,
    kernel: tuple[int, int],
    pixels: int,
    dtype: torch.dtype,
    relu: bool,
    card: tuple[tuple[int, int], int],
) -> int:
    """The split count of a weight-gradient launch of ``tiles`` on ``card`` (compute capability,
    multiprocessors), before :func:`wgrad_split_rows`: :func:`wgrad_split_count` with the launch's
    programs, gradient bytes, whether two of its programs share a multiprocessor, and row taps'
    trimming past the fill. The launcher, the static model's report and the row-tap traffic rule
    all size the launch here."""
    pair = side_by_side(wgrad_shared_bytes(tiles, dtype, relu), card[0])
    return wgrad_split_count(
        pixels, tiles.block_m, wgrad_programs(tiles, c_x, c_g, kernel), card[1],
        wgrad_gradient_bytes(pixels, c_g, dtype, relu), kernel[0] * kernel[1], c_x, c_g, pair,
        trim_past_fill=tiles.row_taps,
    )  # fmt: skip


def wgrad_splits(
    config: ConvConfig,
    tiles: WgradTiles,
    c_x: int,
    c_g: int,
    kernel: tuple[int, int],
    pixels: int,
    dtype: torch.dtype,
    relu: bool,
    device: torch.device,
) -> int:
    """How many pixel ranges the weight-gradient reduction is split into: the configuration's
    number if it sets one (tests), else on a GPU :func:`wgrad_card_splits` for its card, and 1
    elsewhere."""
    if config.wgrad_splits is not None:
        return config.wgrad_splits
    card = launch_card(device)
    if card is None:
        return 1
    return wgrad_card_splits(tiles, c_x, c_g, kernel, pixels, dtype, relu, card)


def wgrad_split_count(
    m: int,
    block_m: int,
    tiles: int,
    multiprocessors: int,
    gradient_bytes: int,
    taps: int,
    c_x: int,
    c_g: int,
    two_per_multiprocessor: bool = True,
    trim_past_fill: bool = False,
) -> int:
    """The weight gradient's split count on a card of ``multiprocessors`` (before
    :func:`wgrad_split_rows`): the target of :func:`wgrad_split_target`, capped by the float32
    partials' traffic (fused_common.capped_wgrad_splits, the rule both fused backends share,
    ``gradient_bytes``: the gradient rows the kernel reads), then raised by :func:`wgrad_fill_target`
    (``two_per_multiprocessor``: :func:`side_by_side` of its programs). The launchers and the
    static model's report (pnnh_kernels.triton.report) both size the launch with it."""
    splits = wgrad_split_target(m, block_m, tiles, multiprocessors)
    splits = capped_wgrad_splits(splits, gradient_bytes, taps, c_x, c_g)
    return wgrad_fill_target(
        splits, m, block_m, tiles, multiprocessors, two_per_multiprocessor, trim_past_fill
    )


# Shared memory of one multiprocessor, by compute capability major: sm_80 (A100) 164 KiB, sm_90
# (H100/H200) 228 KiB; others (sm_86/89: 100 KiB) taken as the smallest.
MULTIPROCESSOR_SHARED_BYTES = {8: 167_936, 9: 233_472}


def side_by_side(shared_bytes: int, capability: tuple[int, int]) -> bool:
    """Whether two weight-gradient programs whose pipelines take ``shared_bytes`` each fit one
    multiprocessor's shared memory (1 KiB reserved per block)."""
    capacity = MULTIPROCESSOR_SHARED_BYTES.get(capability[0], 102_400)
    return 2 * (shared_bytes + 1024) <= capacity


def wgrad_fill_target(
    splits: int,
    m: int,
    block_m: int,
    tiles: int,
    multiprocessors: int,
    two_per_multiprocessor: bool = True,
    trim_past_fill: bool = False,
) -> int:
    """``splits`` (already capped by the partials' traffic), raised toward the fewest splits that
    give every multiprocessor one of the programs, to the count that leaves the busiest
    multiprocessor the fewest steps: a grid smaller than the GPU leaves part of it idle for the
    whole reduction (256 x 256 channels at 8 x 8 in 128 x 128 tiles of 128-pixel steps: 36
    programs of 128 steps on 132 multiprocessors; three splits give 108 programs of 43 steps, where
    four would put two programs of 32 on some multiprocessors)."""
    fill = min(wgrad_split_target(m, block_m, tiles, multiprocessors), cdiv(multiprocessors, tiles))

    def busiest(count: int) -> int:  # programs on the busiest multiprocessor x steps of each
        return cdiv(tiles * count, multiprocessors) * cdiv(cdiv(m, count), block_m)

    if fill <= splits:
        if two_per_multiprocessor or not trim_past_fill:
            return splits
        # One program per multiprocessor (``trim_past_fill``: row-tap launches, whose grids are a
        # third as wide): splits past the fill only queue second programs behind the first (at
        # 64 x 64 channels, 3 tiles: 56 splits put two programs of 37 steps on 36 multiprocessors
        # where 44 give every one a program of 47). Not applied to a program per tap, where it
        # would change A100 launches that no model here reads (256x64x32x32: 48 -> 12 splits).
        return min(range(fill, splits + 1), key=lambda count: (busiest(count), count))

    # The count up to the fill with the fewest steps on the busiest multiprocessor; on a tie the
    # larger where two programs fit one multiprocessor (``two_per_multiprocessor``, side_by_side:
    # they run side by side and fewer multiprocessors idle), else the smaller: then their float32
    # partials' traffic buys nothing (at 512x512x4x4 the 72 programs of 256-wide gradient tiles,
    # 147 KB of shared memory each, would take two splits and 38 MB of partials for the same
    # busiest multiprocessor).
    order = -1 if two_per_multiprocessor else 1
    return min(range(splits, fill + 1), key=lambda count: (busiest(count), order * count))


@functools.lru_cache(maxsize=16)
def _capability(index: Optional[int]) -> tuple[int, int]:
    device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return torch.cuda.get_device_capability(device)


def launch_card(device: torch.device) -> Optional[tuple[tuple[int, int], int]]:
    """(compute capability, multiprocessors) of the card a launch on ``device`` runs on: a CUDA
    device's own, the card a ledger on meta tensors models, the host-cost stub's stand-in for CPU
    tensors; None for plain CPU tensors (nothing to fill, no card's tiles)."""
    if device.type == "meta":
        return modelled_capability(), modelled_multiprocessors()
    if device.type == "cuda":
        return _capability(device.index), _multiprocessors(device.index)
    if STUB_MULTIPROCESSORS is not None:
        return STUB_CAPABILITY, STUB_MULTIPROCESSORS
    return None


def wgrad_split_target(m: int, block_m: int, tiles: int, multiprocessors: int) -> int:
    """Splits enough for ``tiles`` programs each to fill ``multiprocessors`` about four times over,
    each still reducing at least 8 blocks of ``block_m`` pixels (the start of
    :func:`wgrad_split_count`)."""
    return max(1, min(cdiv(m, 8 * block_m), cdiv(4 * multiprocessors, tiles)))


def wgrad_split_rows(m: int, block_m: int, splits: int) -> tuple[int, int]:
    """(splits, pixels per split) of a weight gradient reducing ``m`` pixels in about ``splits``
    ranges of whole ``block_m`` blocks (the last may be shorter). The launchers and the static
    model's report (pnnh_kernels.triton.report) both size the launch with it."""
    m_per_split = cdiv(cdiv(m, splits), block_m) * block_m
    return cdiv(m, m_per_split), m_per_split


def input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 dots use TF32 only where PyTorch's own convolutions would (cudnn.allow_tf32)."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def code_in_main_loop(config: ConvConfig, c_b: int, kh: int, kw: int) -> bool:
    """Whether the fused forward encodes the code in its main loop (from the centre tap, in one code
    chunk) rather than in the epilogue. Not beside 128-wide output tiles: there the second
    accumulator spilled on sm_80 (bf16, 32 bytes at 255 registers with a 32-channel code)."""
    centred = kh % 2 == 1 and kw % 2 == 1
    return 0 < c_b <= config.block_b and centred and config.block_n <= 64


def reduce_block_k(config: ConvConfig, has_coder: bool, batch_norm: bool) -> int:
    """Output channels per step of the backward's first pass. With both the coder and training
    BatchNorm's sums in one step, 32 (the z tile and the fp32 sums beside the decoder's MMA spilled
    104 bytes on sm_80 at 64 channels: a 256 -> 64 1x1 layer with a 128-channel code)."""
    if has_coder and batch_norm:
        return min(config.block_k, 32)
    return config.block_k


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels must compute their dots in fp32 (see kernels._mma)."""
    return interpreter_enabled() and dtype == torch.bfloat16


def launch_options(config: ConvConfig) -> dict[str, int]:
    if interpreter_enabled():
        return {}
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def statistics_launch_options(config: ConvConfig) -> dict[str, int]:
    """The forward statistics pass's launch options: the configuration's, and its register cap."""
    options = launch_options(config)
    if options and config.statistics_max_registers is not None:
        options["maxnreg"] = config.statistics_max_registers
    return options


# Autotuning (GPU only). The first configuration is the shape's heuristic default (choose_config),
# the one the compile report checks; the others trade tile shape against occupancy, and only those
# the shape can use are tried: none with a wider channel tile or a deeper K chunk than the default
# (which already stops at the channel counts), so no trial is spent on padding. Keys: every argument
# that changes the best tiles (the GEMM sizes M/NHW, C_in, C_out, C_B; the image size; stride,
# dilation and kernel size, which change the tap loop and the masked fraction; whether there is a
# coder and where it is encoded). Outputs are only written, never accumulated, so no reset between
# trials.
TUNING_KEYS = {
    "_pnnh_conv_fwd_kernel": [
        "M", "H", "W", "C_in", "C_out", "C_B", "stride_h", "stride_w", "dil_h", "dil_w",
        "KH", "KW", "HAS_CODER", "CODE_IN_MAIN_LOOP", "Z_INPUT",
    ],
    "_pnnh_conv_dgrad_kernel": [
        "NHW", "H", "W", "C_in", "C_out", "C_B", "stride_h", "stride_w", "dil_h", "dil_w",
        "KH", "KW", "HAS_CODER",
    ],
}  # fmt: skip
tuned_kernels: dict[tuple, object] = {}
# Alternatives to the default for bf16/fp16, as (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); BLOCK_N and
# BLOCK_K are capped at the default's. The ahead-of-time report over the ResNet grid
# (docs/perf/triton_resources.md) removed three kinds: 256-pixel tiles spilled on sm_80 and sm_90
# (up to 208 bytes at 255 registers); 128 x 64 x 64 tiles as an alternative spilled 8 bytes in the
# strided layers' input gradient on sm_80 (it stays the default of 64-channel layers, where it fits);
# and in fp32 every alternative spilled somewhere on sm_80, so fp32 (not the fast path: bf16 is)
# runs its default alone.
_ALTERNATIVE_TILES = (
    (128, 128, 32, 8, 3),
    (64, 64, 64, 4, 4),
)


def tuning_configs(config: ConvConfig, dtype: torch.dtype) -> list[triton.Config]:
    """The autotuner's candidates for a shape in ``dtype`` whose default configuration is ``config``."""
    candidates = [(config.block_m, config.block_n, config.block_k, config.num_warps, config.num_stages)]
    alternatives = _ALTERNATIVE_TILES if dtype != torch.float32 else ()
    for block_m, block_n, block_k, warps, stages in alternatives:
        tiles = (block_m, min(block_n, config.block_n), min(block_k, config.block_k), warps, stages)
        # An alternative clamped to the default's tile with only a shallower K chunk adds nothing
        # but risk: at 64 output channels (128 x 64 x 32) it spilled 8-24 bytes on sm_80 in the
        # input gradient of ResNet-50's 1x1 layers (the full-grid report of 2026-11-28).
        shallower_only = tiles[:2] == candidates[0][:2] and tiles[2] < candidates[0][2]
        if tiles not in candidates and not shallower_only:
            candidates.append(tiles)
    if config.block_n > 128 or config.block_m > 128:  # sm_90's wide or tall default: the autotuner
        # may still find the 128-pixel tiles faster
        candidates.insert(1, (128, min(config.block_n, 128), config.block_k, 8, 3))
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in candidates
    ]


def tuned_or_fixed(kernel, config: ConvConfig, dtype: torch.dtype):
    """(kernel to launch, tile keyword arguments): on a GPU the kernel autotuned over the shape's
    candidates, else the plain kernel with the configuration's tiles."""
    if interpreter_enabled() or _forced_config is not None:
        tiles = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k}
        return kernel, {**tiles, **launch_options(config)}
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    key = (name, config, dtype)
    if key not in tuned_kernels:
        configs = tuning_configs(config, dtype)
        tuned_kernels[key] = triton.autotune(configs=configs, key=TUNING_KEYS[name])(kernel)
    return tuned_kernels[key], {}


def grid_of(rows: int, columns: int, config: ConvConfig):
    if interpreter_enabled() or _forced_config is not None:
        return (cdiv(rows, config.block_m), cdiv(columns, config.block_n))
    return lambda meta: (cdiv(rows, meta["BLOCK_M"]), cdiv(columns, meta["BLOCK_N"]))
