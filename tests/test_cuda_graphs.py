"""Whole training steps of a PNNH model as CUDA graphs: ``torch.cuda.graph`` capture of forward,
backward and the optimizer step, replayed bitwise equal to eager; ``torch.compile(mode=
"reduce-overhead")`` through the ops; ``pnnh train --cuda-graphs``.

The graph tests need a GPU and skip without one (bench/device_check.sh runs this file on a lent
GPU); what a step must not do for capture (synchronise with the host, allocate outside PyTorch's
allocator) is checked on the CPU by tests/test_host_cost.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pnnh_kernels import FusedPNNHConv
from pnnh_kernels.models import deep_cnn
from pnnh_kernels.training.trainer import TrainConfig

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")


def _model(backend: str) -> nn.Module:
    model = deep_cnn(6, width=32, variant="pnnh", in_channels=3)
    for module in model.modules():
        if isinstance(module, FusedPNNHConv):
            module.backend = backend
    return model.cuda().to(memory_format=torch.channels_last)


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [
        (
            torch.randn(16, 3, 16, 16, device="cuda", generator=generator).to(
                memory_format=torch.channels_last
            ),
            torch.randint(0, 10, (16,), device="cuda", generator=generator),
        )
        for _ in range(count)
    ]


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x, labels) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x).float(), labels)
    loss.backward()
    optimizer.step()
    return loss


@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_captured_training_step_replays_bitwise_equal_to_eager(backend):
    from pnnh_kernels.backends import BackendUnavailableError, resolve_backend

    try:
        resolve_backend(backend, torch.device("cuda"), torch.bfloat16, "conv2d")
    except BackendUnavailableError as error:
        pytest.skip(str(error))
    torch.manual_seed(0)
    eager = _model(backend)
    graphed = copy.deepcopy(eager)
    options = {"lr": 0.05, "momentum": 0.9}
    eager_optimizer = torch.optim.SGD(eager.parameters(), **options)
    graphed_optimizer = torch.optim.SGD(graphed.parameters(), **options, capturable=True)
    batches = _batches(6)
    eager_losses = []
    for x, labels in batches:
        eager_optimizer.zero_grad(set_to_none=True)
        eager_losses.append(_step(eager, eager_optimizer, x, labels).detach())

    # Warm-up (compiles, autotunes, fills the launch plans) on a side stream, as capture requires.
    static_x, static_labels = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graphed_losses = []
    with torch.cuda.stream(side):
        for x, labels in batches[:3]:
            graphed_optimizer.zero_grad(set_to_none=True)
            graphed_losses.append(_step(graphed, graphed_optimizer, x, labels).detach())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graphed_optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _step(graphed, graphed_optimizer, static_x, static_labels)
    for x, labels in batches[3:]:
        static_x.copy_(x)
        static_labels.copy_(labels)
        graph.replay()
        graphed_losses.append(static_loss.detach().clone())
    torch.cuda.synchronize()
    assert torch.equal(torch.stack(eager_losses), torch.stack(graphed_losses))
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after replay"


@needs_gpu
def test_compile_reduce_overhead_runs_the_ops():
    torch.manual_seed(0)
    layer = FusedPNNHConv(32, 32, norm="batch", backend="triton").cuda().to(torch.bfloat16)
    layer = layer.to(memory_format=torch.channels_last)
    reference = copy.deepcopy(layer)
    compiled = torch.compile(layer, mode="reduce-overhead")
    x = torch.randn(8, 32, 16, 16, device="cuda", dtype=torch.bfloat16)
    x = x.to(memory_format=torch.channels_last)
    for _ in range(3):
        out = compiled(x)
        expected = reference(x)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_cuda_graphs_option_refuses_the_cpu():
    config = TrainConfig(cuda_graphs=True, device="cpu", data="synthetic")
    with pytest.raises(ValueError, match="--cuda-graphs: CUDA graphs need a GPU"):
        config.validate()
