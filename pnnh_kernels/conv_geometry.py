"""The geometry of a PNNH convolution: kernel, stride, padding and dilation, normalised and checked.

The coder samples the input at the output's strided positions, ``x[:, :, oh * stride, ow * stride]``.
That lines up with the learner only when the padding centres the dilated kernel on that input pixel,
i.e. ``2 * padding == dilation * (kernel_size - 1)`` in each spatial dimension ("same"-like padding).
Every backend receives a :class:`ConvGeometry` that has already passed these checks, so kernels never
see a geometry they cannot compute.

Without a coder, "same" padding may be asymmetric: when ``dilation * (kernel_size - 1)`` is odd,
nn.Conv2d puts the extra row (column) at the bottom (right). The geometry then carries the padding
before the image (``padding``, top/left) apart from the padding after it (``padding_end``,
bottom/right). The kernels only ever use the top/left offset and the output size (which the end
padding sets): an input pixel's output rows are found from the top offset and bounded by the output
height, so forward, dgrad and wgrad need no copy of a padded input.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Union

from torch import Tensor

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
    """Normalised convolution geometry; every field is a (height, width) pair of ints.

    ``padding`` is the zero padding before the image (top, left), ``padding_end`` the one after it
    (bottom, right); ``padding_end=None`` means the same as ``padding`` (symmetric, as nn.Conv2d's
    int padding) and is resolved to that pair on construction.
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    padding_end: Optional[tuple[int, int]] = None
    # The lists the fused ops take (``op_padding`` is ``[top, left, bottom, right]``), made once per
    # geometry: a layer's forward passes them every step (callers must not mutate them). Plain
    # fields, not cached properties: torch.compile cannot trace cached_property's lock.
    op_padding: list[int] = field(init=False, repr=False, compare=False)
    stride_list: list[int] = field(init=False, repr=False, compare=False)
    dilation_list: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.padding_end is None:
            object.__setattr__(self, "padding_end", self.padding)
        object.__setattr__(self, "op_padding", [*self.padding, *self.padding_end])
        object.__setattr__(self, "stride_list", list(self.stride))
        object.__setattr__(self, "dilation_list", list(self.dilation))

    @property
    def is_symmetric(self) -> bool:
        return self.padding_end == self.padding

    @classmethod
    def from_op_padding(
        cls,
        kernel_size: tuple[int, int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
    ) -> ConvGeometry:
        """The inverse of :attr:`op_padding`, for an already validated geometry."""
        return cls(
            (kernel_size[0], kernel_size[1]),
            (stride[0], stride[1]),
            (padding[0], padding[1]),
            (dilation[0], dilation[1]),
            (padding[2], padding[3]),
        )

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

        ``padding=None`` means "same"-like padding: ``dilation * (kernel_size - 1)`` zeros in all,
        half before the image and the rest after it, the only padding a coder accepts. ``"same"`` and
        ``"valid"`` follow nn.Conv2d; ``"same"`` needs stride 1. When ``dilation * (kernel_size - 1)``
        is odd the "same" padding is asymmetric, one more row/column at the bottom/right as nn.Conv2d
        pads it; that is supported only without a coder (``NotImplementedError`` with one).
        Memoised for hashable arguments: a layer's forward normalises the same ones every step.
        """
        if all(map(_exact, (kernel_size, stride, padding, dilation))):
            return _from_args(kernel_size, stride, padding, dilation, with_coder)
        return cls._normalise(kernel_size, stride, padding, dilation, with_coder)

    @classmethod
    def _normalise(
        cls,
        kernel_size: IntOrPair,
        stride: IntOrPair,
        padding: Padding,
        dilation: IntOrPair,
        with_coder: bool,
    ) -> ConvGeometry:
        kernel = _pair(kernel_size, "kernel_size", minimum=1)
        strides = _pair(stride, "stride", minimum=1)
        dilations = _pair(dilation, "dilation", minimum=1)
        span = (dilations[0] * (kernel[0] - 1), dilations[1] * (kernel[1] - 1))
        if padding is None or padding == "same":
            if padding == "same" and strides != (1, 1):
                raise ValueError("padding: 'same' is not supported for strided convolutions")
            pads = (span[0] // 2, span[1] // 2)
            pads_end = (span[0] - pads[0], span[1] - pads[1])
            if pads_end != pads:
                if with_coder:
                    raise NotImplementedError(
                        f"padding: {padding!r} with a coder needs dilation * (kernel_size - 1) even in "
                        f"each dimension, got kernel_size={kernel}, dilation={dilations}: the padding "
                        f"would be asymmetric (top/left {pads}, bottom/right {pads_end}), so the "
                        "learner's receptive field would not be centred on the pixel the coder "
                        "samples. Use an odd kernel_size or an even dilation, or coder_channels=0 "
                        "(asymmetric 'same' padding is supported without a coder)"
                    )
                return cls(kernel, strides, pads, dilations, pads_end)
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
        for size, k, s, p, p_end, d in zip(
            (height, width),
            self.kernel_size,
            self.stride,
            self.padding,
            self.padding_end,
            self.dilation,
        ):
            sizes.append((size + p + p_end - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]


def _exact(value: object) -> bool:
    """Whether ``value`` may key the cache: exactly an int, a str, None or a tuple of two ints (a
    cache keyed by equality would take True, 1.0 or (1.0, 1) for 1 and (1, 1), which _pair refuses)."""
    kind = type(value)
    if kind is int or kind is str or value is None:
        return True
    return kind is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int


@functools.lru_cache(maxsize=1024)
def _from_args(
    kernel_size: IntOrPair, stride: IntOrPair, padding: Padding, dilation: IntOrPair, with_coder: bool
) -> ConvGeometry:
    return ConvGeometry._normalise(kernel_size, stride, padding, dilation, with_coder)


@functools.lru_cache(maxsize=1024)
def _op_geometry(kernel: tuple[int, int], stride: tuple, padding: tuple, dilation: tuple):
    return ConvGeometry.from_op_padding(kernel, list(stride), list(padding), list(dilation))


def op_geometry(weight: Tensor, stride: list, padding: list, dilation: list) -> ConvGeometry:
    """The geometry of a fused op's call (``padding`` is [top, left, bottom, right], the entry point
    has validated it). Cached: a training step builds the same few every time. Not for fake
    implementations, where the sizes may be SymInts, which do not hash."""
    shape = weight.shape
    return _op_geometry((shape[2], shape[3]), tuple(stride), tuple(padding), tuple(dilation))
