import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The switch is read when the kernels
# are defined, so it must be set before pnnh_kernels (and with it triton) is imported.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Fresh random inputs per test, reproducible per test.
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _exact_fp32_on_gpu():
    # PyTorch lets cuDNN convolutions use TF32 by default, and the fused kernels follow that switch
    # (triton.pnnh_conv.input_precision). TF32 keeps 10 mantissa bits, so fp32 checks against the
    # float64 reference at fp32's tolerance would fail on a GPU for the wrong reason: the tests check
    # the exact fp32 path. Tests of the TF32 path set the switch themselves.
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
