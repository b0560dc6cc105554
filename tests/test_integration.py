"""The layers inside torch.compile and torch.autocast."""

from __future__ import annotations

import pytest
import torch

from pnnh_kernels import FusedPNNHConv, FusedPNNHLinear
from pnnh_kernels.models import deep_cnn


@pytest.mark.parametrize(
    "compiler",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_compile_fullgraph_of_a_pnnh_model_in_train_mode(compiler):
    model = deep_cnn(3, 8, "pnnh", coder_init="he", coder_trainable=True).train()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(2, 1, 8, 8)
    out = compiled(x)
    out.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected = model(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_fullgraph_of_linear_stack():
    stack = torch.nn.Sequential(
        FusedPNNHLinear(6, 6, coder_init="he", coder_trainable=True),
        FusedPNNHLinear(6, 9, coder_init="he", coder_trainable=True),
    )
    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(compiled(x), stack(x))


def test_bf16_autocast_gives_bf16_output_close_to_fp32():
    layer = FusedPNNHConv(8, 8, coder_init="he", coder_trainable=True)
    x = torch.randn(2, 8, 7, 7).relu()
    expected = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    scale = float(expected.abs().max())
    assert float((out.detach().float() - expected).abs().max()) < 3e-2 * scale
