"""One ViT block's training step (forward + backward) per variant: residual, plain, PNNH.

Eager PyTorch only: no Triton or CUDA kernel of this library applies to a ViT block (FusedPNNHLinear
does not fit its sublayers, pnnh_kernels/models/vit.py), so a "triton" row would time the same
PyTorch ops. The ledger's launches and bytes of the same step (meta tensors) sit beside each time;
it counts attention as scaled_dot_product_attention's math decomposition (two batched matmuls and a
softmax), which is what runs on the CPU, while a GPU runs one fused attention kernel: on a GPU the
ledger's attention launches and bytes are an upper bound.
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import DEVICE, ON_GPU, rotating
from pnnh_kernels.ledger.steps import record_step
from pnnh_kernels.models.vit import vit

# ViT-Tiny's width on CIFAR-sized images (32x32, 4x4 patches: 64 tokens).
BATCH, TOKENS, DIM, HEADS = (256 if ON_GPU else 8), 64, 192, 3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32} if ON_GPU else {"fp32": torch.float32}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("variant", ["residual", "plain", "pnnh"])
def test_vit_block_training_step(run_benchmark, benchmark, variant, dtype_name):
    dtype = DTYPES[dtype_name]
    block = vit(variant, dim=DIM, heads=HEADS, depth=1).blocks[0].to(DEVICE, dtype).train()
    params = [p for p in block.parameters() if p.requires_grad]
    grad = torch.randn(BATCH, TOKENS, DIM, device=DEVICE, dtype=dtype)

    def make() -> torch.Tensor:
        return torch.randn(BATCH, TOKENS, DIM, device=DEVICE, dtype=dtype)

    def step(x: torch.Tensor) -> None:
        x = x.detach().requires_grad_(True)
        torch.autograd.grad(block(x), [x, *params], grad)

    benchmark.group = f"vit block {BATCH}x{TOKENS}x{DIM} {dtype_name} train step"
    seconds = run_benchmark(step, rotating(make))
    ledger = record_step(
        vit(variant, dim=DIM, heads=HEADS, depth=1).blocks[0], (BATCH, TOKENS, DIM), dtype, "meta"
    )
    benchmark.extra_info.update(
        {
            "kind": "vit-block",
            "variant": variant,
            "implementation": f"vit-{variant}-torch",
            "shape": f"{BATCH}x{TOKENS}x{DIM}",
            "dtype": dtype_name,
            "tokens_per_s": BATCH * TOKENS / seconds,
            "ledger_launches": len(ledger.launches),
            "ledger_bytes": sum(launch.read + launch.written for launch in ledger.launches),
        }
    )
