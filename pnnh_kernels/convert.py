"""Bring your own model: turn a ResNet (torchvision's included) or a conv + BatchNorm + ReLU stack
into its PNNH, plain or residual twin built from FusedPNNHConv.

What is converted (docs/convert.md):

- torchvision-style residual blocks, recognised by their attributes: ``conv1, bn1, conv2, bn2``
  (``conv3, bn3`` for a bottleneck) and ``downsample`` (None or ``Sequential(conv, bn)``). Each
  conv + BN (+ ReLU) becomes one FusedPNNHConv with the learner weights and the BatchNorm state
  copied exactly. ``variant="residual"`` keeps the shortcut (the downsample converted too) and the
  ReLU after the add; ``"plain"`` and ``"pnnh"`` remove it, so every layer ends in its own ReLU.
- torchvision's ResNet stem (a module with ``conv1, bn1, relu, maxpool`` beside ``layer1``): its
  conv + BN + ReLU becomes one FusedPNNHConv without a coder (the stem sees pixels, not the
  rectified activations a coder is made for), ``bn1`` and ``relu`` become ``nn.Identity``.
- blocks of other layouts registered with :func:`register_block_layout` (kuangliu's CIFAR ResNets:
  ``KUANGLIU_BASIC``, ``KUANGLIU_BOTTLENECK``).
- in any ``nn.Sequential``: ``Conv2d, BatchNorm2d[, ReLU]`` runs, and a ``Conv2d, ReLU`` pair. The
  first convolution of the model (in its modules' order) reads the input and is its stem: no coder.

Coders (``"pnnh"``) follow the rule of the library's own PNNH models (pnnh_kernels.models): within a
stage (one ``nn.Sequential`` of blocks, or one ``nn.Sequential`` of layers) layers of the same
input width, output width and stride share one coder, per position inside a bottleneck; a layer that
keeps width and stride gets a tied coder, one that changes them an untied one; the stem gets none,
nor does a layer whose padding is not "same"-like (its output would not line up with the coder's
samples). The BatchNorm scales are copied as they are (a PNNH model built from scratch starts its
coder layers at a depth-scaled gamma instead: docs/pnnh.md).

What is not: grouped and depthwise convolutions (ResNeXt, MobileNet; the coder mixes all input
channels, a grouped learner does not), convolutions with a padding mode other than zeros, and any
block the rules above do not recognise. ``unsupported="keep"`` (default) leaves them as they are,
listed in the summary; ``"refuse"`` raises ``NotImplementedError`` naming the first one.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from pnnh_kernels.coder import DEFAULT_CODER_INIT
from pnnh_kernels.models.coder_bank import CoderBank, check_variant
from pnnh_kernels.models.parameters import count_parameters
from pnnh_kernels.models.resnet import _Block
from pnnh_kernels.pnnh_conv import FusedPNNHConv, fusion_problem

UNSUPPORTED_CHOICES = ("keep", "refuse")


@dataclass
class ConversionRow:
    path: str  # the module's name in the original model ("" for the model itself)
    action: str  # "converted", "kept" or "removed"
    detail: str


@dataclass
class ConversionSummary:
    variant: str
    parameters_before: int  # trained: what the optimizer updates
    parameters_after: int = 0
    stored_before: int = 0  # stored: a fixed coder is stored, not trained
    stored_after: int = 0
    rows: list[ConversionRow] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(row.action == action for row in self.rows)

    def table(self) -> str:
        """A Markdown table of every conversion decision and the parameter counts."""
        lines = [
            f"Conversion to {self.variant}: {self.count('converted')} converted, "
            f"{self.count('kept')} kept as they were, {self.count('removed')} shortcuts removed; "
            f"trained parameters {self.parameters_before:,} -> {self.parameters_after:,} "
            f"(stored {self.stored_before:,} -> {self.stored_after:,}: fixed coders are stored, "
            "not trained; a shared coder counted once)",
            "",
            "| module | action | detail |",
            "|---|---|---|",
        ]
        lines += [f"| {row.path or '(model)'} | {row.action} | {row.detail} |" for row in self.rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class _Converter:
    def __init__(
        self, variant: str, coder_channels: Optional[int], coder_init: str, coder_trainable: bool,
        unsupported: str, backend: str,
    ) -> None:  # fmt: skip
        self.variant = variant
        self.coders = variant == "pnnh" and coder_channels != 0
        self.coder_channels = coder_channels
        self.coder_init = coder_init
        self.coder_trainable = coder_trainable
        self.unsupported = unsupported
        self.backend = backend
        self.rows: list[ConversionRow] = []
        # The model's first convolution in its modules' order: it reads the input, pixels, and gets
        # no coder, as a ResNet stem does not (set by convert; None: every conv may get one).
        self.stem: Optional[nn.Module] = None
        # Rows whose detail names coders, finished once every layer has attached to its coder.
        self.pending: list[tuple[ConversionRow, str, list[tuple[str, FusedPNNHConv]]]] = []

    # -- one conv + BN (+ ReLU) -----------------------------------------------------------------

    @staticmethod
    def why_not(conv: nn.Conv2d, norm: Optional[nn.Module] = None) -> Optional[str]:
        """Why ``conv`` (with ``norm``) cannot become a FusedPNNHConv, or None (the converter
        decides coders from numeric padding: a string padding is refused here)."""
        if isinstance(conv, nn.Conv2d) and isinstance(conv.padding, str):
            return f"padding={conv.padding!r}: give the conversion explicit padding"
        return fusion_problem(conv, norm)

    def fused(
        self, conv: nn.Conv2d, norm: Optional[nn.BatchNorm2d], relu: bool, bank: Optional[CoderBank],
        key: object = None,
    ) -> FusedPNNHConv:  # fmt: skip
        stride = conv.stride[0] if conv.stride[0] == conv.stride[1] else conv.stride
        same_like = all(
            2 * p == d * (k - 1) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size)
        )
        reads_input = conv is self.stem
        coder = None
        if (
            bank is not None
            and self.coders
            and same_like
            and isinstance(stride, int)
            and not reads_input
        ):
            coder = bank.coder(conv.in_channels, conv.out_channels, stride, key)
            # the bank makes coders in the default dtype, on the CPU
            coder.to(device=conv.weight.device, dtype=conv.weight.dtype)
        return FusedPNNHConv.from_modules(
            conv, norm, nn.ReLU() if relu else None, coder=coder,
            coder_channels=None if coder is not None else 0, backend=self.backend,
        )  # fmt: skip

    def _coder_note(self, layer: FusedPNNHConv) -> str:
        if layer.coder is None:
            return "no coder"
        tied = "tied" if layer.coder.tied else "untied"
        return f"coder C_B={layer.code_channels} ({tied}, shared by {layer.coder.num_uses})"

    # -- blocks and stacks ----------------------------------------------------------------------

    def unsupported_module(self, path: str, reason: str) -> None:
        if self.unsupported == "refuse":
            raise NotImplementedError(f"{path or '(model)'}: cannot convert: {reason}")
        self.rows.append(ConversionRow(path, "kept", reason))

    def block(self, path: str, block: nn.Module, bank: CoderBank) -> nn.Module:
        layout = _layout_of(block)
        assert layout is not None  # callers check _is_block
        problem = _block_problem(block, layout)
        if problem is not None:
            self.unsupported_module(path, problem)
            return block
        convs = [getattr(block, name) for name in layout.convs]
        norms = [getattr(block, name) for name in layout.norms]
        projection = getattr(block, layout.shortcut, None)
        shortcut_parts: list[nn.Module] = []
        if projection is not None and not isinstance(projection, nn.Identity):
            parts = list(projection.children()) if isinstance(projection, nn.Sequential) else [None]
            if parts and (
                len(parts) != 2
                or not isinstance(parts[0], nn.Conv2d)
                or not isinstance(parts[1], nn.BatchNorm2d)
            ):
                self.unsupported_module(
                    path, f"{layout.shortcut} is not empty or Sequential(Conv2d, BatchNorm2d)"
                )
                return block
            shortcut_parts = parts
        for conv, norm in zip([*convs, *shortcut_parts[:1]], [*norms, *shortcut_parts[1:]]):
            reason = self.why_not(conv, norm)
            if reason is not None:
                self.unsupported_module(path, reason)
                return block
        residual = self.variant == "residual"
        # Bottleneck positions share coders per position; a two-layer block's layers share one.
        keys = list(range(len(convs))) if len(convs) > 2 else [None] * len(convs)
        layers = [
            self.fused(conv, norm, relu=index < len(convs) - 1 or not residual, bank=bank, key=key)
            for index, (conv, norm, key) in enumerate(zip(convs, norms, keys))
        ]
        shortcut: Optional[nn.Module] = None
        if residual:
            shortcut = nn.Identity()
            if shortcut_parts:
                shortcut = self.fused(shortcut_parts[0], shortcut_parts[1], relu=False, bank=None)
        else:
            what = "projection (1x1 conv + BN)" if shortcut_parts else "identity"
            where = f"{path}.{layout.shortcut}" if shortcut_parts else path
            self.rows.append(ConversionRow(where, "removed", f"{what} shortcut"))
        parts = [
            (f"{conv}+{norm}{'+relu' if layer.activation else ''}", layer)
            for conv, norm, layer in zip(layout.convs, layout.norms, layers)
        ]
        self.converted(path, f"{type(block).__name__}: ", parts)
        converted = _Block(layers, shortcut)
        # The block's mode on its containers; the fused layers keep the modes they took from the
        # modules they replace (a BatchNorm frozen in eval mode stays so).
        _train_containers(converted, block.training)
        return converted

    def converted(self, path: str, prefix: str, parts: list[tuple[str, FusedPNNHConv]]) -> None:
        row = ConversionRow(path, "converted", "")
        self.rows.append(row)
        self.pending.append((row, prefix, parts))

    def finish(self) -> list[ConversionRow]:
        for row, prefix, parts in self.pending:
            row.detail = prefix + "; ".join(
                f"{what}: {self._coder_note(layer)}" for what, layer in parts
            )
        return self.rows

    def sequential(self, path: str, stack: nn.Sequential) -> nn.Module:
        """Fuse Conv2d, BatchNorm2d[, ReLU] (and Conv2d, ReLU) runs; recurse into the rest."""
        children = list(stack.named_children())
        bank = CoderBank(enabled=self.coders, init=self.coder_init, trainable=self.coder_trainable,
                         code_channels=self.coder_channels)  # fmt: skip
        out: list[tuple[str, nn.Module]] = []
        index = 0
        changed = False
        while index < len(children):
            name, module = children[index]
            child_path = f"{path}.{name}" if path else name
            if isinstance(module, nn.Conv2d):
                following = [m for _, m in children[index + 1 : index + 3]]
                norm = following[0] if following and isinstance(following[0], nn.BatchNorm2d) else None
                after = following[1:] if norm is not None else following[:1]
                relu = bool(after) and isinstance(after[0], nn.ReLU)
                reason = self.why_not(module, norm)
                if reason is not None:
                    self.unsupported_module(child_path, reason)
                    out.append((name, module))
                    index += 1
                    continue
                stem = "stem (reads the input) " if module is self.stem else ""
                layer = self.fused(module, norm, relu, bank)
                parts = "conv" + ("+bn" if norm is not None else "") + ("+relu" if relu else "")
                self.converted(child_path, stem, [(parts, layer)])
                out.append((name, layer))
                index += 1 + (norm is not None) + relu
                changed = True
                continue
            if _is_block(module):
                converted = self.block(child_path, module, bank)
                changed |= converted is not module
                out.append((name, converted))
            else:
                replaced = self.module(child_path, module)
                changed |= replaced is not module
                out.append((name, replaced))
            index += 1
        if changed:  # in place: a top-level Sequential converted with inplace=True is the caller's
            stack._modules.clear()
            stack._modules.update(OrderedDict(out))
        return stack

    def module(self, path: str, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Sequential):
            return self.sequential(path, module)
        if _is_block(module):
            return self.block(path, module, CoderBank(enabled=self.coders, init=self.coder_init,
                                                      trainable=self.coder_trainable,
                                                      code_channels=self.coder_channels))  # fmt: skip
        if _looks_like_a_block(module):
            # Its forward is unknown: fusing inside it could add a coder to a shortcut path.
            self.unsupported_module(path, f"{type(module).__name__}: a residual block of a layout "
                                    "the converter does not recognise")  # fmt: skip
            return module
        stem_done = _is_torchvision_resnet(module)
        if stem_done:
            self._stem(path, module)
        for name, child in list(module.named_children()):
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, FusedPNNHConv) or (stem_done and name in ("conv1", "bn1", "relu")):
                continue
            replaced = self.module(child_path, child)
            if replaced is not child:
                setattr(module, name, replaced)
        return module

    def _stem(self, path: str, model: nn.Module) -> None:
        reason = self.why_not(model.conv1)
        if reason is not None:
            self.unsupported_module(f"{path}.conv1" if path else "conv1", reason)
            return
        model.conv1 = self.fused(model.conv1, model.bn1, relu=True, bank=None)
        model.bn1 = nn.Identity().train(model.training)
        model.relu = nn.Identity().train(model.training)
        self.converted(f"{path}.conv1" if path else "conv1", "stem ", [("conv1+bn1+relu", model.conv1)])


@dataclass(frozen=True)
class BlockLayout:
    """Where a residual block keeps its parts, for a block whose forward is
    ``relu(bn_k(conv_k(... relu(bn_1(conv_1(x))) ...)) + shortcut(x))``: the convolutions and their
    BatchNorms in order, the shortcut's attribute (None, an empty nn.Sequential or nn.Identity for
    the identity; ``Sequential(Conv2d, BatchNorm2d)`` for a projection) and the attribute of its
    ReLU module, if it has one (a block that calls F.relu has none). torchvision's BasicBlock and
    Bottleneck are recognised without registration; register others with
    :func:`register_block_layout`."""

    convs: tuple[str, ...] = ("conv1", "conv2")
    norms: tuple[str, ...] = ("bn1", "bn2")
    shortcut: str = "downsample"
    relu: Optional[str] = "relu"

    def __post_init__(self) -> None:
        if not self.convs or len(self.convs) != len(self.norms):
            raise ValueError(
                f"layout: expected as many norms as convs (at least one), got {self.convs} and "
                f"{self.norms}"
            )


TORCHVISION_BASIC = BlockLayout()
TORCHVISION_BOTTLENECK = BlockLayout(("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"))
# kuangliu/pytorch-cifar's BasicBlock and Bottleneck: the shortcut is "shortcut", F.relu is called.
KUANGLIU_BASIC = BlockLayout(shortcut="shortcut", relu=None)
KUANGLIU_BOTTLENECK = BlockLayout(
    ("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"), shortcut="shortcut", relu=None
)

_registered_layouts: dict[type, BlockLayout] = {}


def register_block_layout(block_class: type[nn.Module], layout: BlockLayout) -> None:
    """Convert every instance of ``block_class`` (exactly that class) by ``layout``: the user
    vouches that its forward is the one :class:`BlockLayout` describes; the conversion with
    ``variant="residual"`` computes what the original computes, which checks it."""
    if not (isinstance(block_class, type) and issubclass(block_class, nn.Module)):
        raise TypeError(f"block_class: expected an nn.Module subclass, got {block_class!r}")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    _registered_layouts[block_class] = layout


def _layout_of(module: nn.Module) -> Optional[BlockLayout]:
    """The layout ``module`` is converted by: registered for its class, or torchvision's."""
    registered = _registered_layouts.get(type(module))
    if registered is not None:
        return registered
    if all(hasattr(module, name) for name in ("conv1", "bn1", "conv2", "bn2", "downsample")) and (
        isinstance(module.conv1, nn.Conv2d) and isinstance(module.bn1, nn.BatchNorm2d)
    ):
        return TORCHVISION_BOTTLENECK if hasattr(module, "conv3") else TORCHVISION_BASIC
    return None


