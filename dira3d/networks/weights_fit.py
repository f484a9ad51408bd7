"""Which network settings a state_dict was built with, read from its key names and shapes.

For error messages that say which setting fits (``dira3d export``, ``dira3d localise``): a model
fine-tuned with ``--tiny`` and exported without the tiny settings is told which overrides to pass,
instead of being shown every missing key. No network is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dira3d.networks.pretrained import Shape, preview_keys
from dira3d.networks.unet import ENCODER_PLAN, scale_channels
from dira3d.utils.overrides import format_overrides  # the hints' --override words; kept importable from here

__all__ = ["infer_network_settings", "network_family", "state_dict_mismatch", "mismatch_summary", "settings_that_fit",
           "format_overrides", "same_value"]

_LAYER_BLOCK = re.compile(r"(?:^|\.)layer([1-4])\.(\d+)\.")
_DECODER_BLOCK = re.compile(r"^(?:decoder\.)?blocks\.(\d+)\.convs\.conv_1\.conv\.weight$")


def _resnet_params() -> dict[str, tuple[str, tuple[int, ...]]]:
    """backbone → (block type, blocks per stage), from MONAI's table (the one ResNetFeatures builds from)."""
    try:
        from monai.networks.nets.resnet import resnet_params
    except ImportError:  # pragma: no cover - older/newer MONAI without the table
        return {}
    return {name: (str(value[0]), tuple(value[1])) for name, value in resnet_params.items()}


def _unet_width(state: Mapping[str, torch.Tensor]) -> float:
    """The ``width`` of a Models Genesis U-Net state_dict: the shortest decimal that rebuilds the channel count of
    every encoder convolution it holds (``scale_channels`` rounds each: width 0.3 gives 10, 19, 19, 38, ... filters,
    so level 0 alone (10 / 32 = 0.3125) names a width that builds 20 where the checkpoint has 19); else the ratio
    of its deepest convolution, the finest one."""
    plan = [c for level in ENCODER_PLAN for c in level]
    observed = []
    for i in range(len(ENCODER_PLAN)):
        for j, conv in enumerate(("conv1", "conv2")):
            weight = _tensor(state, f"encoder.levels.{i}.{conv}.conv.weight", f"levels.{i}.{conv}.conv.weight")
            if weight is not None:
                observed.append((plan[2 * i + j], int(weight.shape[0])))
    base, count = observed[-1]
    ratio = count / base
    for decimals in range(1, 7):
        width = round(ratio, decimals)
        if width > 0 and all(scale_channels(b, width) == n for b, n in observed):
            return width
    return ratio


def _tensor(state: Mapping[str, Any], *names: str) -> torch.Tensor | None:
    for name in names:
        value = state.get(name)
        if isinstance(value, torch.Tensor):
            return value
    return None


def infer_network_settings(state: Mapping[str, Any]) -> dict[str, Any]:
    """The task-network settings a state_dict was built with, read from its key names and shapes.

    Understands the dira3d task networks (:class:`~dira3d.networks.Classifier` /
    :class:`~dira3d.networks.Segmenter`, the ResNet ones, their ``encoder`` / ``decoder`` parts,
    with or without the part prefix). Cheap: no network is built.

    Returns:
        a subset of ``spatial_dims``, ``in_channels``, ``backbone`` (ResNet depth from the blocks
        per stage), ``decoder_channels`` (ResNet U-Net decoder), ``width`` (Models Genesis U-Net)
        and ``out`` (classes / output channels); what cannot be read is left out.
    """
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    found: dict[str, Any] = {}
    stem = _tensor(state, "encoder.conv1.weight", "conv1.weight")
    level0 = _tensor(state, "encoder.levels.0.conv1.conv.weight", "levels.0.conv1.conv.weight")
    first = stem if stem is not None else level0
    if first is not None and first.dim() >= 3:
        found["spatial_dims"] = first.dim() - 2
        found["in_channels"] = int(first.shape[1])
    if level0 is not None:
        found["width"] = _unet_width(state)
    if stem is not None:
        blocks: dict[int, int] = {}
        for key in state:
            match = _LAYER_BLOCK.search(key)
            if match:
                stage, block = int(match.group(1)), int(match.group(2))
                blocks[stage] = max(blocks.get(stage, 0), block + 1)
        kind = "bottleneck" if any(".conv3." in k for k in state if _LAYER_BLOCK.search(k)) else "basic"
        layout = tuple(blocks.get(i, 0) for i in range(1, 5))
        for name, (block, layers) in _resnet_params().items():
            if block == kind and layers == layout:
                found["backbone"] = name
                break
    decoder = sorted((int(m.group(1)), v) for k, v in state.items() if (m := _DECODER_BLOCK.match(k)))
    if decoder:
        found["decoder_channels"] = [int(v.shape[0]) for _, v in decoder]
    out = _tensor(state, "fc.weight", "decoder.head.0.weight", "head.0.weight", "decoder.head.weight", "head.weight")
    if out is not None:
        found["out"] = int(out.shape[0])
    return found


def network_family(state: Mapping[str, Any]) -> str:
    """Which dira3d network a state_dict (an encoder, with or without its ``encoder.`` prefix, or a whole task
    network) was built as, from its key names: ``"UNet"`` (the Models Genesis U-Net of ``configs/train.json``, in 2D
    or 3D: ``levels.*``), ``"ResNetUNet"`` (a ResNet encoder, ``configs/2d.json``: ``conv1`` and ``layer1..4``), or
    '' for neither."""
    if _tensor(state, "encoder.levels.0.conv1.conv.weight", "levels.0.conv1.conv.weight") is not None:
        return "UNet"
    stem = _tensor(state, "encoder.conv1.weight", "conv1.weight")
    if stem is not None and any(_LAYER_BLOCK.search(k) for k in state):
        return "ResNetUNet"
    return ""


def state_dict_mismatch(
    state: Mapping[str, Any], network: nn.Module
) -> tuple[list[str], list[str], dict[str, tuple[Shape, Shape]]]:
    """``(missing, unexpected, mismatched)`` of loading ``state`` into ``network`` (mismatched: key → (state, network) shape)."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)}
    return missing, unexpected, mismatched


def mismatch_summary(missing: Sequence[str], unexpected: Sequence[str],
                     mismatched: Mapping[str, tuple[Shape, Shape]], shown: int = 3) -> str:
    """One short line: counts and the first ``shown`` keys of each kind (not the whole list)."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({preview_keys(list(missing), shown)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({preview_keys(list(unexpected), shown)})")
    if mismatched:
        shapes = [f"{k}: {a} vs network {b}" for k, (a, b) in mismatched.items()]
        parts.append(f"{len(shapes)} shape mismatch(es) ({preview_keys(shapes, shown)})")
    return "; ".join(parts) or "no differences"


def same_value(a: Any, b: Any) -> bool:
    """Equal settings: numbers by value (1 == 1.0), lists element by element."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) < 1e-9
    return a == b


def settings_that_fit(state: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``current`` (setting → value used now) that the weights in ``state`` need changed, with the value that fits."""
    inferred = infer_network_settings(state)
    return {k: inferred[k] for k in current if k in inferred and not same_value(inferred[k], current[k])}
