"""torchvision's ResNet state_dict keys for the library's ResNets, both ways.

Our ResNets keep torchvision's shapes but not its names: a conv + BatchNorm pair is one
FusedPNNHConv (``stages.0.0.layers.0.weight`` and ``stages.0.0.layers.0.norm.*`` for torchvision's
``layer1.0.conv1.weight`` and ``layer1.0.bn1.*``), the stem is ``stem.0`` (``stem`` for the CIFAR
stem), a projection shortcut is ``shortcut`` (``downsample.0`` and ``downsample.1``); ``fc`` is
``fc``. The mapping is built from the model's structure, so it holds for every depth and variant;
coders have no torchvision counterpart and keep their own initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pnnh_kernels.pnnh_conv import FusedPNNHConv

_NORM_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _fused_pairs(model: nn.Module) -> list[tuple[str, FusedPNNHConv, str, str]]:
    """(our prefix, layer, torchvision conv prefix, torchvision BN prefix) for every learner."""
    pairs = []
    stem = model.stem[0] if isinstance(model.stem, nn.Sequential) else model.stem
    pairs.append(("stem.0" if isinstance(model.stem, nn.Sequential) else "stem", stem, "conv1", "bn1"))
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            ours, theirs = f"stages.{i}.{j}", f"layer{i + 1}.{j}"
            for k, layer in enumerate(block.layers):
                pairs.append(
                    (f"{ours}.layers.{k}", layer, f"{theirs}.conv{k + 1}", f"{theirs}.bn{k + 1}")
                )
            if isinstance(block.shortcut, FusedPNNHConv):
                pairs.append((f"{ours}.shortcut", block.shortcut, f"{theirs}.downsample.0",
                              f"{theirs}.downsample.1"))  # fmt: skip
    return pairs


def torchvision_key_map(model: nn.Module) -> dict[str, str]:
    """Our state_dict key -> torchvision's, for every learner, BatchNorm and classifier entry of
    ``model`` (a pnnh_kernels.models.ResNet; coder entries are not in it)."""
    mapping: dict[str, str] = {}
    for ours, layer, conv, norm in _fused_pairs(model):
        mapping[f"{ours}.weight"] = f"{conv}.weight"
        if layer.bias is not None:
            mapping[f"{ours}.bias"] = f"{conv}.bias"
        if layer.norm is not None:
            for entry in _NORM_ENTRIES:
                mapping[f"{ours}.norm.{entry}"] = f"{norm}.{entry}"
    mapping["fc.weight"], mapping["fc.bias"] = "fc.weight", "fc.bias"
    return mapping


def to_torchvision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under torchvision's keys (coders left out)."""
    ours = model.state_dict()
    return {theirs: ours[key] for key, theirs in torchvision_key_map(model).items()}


class LoadResult(NamedTuple):
    """What a non-strict load left out, as nn.Module.load_state_dict reports it (torchvision keys)."""

    missing_keys: list[str]  # entries of the model that kept their own values
    unexpected_keys: list[str]  # entries of the state_dict that were not used


def load_torchvision_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> LoadResult:
    """Load a torchvision ResNet's state_dict (e.g. a pretrained checkpoint) into ``model``.

    ``strict``: every torchvision key must be used and every mapped entry of ``model`` filled (a
    ValueError lists the missing and unexpected keys and the shape mismatches). ``strict=False``
    loads what matches and returns the keys it did not fill and did not use (the plain and PNNH
    variants have no shortcut weights; a shallower checkpoint leaves layers missing): check them.
    Coders keep their initialisation either way.
    """
    mapping = torchvision_key_map(model)
    ours = model.state_dict()
    missing = [theirs for theirs in mapping.values() if theirs not in state_dict]
    wanted = set(mapping.values())
    unexpected = [key for key in state_dict if key not in wanted]
    mismatched = [
        f"{theirs}: {tuple(state_dict[theirs].shape)} for {key} {tuple(ours[key].shape)}"
        for key, theirs in mapping.items()
        if theirs in state_dict and state_dict[theirs].shape != ours[key].shape
    ]
    shortcuts = [key for key in unexpected if ".downsample." in key]
    if strict and shortcuts and not mismatched and not missing and len(shortcuts) == len(unexpected):
        # The plain and PNNH variants have no shortcut connections: a correct torchvision
        # checkpoint of the same depth differs from them by exactly its downsample entries.
        raise ValueError(
            f"state_dict: its {len(shortcuts)} shortcut entries ({', '.join(shortcuts[:3])}...) "
            f"have no place in this {getattr(model, 'variant', 'plain')!r} ResNet, which has no "
            "shortcut connections; everything else matches. Load with strict=False to skip them "
            "(they come back in the result's unexpected_keys)"
        )
    if mismatched or (strict and (missing or unexpected)):
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys ({', '.join(missing[:5])}...)")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:5])}...)")
        if mismatched:
            problems.append(f"shape mismatches ({'; '.join(mismatched[:5])})")
        raise ValueError(
            "state_dict: not a torchvision state_dict of this ResNet's depth and stem: "
            + ", ".join(problems)
        )
    with torch.no_grad():
        for key, theirs in mapping.items():
            if theirs in state_dict:
                ours[key].copy_(state_dict[theirs])
    return LoadResult(missing, unexpected)
