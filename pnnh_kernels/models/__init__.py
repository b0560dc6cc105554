"""PNNH, plain and residual models built from the PNNH layers."""

from pnnh_kernels.models.coder_bank import VARIANTS, CoderBank
from pnnh_kernels.models.deep_cnn import DeepCNN, deep_cnn
from pnnh_kernels.models.parameters import count_parameters, parameter_breakdown
from pnnh_kernels.models.resnet import ResNet, resnet18, resnet34, resnet50
from pnnh_kernels.models.vit import VisionTransformer, vit, vit_small, vit_tiny

__all__ = [
    "VARIANTS",
    "CoderBank",
    "DeepCNN",
    "ResNet",
    "VisionTransformer",
    "count_parameters",
    "deep_cnn",
    "parameter_breakdown",
    "resnet18",
    "resnet34",
    "resnet50",
    "vit",
    "vit_small",
    "vit_tiny",
]
