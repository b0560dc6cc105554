"""pnnh-kernels: fused kernels and models for plain neural nets with an internal coder path (PNNH).

The layer (docs/pnnh.md): ``y = act(norm(conv(x)) + W_D relu(W_E x_s + b_E))``.
"""

# The built-in backends register themselves on import (torch always; triton when installed; cuda,
# which says at call time whether its extension is built).
from pnnh_kernels import cuda as _cuda_backend  # noqa: F401
from pnnh_kernels import triton as _triton_backend  # noqa: F401
from pnnh_kernels.backends import BackendUnavailableError, registered_backends
from pnnh_kernels.backends import reference as _torch_backend  # noqa: F401
from pnnh_kernels.coder import PNNHCoder
from pnnh_kernels.pnnh_conv import FusedPNNHConv
from pnnh_kernels.pnnh_linear import FusedPNNHLinear
from pnnh_kernels.version import VERSION

__version__ = VERSION

__all__ = [
    "BackendUnavailableError",
    "FusedPNNHConv",
    "FusedPNNHLinear",
    "PNNHCoder",
    "registered_backends",
]