def _block_problem(block: nn.Module, layout: BlockLayout) -> Optional[str]:
    """Why a block with ``layout``'s attributes is not one the converter can rebuild."""
    known = {*layout.convs, *layout.norms, layout.shortcut, *((layout.relu,) if layout.relu else ())}
    missing = [name for name in (*layout.convs, *layout.norms) if not hasattr(block, name)]
    if missing:
        return f"{type(block).__name__} has no {', '.join(missing)} (its layout names them)"
    extra = sorted(name for name, _ in block.named_children() if name not in known)
    if extra:
        return f"{type(block).__name__} has modules its layout has not: {', '.join(extra)}"
    relu = getattr(block, layout.relu, None) if layout.relu else None
    if relu is not None and type(relu) is not nn.ReLU:
        return f"{type(block).__name__}.{layout.relu} is {type(relu).__name__}, not nn.ReLU"
    if block._forward_hooks or block._forward_pre_hooks:
        return "forward hooks on the block would be lost"
    for name in layout.convs:
        if not isinstance(getattr(block, name), nn.Conv2d):
            return f"{name} is {type(getattr(block, name)).__name__}, not Conv2d"
    return None


def _train_containers(module: nn.Module, mode: bool) -> None:
    """``module.train(mode)`` that leaves every FusedPNNHConv inside it (and its parts) as it is."""
    module.training = mode
    for child in module.children():
        if not isinstance(child, FusedPNNHConv):
            _train_containers(child, mode)


