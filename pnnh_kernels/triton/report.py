"""Ahead-of-time compile report of the PNNH Triton kernels, no GPU needed.

``python -m pnnh_kernels.triton.report`` compiles every kernel with ``triton.compile`` for sm_80 and
sm_90 at the default (GPU) configuration of a ResNet stage shape, and prints per kernel, target and
dtype: registers, shared memory, stack and local memory (spills), and the instructions that matter
(tensor-core MMAs, async copies). The resource numbers come from the cubin, read with the
``cuobjdump`` that ships inside the triton wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pnnh_kernels.triton import kernels
from pnnh_kernels.triton.pnnh_conv import ConvConfig, choose_config, wgrad_reduction_block

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
# Most dynamic shared memory one block may use (A100: 163 KiB, H100: 227 KiB).
SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Pointers that are float32 whatever the data dtype (folded BatchNorm vectors, weight gradients).
FLOAT32_POINTERS = {"scale_ptr", "shift_ptr", "out_ptr"}
INSTRUCTIONS = {
    "mma.sync": r"\bmma\.sync\b",
    "wgmma": r"\bwgmma\.mma_async\b",
    "cp.async": r"\bcp\.async\.(?:ca|cg)\b",
    "cp.async.bulk(TMA)": r"\bcp\.async\.bulk\b",
    "ldmatrix": r"\bldmatrix\b",
}


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Any
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    ints: Optional[dict[str, int]] = None  # runtime ints of the launch; default STAGE_INTS


# The runtime integers of a ResNet-18 CIFAR first-stage layer (batch 256, 64 x 32 x 32, 3x3, C_B 32)
# as the launchers pass them. The report specialises them the way Triton's JIT does at a launch:
# an int equal to 1 becomes a constant, a multiple of 16 is marked divisible by 16 (as are the
# pointers), which is what lets the compiler vectorise loads. Without these hints the compiled code
# differs from what a GPU launch compiles (per-element pointers, and spills that never happen).
STAGE_INTS = {
    "M": 256 * 32 * 32,
    "m_per_split": 4480,  # the wgrad split an H100 (132 SMs) gets for this shape
    "NHW": 256 * 32 * 32,
    "H": 32,
    "W": 32,
    "OH": 32,
    "OW": 32,
    "C_in": 64,
    "C_out": 64,
    "C_B": 32,
    "C_x": 64,
    "C_g": 64,
    "stride_h": 1,
    "stride_w": 1,
    "pad_h": 1,
    "pad_w": 1,
    "dil_h": 1,
    "dil_w": 1,
}


def kernel_specs(dtype: torch.dtype, channels: int = 64) -> list[KernelSpec]:
    """The four kernels at the launchers' GPU configuration for a ``channels -> channels`` 3x3 layer
    with a half-width coder (ResNet-18's first stage)."""
    previous = os.environ.pop("TRITON_INTERPRET", None)  # the GPU configuration, not the interpreter's
    try:
        config: ConvConfig = choose_config(channels, channels, channels // 2, dtype)
    finally:
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous
    precision = "tf32" if dtype == torch.float32 else "ieee"
    common = {"INPUT_PRECISION": precision, "UPCAST_DOT": False}
    code_block = max(16, min(config.block_b, triton.next_power_of_2(channels // 2)))
    forward = {
        **common,
        "KH": 3,
        "KW": 3,
        "HAS_SCALE": True,
        "HAS_SHIFT": True,
        "HAS_CODER": True,
        "HAS_ENCODER_BIAS": True,
        "CODE_IN_MAIN_LOOP": channels // 2 <= config.block_b,
        "WRITE_STATS": False,
        "Z_INPUT": False,
        "RELU": True,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
        "BLOCK_B": config.block_b,
    }
    # Training-mode BatchNorm: the convolution with tile statistics, then the apply pass from z.
    statistics = {**forward, "HAS_SCALE": False, "HAS_CODER": False, "HAS_ENCODER_BIAS": False}
    statistics.update({"CODE_IN_MAIN_LOOP": False, "WRITE_STATS": True, "RELU": False})
    apply = {**forward, "CODE_IN_MAIN_LOOP": False, "Z_INPUT": True}
    # FusedPNNHLinear: the same kernel on a 1x1 image per row (tokens x channels).
    linear = {**forward, "KH": 1, "KW": 1, "HAS_SCALE": False}
    linear_ints = {**STAGE_INTS, "H": 1, "W": 1, "OH": 1, "OW": 1, "pad_h": 0, "pad_w": 0}
    return [
        *(
            KernelSpec(
                name, kernels._pnnh_conv_fwd_kernel, constexprs, config.num_warps, config.num_stages
            )
            for name, constexprs in (
                ("_pnnh_conv_fwd_kernel", forward),
                ("_pnnh_conv_fwd_kernel[bn stats]", statistics),
                ("_pnnh_conv_fwd_kernel[bn apply]", apply),
            )
        ),
        KernelSpec(
            "_pnnh_conv_fwd_kernel[linear]",
            kernels._pnnh_conv_fwd_kernel,
            linear,
            config.num_warps,
            config.num_stages,
            linear_ints,
        ),
        KernelSpec(
            "_pnnh_coder_bwd_kernel",
            kernels._pnnh_coder_bwd_kernel,
            {
                **common,
                "HAS_ENCODER_BIAS": True,
                "RELU": True,
                "BLOCK_M": config.block_m,
                "BLOCK_B": code_block,
                "BLOCK_K": config.block_k,
            },
            config.num_warps,
            config.num_stages,
        ),
        KernelSpec(
            "_conv_wgrad_kernel",
            kernels._conv_wgrad_kernel,
            {
                **common,
                "KH": 3,
                "KW": 3,
                "RELU": True,
                "BLOCK_X": config.block_n,
                "BLOCK_G": config.block_n,
                "BLOCK_M": wgrad_reduction_block(config),
            },
            config.num_warps,
            config.num_stages,
        ),
        KernelSpec(
            "_pnnh_conv_dgrad_kernel",
            kernels._pnnh_conv_dgrad_kernel,
            {
                **common,
                "KH": 3,
                "KW": 3,
                "HAS_SCALE": True,
                "HAS_CODER": True,
                "RELU": True,
                "BLOCK_M": config.block_m,
                "BLOCK_N": config.block_n,
                "BLOCK_K": config.block_k,
            },
            config.num_warps,
            config.num_stages,
        ),
    ]


def specialise(spec: KernelSpec, dtype: torch.dtype) -> tuple[dict[str, str], dict[str, Any], dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, specialised like a JIT launch."""
    types: dict[str, str] = {}
    constexprs = dict(spec.constexprs)
    attrs: dict[tuple[int, ...], list] = {}
    divisible = [["tt.divisibility", 16]]
    ints = spec.ints or STAGE_INTS
    for index, name in enumerate(spec.fn.arg_names):
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


def compile_kernel(spec: KernelSpec, dtype: torch.dtype, target: GPUTarget) -> Any:
    types, constexprs, attrs = specialise(spec, dtype)
    source = ASTSource(spec.fn, types, constexprs, attrs)
    return triton.compile(
        source, target=target, options={"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    )


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", handle.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def report_rows(dtype_names: list[str], target_names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        for spec in kernel_specs(dtype):
            for target_name in target_names:
                compiled = compile_kernel(spec, dtype, TARGETS[target_name])
                ptx = compiled.asm["ptx"]
                usage = resource_usage(compiled.asm["cubin"])
                rows.append(
                    {
                        "kernel": spec.name,
                        "dtype": dtype_name,
                        "target": target_name,
                        "blocks": ",".join(
                            f"{k[6:]}={v}" for k, v in spec.constexprs.items() if k.startswith("BLOCK_")
                        ),
                        "warps": spec.num_warps,
                        "stages": spec.num_stages,
                        "registers": usage.get("REG", -1),
                        "shared_bytes": int(compiled.metadata.shared),
                        "stack": usage.get("STACK", -1),
                        "local": usage.get("LOCAL", -1),
                        "instructions": {
                            name: len(re.findall(pattern, ptx)) for name, pattern in INSTRUCTIONS.items()
                        },
                    }
                )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| kernel | dtype | target | tiles | warps/stages | regs | smem (B) "
        "| stack/local (spills) | instructions |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        used = ", ".join(f"{name} x{count}" for name, count in row["instructions"].items() if count)
        lines.append(
            f"| {row['kernel']} | {row['dtype']} | {row['target']} | {row['blocks']} | "
            f"{row['warps']}/{row['stages']} | {row['registers']} | {row['shared_bytes']} | "
            f"{row['stack']}/{row['local']} | {used or 'no tensor-core MMA'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), action="append")
    parser.add_argument("--target", choices=list(TARGETS), action="append")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    rows = report_rows(args.dtype or ["bf16", "fp32"], args.target or list(TARGETS))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"triton {triton.__version__}, ResNet stage 64 -> 64, 3x3, C_B = 32\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
