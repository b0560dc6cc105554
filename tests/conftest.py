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
