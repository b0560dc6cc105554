"""The traffic ledger (pnnh_kernels.ledger) against what really runs.

The drift test runs one training step twice at small, odd shapes: on meta tensors (the ledger: each
launch declared, nothing run) and for real on the CPU (Triton's interpreter, the CUDA emulation)
with every launch instrumented. Below the launchers, a hook sees what each kernel really receives:
the Triton interpreter's launch (its tensor arguments) and the CUDA module's entry points (its raw
pointers). The verdicts come from those hooks and from the tensors' contents before and after each
launch (outputs NaN-poisoned), never from the declarations themselves.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from pnnh_kernels import FusedPNNHConv
from pnnh_kernels.backends.fused_common import poisoned_outputs
from pnnh_kernels.coder import PNNHCoder
from pnnh_kernels.ledger import CARDS, step_ledger
from pnnh_kernels.ledger.record import Recorder, note_handed, tensor_bytes
from pnnh_kernels.ledger.steps import count_step, record_step

SHAPE = (2, 24, 7, 7)


def default_layer(backend: str) -> nn.Module:
    return FusedPNNHConv(24, 24, bias=False, norm="batch", backend=backend)


def trainable_coder_layer(backend: str) -> nn.Module:
    """Every optional input: learner bias, trainable untied coder with an encoder bias."""
    coder = PNNHCoder(24, 12, init="he", tied=False, bias=True, out_channels=24, trainable=True)
    return FusedPNNHConv(24, 24, bias=True, norm="batch", coder=coder, backend=backend)


def two_layers(backend: str) -> nn.Module:
    coder = PNNHCoder(24, 12)
    return nn.Sequential(
        FusedPNNHConv(24, 24, bias=False, norm="batch", coder=coder, backend=backend),
        FusedPNNHConv(24, 24, bias=False, norm="batch", coder=coder, backend=backend),
    )


LAYERS = {"default": default_layer, "trainable-coder": trainable_coder_layer, "block": two_layers}


@pytest.fixture
def triton_launches(monkeypatch):
    """The names of the Triton kernels the interpreter really runs, their arguments noted."""
    import triton.runtime.interpreter as interpreter

    ran: list[str] = []
    run = interpreter.InterpretedFunction.run

    def hooked(self, *args, **kwargs):
        ran.append(self.fn.__name__)
        note_handed([*args, *kwargs.values()])
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", hooked)
    return ran


CUDA_ENTRY_POINTS = {
    "forward": "pnnh_conv_forward_kernel",
    "coder_backward": "pnnh_coder_backward_kernel",
    "dgrad": "pnnh_conv_dgrad_kernel",
    "wgrad": "pnnh_conv_wgrad_kernel",
}


@pytest.fixture
def cuda_launches(emulated_cuda_backend, cuda_emulator, monkeypatch):
    """The CUDA kernels the emulation really runs (by entry point), their pointers noted."""
    from pnnh_kernels.cuda import launch

    ran: list[str] = []

    class Hooked:
        def __getattr__(self, name):
            target = getattr(cuda_emulator, name)
            if name not in CUDA_ENTRY_POINTS:
                return target

            def call(*args):
                ran.append(CUDA_ENTRY_POINTS[name])
                note_handed(args)
                return target(*args)

            return call

    monkeypatch.setattr(launch, "_emulator", Hooked())
    return ran


def kernel_name(declared: str) -> str:
    return declared.split(" ")[0]


def check_against_what_ran(meta: tuple, real: Recorder, ran: list[str], kind: str) -> None:
    # 1. The ledger at the same shape lists exactly the launches of the real step, with the same
    #    bytes and FLOPs (PyTorch ops and declared kernels alike).
    assert [launch.name for launch in meta] == [launch.name for launch in real.launches]
    assert list(meta) == real.launches
    # 2. The kernels that really ran (seen below the launchers) are exactly the declared ones.
    declared = [kernel_name(launch.name) for launch in real.launches if launch.kind == kind]
    assert ran == declared, "a kernel ran without being declared, or a declared one did not run"
    assert len(real.instrumented) == len(declared)
    for record in real.instrumented:
        name = record.launch.name
        declared_tensors = [*record.declared_reads, *record.declared_writes]
        # 3. What the kernel received is what was declared: the same tensors, the same sizes.
        if kind == "triton":
            handed = {(t.data_ptr(), tensor_bytes(t)) for t in record.handed}
            assert handed == {(t.data_ptr(), tensor_bytes(t)) for t in declared_tensors}, name
        else:
            pointers = {p for p in record.handed_pointers if p}
            assert pointers == {t.data_ptr() for t in declared_tensors}, name
        # 4. What it wrote is what was declared written, every element of it (outputs start as NaN).
        changed = {id(t) for t in record.changed}
        assert changed == {id(t) for t in record.declared_writes}, name
        for tensor in record.declared_writes:
            assert not tensor.isnan().any(), f"{name}: part of a declared output was not written"
        assert record.launch.read == sum(tensor_bytes(t) for t in record.declared_reads)
        assert record.launch.written == sum(tensor_bytes(t) for t in record.declared_writes)


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("training", [True, False], ids=["train-BN", "eval-BN"])
def test_triton_ledger_matches_what_runs(layer, training, triton_launches):
    torch.manual_seed(0)
    meta = count_step(LAYERS[layer]("triton").train(training), SHAPE, torch.float32, "meta")
    with poisoned_outputs():
        real = record_step(
            LAYERS[layer]("triton").train(training), SHAPE, torch.float32, "cpu", instrument=True
        )
    check_against_what_ran(meta, real, triton_launches, "triton")


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("training", [True, False], ids=["train-BN", "eval-BN"])
def test_cuda_ledger_matches_what_runs(layer, training, cuda_launches):
    torch.manual_seed(0)
    meta = count_step(LAYERS[layer]("cuda").train(training), SHAPE, torch.float32, "meta")
    with poisoned_outputs():
        real = record_step(
            LAYERS[layer]("cuda").train(training), SHAPE, torch.float32, "cpu", instrument=True
        )
    check_against_what_ran(meta, real, cuda_launches, "cuda")


def test_resnet_layer_ledger_matches_what_runs():
    """The ResNet layer's PyTorch ops: the same list and bytes on meta and on real tensors."""
    from pnnh_kernels.benchmarking.baselines import ResNetLayer

    meta = count_step(ResNetLayer(24), SHAPE, torch.float32, "meta")
    real = record_step(ResNetLayer(24), SHAPE, torch.float32, "cpu")
    assert list(meta) == real.launches
    names = [launch.name for launch in meta]
    assert names.count("aten::convolution") == 1
    assert "aten::convolution_backward (input)" in names
    assert "aten::convolution_backward (weight)" in names


