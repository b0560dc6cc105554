"""The geometry of a PNNH convolution: kernel, stride, padding and dilation, normalised and checked.

The coder samples the input at the output's strided positions, ``x[:, :, oh * stride, ow * stride]``.
That lines up with the learner only when the padding centres the dilated kernel on that input pixel,
i.e. ``2 * padding == dilation * (kernel_size - 1)`` in each spatial dimension ("same"-like padding).
Every backend receives a :class:`ConvGeometry` that has already passed these checks, so kernels never
see a geometry they cannot compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

IntOrPair = Union[int, tuple[int, int]]
Padding = Union[IntOrPair, str, None]


def _pair(value: IntOrPair, name: str, *, minimum: int) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return pair


@dataclass(frozen=True)
class ConvGeometry:
    """Normalised convolution geometry; every field is a (height, width) pair of ints."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def from_args(
        cls,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = None,
        dilation: IntOrPair = 1,
        *,
        with_coder: bool,
    ) -> ConvGeometry:
        """Normalise nn.Conv2d-style arguments.

        ``padding=None`` means "same"-like padding ``dilation * (kernel_size - 1) // 2``, the only
        padding a coder accepts. ``"same"`` and ``"valid"`` follow nn.Conv2d; ``"same"`` needs
        stride 1 and a symmetric padding (``dilation * (kernel_size - 1)`` even).
        """
        kernel = _pair(kernel_size, "kernel_size", minimum=1)
        strides = _pair(stride, "stride", minimum=1)
        dilations = _pair(dilation, "dilation", minimum=1)
        span = (dilations[0] * (kernel[0] - 1), dilations[1] * (kernel[1] - 1))
        if padding is None or padding == "same":
            if padding == "same" and strides != (1, 1):
                raise ValueError("padding: 'same' is not supported for strided convolutions")
            if span[0] % 2 or span[1] % 2:
                raise NotImplementedError(
                    f"padding: {padding!r} needs dilation * (kernel_size - 1) even in each dimension "
                    f"for a symmetric padding, got kernel_size={kernel}, dilation={dilations}; "
                    "asymmetric padding is not supported: pad the input explicitly"
                )
            pads = (span[0] // 2, span[1] // 2)
        elif padding == "valid":
            pads = (0, 0)
        elif isinstance(padding, str):
            raise ValueError(
                f"padding: expected None, 'same', 'valid', an int or a pair, got {padding!r}"
            )
        else:
            pads = _pair(padding, "padding", minimum=0)
        if with_coder and (2 * pads[0] != span[0] or 2 * pads[1] != span[1]):
            raise ValueError(
                f"padding: a layer with a coder needs 'same'-like padding (2 * padding == dilation * "
                f"(kernel_size - 1)) so that the coder, which samples the input at the output's strided "
                f"positions, and the learner produce the same output size; got padding={pads}, "
                f"kernel_size={kernel}, dilation={dilations}. Use padding=None or coder_channels=0"
            )
        return cls(kernel, strides, pads, dilations)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the output for an input of ``height`` x ``width`` (nn.Conv2d's formula)."""
        sizes = []
        for size, k, s, p, d in zip(
            (height, width), self.kernel_size, self.stride, self.padding, self.dilation
        ):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]