def _looks_like_a_block(module: nn.Module) -> bool:
    """A residual block the converter does not recognise: a shortcut-like child, or a block-like
    class name (kuangliu's CIFAR ResNets, timm's blocks)."""
    names = {name for name, _ in module.named_children()}
    named = type(module).__name__.endswith(("Block", "Bottleneck"))
    return bool(names & {"shortcut", "downsample", "skip", "residual"}) or named


def _is_block(module: nn.Module) -> bool:
    return _layout_of(module) is not None


def _is_torchvision_resnet(module: nn.Module) -> bool:
    return (
        all(hasattr(module, name) for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "fc"))
        and isinstance(module.conv1, nn.Conv2d)
        and isinstance(module.bn1, nn.BatchNorm2d)
    )


def convert(
    model: nn.Module,
    variant: str = "pnnh",
    *,
    coder_channels: Optional[int] = None,
    coder_init: str = DEFAULT_CODER_INIT,
    coder_trainable: bool = False,
    unsupported: str = "keep",
    backend: str = "auto",
    inplace: bool = False,
    first_conv_is_stem: bool = True,
) -> tuple[nn.Module, ConversionSummary]:
    """The PNNH (``"pnnh"``), plain (``"plain"``) or residual (``"residual"``) twin of ``model`` and
    a summary of what was converted, kept and removed (see the module docstring for the rules).

    ``"residual"`` keeps every shortcut and adds no coder: the converted model computes what the
    original computes (in float64 and eval mode to 1e-10; tests/test_convert.py), a check that the
    weights were copied exactly. New modules take the training mode and the ``requires_grad`` flags
    of what they replace. ``coder_channels``: C_B of every coder (default max(1, C_in // 2)); 0 with
    ``"pnnh"`` gives the plain twin. ``inplace=False`` converts a deep copy; ``inplace=True``
    converts ``model`` itself, except a top-level block, which is replaced: use the returned model.
    ``first_conv_is_stem``: the model's first convolution (in its modules' order) reads its input,
    pixels, and gets no coder, wherever it sits; False when converting part of a network.
    """
    check_variant(variant)
    if unsupported not in UNSUPPORTED_CHOICES:
        raise ValueError(f"unsupported: expected one of {UNSUPPORTED_CHOICES}, got {unsupported!r}")
    if coder_channels is not None and coder_channels < 0:
        raise ValueError(f"coder_channels: expected >= 0 or None, got {coder_channels}")
    if coder_channels and variant != "pnnh":
        raise ValueError(
            f"coder_channels: {coder_channels} given with variant={variant!r}, which has no coders"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    summary = ConversionSummary(
        variant, count_parameters(model, trainable_only=True), stored_before=count_parameters(model)
    )
    target = model if inplace else copy.deepcopy(model)
    converter = _Converter(variant, coder_channels, coder_init, coder_trainable, unsupported, backend)
    if first_conv_is_stem:
        converter.stem = next((m for m in target.modules() if isinstance(m, nn.Conv2d)), None)
    converted = converter.module("", target)
    summary.rows = converter.finish()
    summary.parameters_after = count_parameters(converted, trainable_only=True)
    summary.stored_after = count_parameters(converted)
    if not any(row.action == "converted" for row in summary.rows):
        raise ValueError(
            "model: nothing to convert: no torchvision-style residual block, ResNet stem or "
            "Conv2d + BatchNorm2d run in an nn.Sequential was found"
            + (f" ({len(summary.rows)} modules kept: {summary.rows[0].detail})" if summary.rows else "")
        )
    return converted, summary
