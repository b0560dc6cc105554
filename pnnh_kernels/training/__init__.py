"""``pnnh train``: data loaders, optimiser and schedules, checkpoints, DDP and the training loop."""

from pnnh_kernels.training.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
