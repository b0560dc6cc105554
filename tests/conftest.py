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


@pytest.fixture(scope="session")
def cuda_emulator(request, tmp_path_factory):
    """The CUDA kernels' CPU emulation (pnnh_kernels.cuda.emulation), for every test file that runs
    the CUDA backend without a GPU. A build takes about 35 s of g++ on 2 cores, so it is kept in
    pytest's cache (.pytest_cache) under a digest of its sources and rebuilt when they change."""
    from pnnh_kernels.cuda import emulation

    missing = emulation.missing_tools()
    if missing:
        pytest.skip(f"cannot build the CUDA emulation here: missing {', '.join(missing)}")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is None:
        folder = tmp_path_factory.mktemp("cuda_emulation")
    else:
        folder = cache.mkdir("cuda_emulation")
    return emulation.load_emulator(emulation.cached_emulator(folder))
