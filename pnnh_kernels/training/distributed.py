"""One process or many under torchrun: process-group set-up, metric reduction, rank agreement."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes files and prints progress."""
        return self.rank == 0


def choose_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch.cuda.is_available() is False on this machine")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"--device: expected 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device("cpu")


def start(device_name: str) -> Processes:
    """Join torchrun's process group when WORLD_SIZE > 1: nccl on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world_size, local_rank, device)


def stop(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(values: list[float], processes: Processes) -> list[float]:
    """Element-wise sum over every rank (float64, so that counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=processes.device)
    if processes.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def max_over_ranks(value: float, processes: Processes) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=processes.device)
    if processes.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def weights_fingerprint(model: nn.Module) -> Tensor:
    """Per-parameter float64 sums and sums of squares: equal on every rank after a correct DDP step
    (the ranks' parameters are bitwise identical, so the sums are too)."""
    rows = [
        torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
        for p in model.parameters()
    ]
    return torch.stack(rows)


def ranks_agree(model: nn.Module, processes: Processes) -> bool:
    """Whether every rank holds the same weights (always True for one process)."""
    mine = weights_fingerprint(model).to(processes.device)
    if not processes.distributed:
        return True
    gathered = [torch.empty_like(mine) for _ in range(processes.world_size)]
    dist.all_gather(gathered, mine)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])
