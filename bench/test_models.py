"""Model-level benchmarks: one training step of PNNH, plain and residual ResNets.

bf16 autocast, channels_last, SGD with momentum; eager and (on GPUs) compiled. extra_info carries
images/s, peak memory (GPUs; not measured on CPUs) and parameter counts, shared coders counted once.
torchvision's ResNet is an extra residual baseline where torchvision imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import DEVICE, ON_GPU, note_missing, rotating, synchronize
from pnnh_kernels.models import parameter_breakdown, resnet18, resnet34

if ON_GPU:
    SETTINGS = [("cifar", 256, 32, 10), ("imagenet", 64, 224, 1000)]  # stem, batch, size, classes
    MODELS = {"resnet18": resnet18, "resnet34": resnet34}
    MODES = ["eager", "compiled"]
else:
    SETTINGS = [("cifar", 8, 32, 10)]
    MODELS = {"resnet18": resnet18}
    MODES = ["eager", "compiled"]
VARIANTS = ["residual", "plain", "pnnh", "torchvision"]


def _model(name: str, variant: str, stem: str, classes: int) -> torch.nn.Module:
    if variant == "torchvision":
        try:
            import torchvision
        except ImportError as error:
            note_missing("torchvision", f"torchvision does not import: {error}")
        if stem != "imagenet":
            pytest.skip("torchvision's ResNet has the ImageNet stem only")
        return getattr(torchvision.models, name)(num_classes=classes)
    # The coder's init does not change the speed; "he" skips the rectified-normal pretraining.
    return MODELS[name](variant=variant, stem=stem, num_classes=classes)


def _training_step(
    forward: torch.nn.Module, optimizer: torch.optim.Optimizer, labels: torch.Tensor
) -> Callable[[torch.Tensor], None]:
    """One bf16-autocast training step of ``forward`` (a model in training mode, or its compiled
    form) on a batch of images."""

    def step(images: torch.Tensor) -> None:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("stem", "batch", "size", "classes"), SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(MODELS))
def test_training_step(run_benchmark, benchmark, name, stem, batch, size, classes, variant, mode):
    if mode == "compiled" and not ON_GPU:
        note_missing("compiled training step", "benchmarked on GPUs only (minutes to compile on a CPU)")
    model = _model(name, variant, stem, classes).to(DEVICE, memory_format=torch.channels_last).train()
    parts = parameter_breakdown(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if mode == "compiled" else model
    labels = torch.randint(0, classes, (batch,), device=DEVICE)

    def make() -> torch.Tensor:
        return torch.randn(batch, 3, size, size, device=DEVICE).to(memory_format=torch.channels_last)

    step = _training_step(forward, optimizer, labels)

    if ON_GPU:
        torch.cuda.reset_peak_memory_stats(DEVICE)
    benchmark.group = f"{name} {stem} batch {batch} train step {mode}"
    seconds = run_benchmark(step, rotating(make))
    benchmark.extra_info.update(
        {
            "kind": "model",
            "model": name,
            "variant": variant,
            "stem": stem,
            "batch": batch,
            "mode": mode,
            "images_per_s": batch / seconds,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(DEVICE) if ON_GPU else None,
            "parameters": parts["total"],
            "coder_parameters": parts["coder"],
            # what the optimizer trains: the default coders are fixed (stored, not trained)
            "trained_parameters": parts["trainable"],
        }
    )


# The claims report's throughput verdict (issue #25) comes from these: the three variants' eager
# training steps interleaved round by round, paired ratios with 95% intervals
# (pnnh_kernels.benchmarking.interleaved).
INTERLEAVED_ROUNDS = 15 if ON_GPU else 5
STEPS_PER_ROUND = 10 if ON_GPU else 2
INTERLEAVED_VARIANTS = ["residual", "plain", "pnnh"]


@pytest.mark.parametrize(("stem", "batch", "size", "classes"), SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(MODELS))
def test_interleaved_training_steps(benchmark, name, stem, batch, size, classes):
    """The residual, plain and PNNH nets' eager training steps, each round timing STEPS_PER_ROUND
    steps of each in a seeded random order. The benchmark's own time is the whole session (not a
    step); the per-round step times and the ratios' intervals are in extra_info."""
    from pnnh_kernels.benchmarking.interleaved import round_orders, throughput_ratio

    labels = torch.randint(0, classes, (batch,), device=DEVICE)
    images = [
        torch.randn(batch, 3, size, size, device=DEVICE).to(memory_format=torch.channels_last)
        for _ in range(2)
    ]
    steps = {}
    for variant in INTERLEAVED_VARIANTS:
        model = _model(name, variant, stem, classes).to(DEVICE, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps[variant] = _training_step(model.train(), optimizer, labels)
    orders = round_orders(INTERLEAVED_VARIANTS, INTERLEAVED_ROUNDS)
    seconds: dict[str, list[float]] = {variant: [] for variant in INTERLEAVED_VARIANTS}

    def session() -> None:
        for step in steps.values():  # warm-up: allocator, autotuning, caches
            for i in range(2):
                step(images[i % 2])
        synchronize()
        for order in orders:
            for variant in order:
                start = time.perf_counter()
                for i in range(STEPS_PER_ROUND):
                    steps[variant](images[i % 2])
                synchronize()
                seconds[variant].append((time.perf_counter() - start) / STEPS_PER_ROUND)

    benchmark.group = f"{name} {stem} batch {batch} interleaved train steps"
    benchmark.pedantic(session, rounds=1, iterations=1)
    ratios = {
        f"{variant}_vs_{reference}": asdict(throughput_ratio(seconds[variant], seconds[reference]))
        for variant, reference in (("pnnh", "residual"), ("plain", "residual"), ("pnnh", "plain"))
    }
    benchmark.extra_info.update(
        {
            "kind": "interleaved", "model": name, "stem": stem, "batch": batch, "mode": "eager",
            "rounds": INTERLEAVED_ROUNDS, "steps_per_round": STEPS_PER_ROUND,
            "step_seconds": seconds, "orders": orders, **ratios,
            "device_name": torch.cuda.get_device_name(DEVICE) if ON_GPU else "cpu",
            "torch": torch.__version__,
        }
    )  # fmt: skip
