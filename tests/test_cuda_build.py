"""What a machine without a GPU can check of the CUDA backend: the extension builds for sm_80 and
sm_90a with warnings as errors and no spills (the resource report goes to build/cuda_resources.md),
the module has its symbols and rejects bad arguments before touching a GPU, and the Python side
explains why the backend cannot run here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pnnh_kernels import FusedPNNHConv
from pnnh_kernels import cuda as cuda_backend
from pnnh_kernels.backends import BackendUnavailableError, registered_backends
from pnnh_kernels.cuda import build

REPORT = Path(__file__).resolve().parents[1] / "build" / "cuda_resources.md"
STATIC_SHARED_LIMIT = 48 * 1024


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> build.BuildResult:
    missing = build.missing_tools()
    if missing:
        pytest.skip(f"cannot build the CUDA extension here: missing {', '.join(missing)}")
    return build.build(tmp_path_factory.mktemp("cuda_build"), architectures="80;90a")


def test_extension_builds_for_sm80_and_sm90a_without_spills(built):
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(build.markdown_report(built.resources, "80;90a", "nvcc (test_cuda_build)"))
    found = {(r.kernel, r.dtype, r.arch) for r in built.resources}
    expected = {
        (kernel, dtype, arch)
        for kernel in build.KERNELS
        for dtype in ("fp32", "fp16", "bf16")
        for arch in ("sm_80", "sm_90a")
    }
    assert found == expected
    for r in built.resources:
        assert (r.spill_store_bytes, r.spill_load_bytes, r.stack_bytes) == (0, 0, 0), r
        assert r.shared_bytes <= STATIC_SHARED_LIMIT, r
        assert r.registers <= 255, r


def _cuobjdump() -> str:
    """The CUDA toolkit's cuobjdump, else the one inside the triton wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        pytest.skip("no cuobjdump: neither in PATH nor in a triton wheel")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not bundled.is_file():
        pytest.skip(f"no cuobjdump: neither in PATH nor at {bundled}")
    return str(bundled)


def test_tensor_core_instructions_in_the_fp16_and_bf16_kernels(built):
    cuobjdump = subprocess.run(
        [_cuobjdump(), "--dump-sass", str(built.module)], capture_output=True, text=True
    )
    if cuobjdump.returncode != 0:
        pytest.skip(f"cuobjdump failed: {cuobjdump.stderr[-300:]}")
    sass = cuobjdump.stdout
    assert "HMMA.16816.F32.BF16" in sass  # mma.sync m16n8k16, bf16 in, fp32 accumulate
    assert "HMMA.16816.F32 " in sass or "HMMA.16816.F32\n" in sass  # the fp16 one
    assert "LDGSTS.E.BYPASS.128" in sass  # 16-byte cp.async


def _run_with_module(module: Path, code: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from pnnh_kernels.cuda import load_module_from
        C = load_module_from(Path({str(module)!r}))
        """
    ) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_module_symbols_and_metadata(built):
    result = _run_with_module(
        built.module,
        """
        names = ["ConvShape", "forward", "coder_backward", "dgrad", "wgrad", "device_count",
                 "compute_capability", "tile_rows", "kernel_names"]
        count, error = C.device_count()
        print(json.dumps({"missing": [n for n in names if not hasattr(C, n)],
                          "kernels": C.kernel_names(), "archs": C.cuda_architectures,
                          "rows": C.tile_rows(), "count": count, "error": error}))
        """,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["missing"] == []
    assert tuple(info["kernels"]) == build.KERNELS
    assert info["archs"] == "80,90a"
    assert info["rows"] == 64
    if not torch.cuda.is_available():
        assert info["count"] == 0
        assert info["error"]  # says why there is no device


def test_module_rejects_bad_arguments_before_launching(built):
    result = _run_with_module(
        built.module,
        """
        shape = C.ConvShape(1, 4, 4, 8, 4, 4, 65536 * 64, 3, 3, 1, 1, 1, 1, 1, 1)
        messages = []
        for call in (
            lambda: C.forward(shape, 0, 7, True, 0, *([0] * 12), 0),
            lambda: C.forward(shape, 0, 0, True, 9, *([0] * 12), 0),
            lambda: C.forward(shape, 0, 0, True, 0, *([0] * 12), 0),
        ):
            try:
                call()
                messages.append("no error")
            except ValueError as error:
                messages.append(str(error))
        print(json.dumps(messages))
        """,
    )
    assert result.returncode == 0, result.stderr
    mode, dtype, grid = json.loads(result.stdout.strip().splitlines()[-1])
    assert mode.startswith("mode: expected")
    assert dtype.startswith("dtype: expected")
    assert "pnnh_conv_forward_kernel" in grid
    assert "65535" in grid


MANGLED = "_ZN4pnnh12_GLOBAL__N_124pnnh_conv_forward_kernelI6__halfEEvNS_11ForwardArgsE"
PTXAS_LOG = f"""\
ptxas info    : Compiling entry function '{MANGLED}' for 'sm_90a'
ptxas info    : Function properties for {MANGLED}
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 125 registers, used 1 barriers, 21248 bytes smem, 526 bytes cmem[0]
"""


def test_ptxas_report_parsing():
    (entry,) = build.parse_ptxas(PTXAS_LOG)
    assert entry == build.KernelResources(
        "pnnh_conv_forward_kernel", "fp16", "sm_90a", 125, 21248, 8, 4, 12
    )


def test_backend_is_registered_and_explains_why_it_cannot_run_here():
    assert "cuda" in registered_backends()
    reason = cuda_backend.unavailable_reason(torch.device("cpu"), torch.float32, "conv2d")
    assert reason == "the CUDA kernels run on CUDA tensors, not on cpu"
    assert "dtypes" in cuda_backend.unavailable_reason(torch.device("cuda"), torch.int8, "conv2d")
    if not torch.cuda.is_available():
        assert not cuda_backend.is_available()
        assert cuda_backend.why_unavailable()
        layer = FusedPNNHConv(4, 4, backend="cuda")
        with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
            layer(torch.randn(1, 4, 5, 5))
        assert FusedPNNHConv(4, 4).backend_in_use == "torch"  # "auto" never picks cuda


def test_missing_extension_says_how_to_build_it(monkeypatch, tmp_path):
    from pnnh_kernels.cuda import availability

    monkeypatch.setattr(availability, "_extension", None)
    monkeypatch.setattr(availability, "_load_error", None)
    monkeypatch.setitem(sys.modules, "pnnh_kernels._C", None)  # makes the import fail
    monkeypatch.setenv("PNNH_CUDA_CACHE", str(tmp_path))
    assert cuda_backend.extension() is None
    reason = cuda_backend.unavailable_reason(torch.device("cuda"), torch.float32, "conv2d")
    assert "python -m pnnh_kernels.cuda.build" in reason
    assert str(tmp_path) in reason
