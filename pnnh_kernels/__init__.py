"""pnnh-kernels: fused kernels and models for plain neural nets with an internal coder path (PNNH).

The layer (docs/pnnh.md): ``y = act(norm(conv(x)) + W_D relu(W_E x_s + b_E))``.
"""

from pnnh_kernels.backends import BackendUnavailableError, registered_backends
from pnnh_kernels.coder import PNNHCoder
from pnnh_kernels.pnnh_conv import FusedPNNHConv
from pnnh_kernels.pnnh_linear import FusedPNNHLinear

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FusedPNNHConv",
    "FusedPNNHLinear",
    "PNNHCoder",
    "registered_backends",
]