def test_ledger_counts_the_convolution_as_its_operands():
    """One launch's bytes from first principles: the ResNet layer's convolution reads x and W once
    and writes its output once; its FLOPs are 2 * N * H * W * C_out * C_in * 9."""
    n, c, s = 256, 128, 16
    ledger = step_ledger("resnet-layer", n, c, s)
    conv = next(launch for launch in ledger.launches if launch.name == "aten::convolution")
    activation = n * c * s * s * 2
    assert conv.read == activation + c * c * 9 * 2
    assert conv.written == activation
    assert conv.flops == 2 * n * s * s * c * c * 9


def test_roofline_time_is_the_larger_of_memory_and_arithmetic():
    card = CARDS["H100"]
    assert card.seconds(card.bytes_per_second, 0) == pytest.approx(1.0)
    assert card.seconds(0, card.flops_16bit) == pytest.approx(1.0)
    assert card.seconds(card.bytes_per_second, card.flops_16bit / 2) == pytest.approx(1.0)


def test_pnnh_ledger_command_prints_both_tables_in_under_a_minute(capsys, cuda_emulator):
    from pnnh_kernels.commands import main
    from pnnh_kernels.cuda import launch

    start = time.perf_counter()
    with launch.emulated(cuda_emulator):  # the CUDA tile sizes, where no extension is built
        main(["ledger", "--shape", "256x128x16x16"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert elapsed < 60
    for title in ("resnet-layer 256x128x16x16", "pnnh-layer [triton]", "pnnh-layer [cuda]"):
        assert f"### {title}" in out
    assert "H100 SXM (us)" in out
    assert "A100 SXM 80GB (us)" in out
    assert out.count("**total:") == 3
