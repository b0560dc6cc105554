import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Fresh random inputs per test, reproducible per test.
    torch.manual_seed(0)
