"""2D task networks (chest X-rays) for fine-tuning, initialised from a 2D dira3d checkpoint or at random.

The 2D counterpart of :func:`dira3d.evaluation.build_task_network`: a
:class:`~dira3d.networks.ResNetClassifier` (encoder f_θ + pooled linear head) for ChestX-ray14 and
CheXpert, a :class:`~dira3d.networks.ResNetSegmenter` (encoder + decoder, f_θ and g_θ) for SIIM-ACR
and Montgomery. Weights come from a checkpoint of ``bundles/dira_pretrain`` run with
``configs/2d.json`` (a :class:`~dira3d.networks.ResNetUNet`); the load is strict, so a checkpoint of
another backbone or decoder fails with the keys and shapes that differ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from dira3d.data.errors import DataError
from dira3d.evaluation.pretrained import TASK_KINDS, initialise_task_network, network_mismatch
from dira3d.utils.checkpoint import check_pretrained_file

__all__ = ["build_resnet_task_network", "settings_mismatch"]

logger = logging.getLogger(__name__)


def build_resnet_task_network(
    kind: str,
    in_channels: int = 1,
    out: int = 1,
    backbone: str = "resnet50",
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    pretrained: str | os.PathLike | None = "",
    in_channels_policy: str = "error",
    bn_momentum: float | None = 0.1,
    dropout: float = 0.0,
    weights_loaded_later: bool = False,
    pretrained_head: str = "load",
) -> torch.nn.Module:
    """Build a 2D ResNet classifier or segmenter, optionally from a dira3d 2D checkpoint.

    Args:
        kind: ``"classification"`` (encoder → ``out`` logits) or ``"segmentation"`` (encoder +
            decoder → ``out`` logit maps).
        in_channels: input channels (1: the grey X-ray, as in the 2D pretraining configs).
        out: number of logits (classes) or output channels.
        backbone: ResNet depth (``"resnet50"`` in the paper); must match the checkpoint's.
        decoder_channels: the five decoder levels (segmentation); must match the checkpoint's.
        pretrained: path of a dira3d checkpoint; empty or ``None`` means random initialisation.
        in_channels_policy: ``"error"`` or ``"repeat"`` when the checkpoint's first convolution
            has another number of input channels.
        bn_momentum: BatchNorm momentum; ``None`` = cumulative average (smoke runs).
        dropout: dropout before the classifier's linear layer.
        weights_loaded_later: as in :func:`~dira3d.evaluation.build_task_network`.
        pretrained_head: as in :func:`~dira3d.evaluation.build_task_network`.

    Returns:
        The network, with the pretrained parts (encoder; encoder + decoder) loaded when asked.

    Raises:
        ValueError: unknown ``kind`` or a checkpoint whose keys or shapes do not fit (a
            :class:`~dira3d.data.errors.DataError`, one ``error:`` line under ``python -m monai.bundle run``).
        FileNotFoundError: ``pretrained`` names a missing file.
    """
    from dira3d.networks import ResNetClassifier, ResNetSegmenter

    if kind not in TASK_KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {sorted(TASK_KINDS)}")
    if kind == "classification":
        network: torch.nn.Module = ResNetClassifier(in_channels, out, backbone=backbone, dropout=dropout)
    else:
        network = ResNetSegmenter(in_channels, out, backbone=backbone, decoder_channels=tuple(decoder_channels))
    check_pretrained_file(pretrained, advice="give a dira3d 2D checkpoint (bundles/dira_pretrain with configs/2d.json) or "
                          "an empty string for random init")
    try:
        return initialise_task_network(network, kind, pretrained, in_channels_policy, bn_momentum,
                                       random_message=None if weights_loaded_later else
                                       f"pretrained: none; 2D {kind} network ({backbone}) initialised at random",
                                       log=logger, pretrained_head=pretrained_head)
    except ValueError as err:
        hint = (network_mismatch(pretrained, "ResNetUNet", 2)
                or settings_mismatch(pretrained, kind, backbone, decoder_channels))
        if hint:  # the settings to change, rather than a list of shape mismatches and advice for Python callers
            raise DataError(None, hint) from err
        if pretrained:  # a checkpoint that does not fit: one `error:` line under monai.bundle run (dira3d.utils.bundle_errors)
            raise DataError(None, str(err)) from err
        raise


def settings_mismatch(pretrained: str | os.PathLike | None, kind: str, backbone: str,
                       decoder_channels: Sequence[int]) -> str:
    """The error for a 2D checkpoint whose weights fit another ``backbone`` / ``decoder_channels`` than the task
    network's ('' when they fit these, or cannot be read): e.g. a ``2d_tiny.json`` checkpoint (resnet10) given to a
    bundle at its default resnet50 failed with 19 shape mismatches and advice for building the network in Python."""
    from dira3d.evaluation.finetune import BUNDLES_2D, tiny_settings
    from dira3d.networks.weights_fit import settings_that_fit
    from dira3d.utils.checkpoint import load_checkpoint
    from dira3d.utils.overrides import format_overrides, override_text, shell_word
    from dira3d.utils.setting_hints import bundle_setting, in_experiment

    try:
        checkpoint = load_checkpoint(pretrained)
        state = {f"{part}.{key}": value for part in TASK_KINDS[kind] if isinstance(checkpoint.get(part), dict)
                 for key, value in checkpoint[part].items()}
    except (OSError, ValueError, TypeError, AttributeError, RuntimeError):
        return ""
    current = {"backbone": backbone}
    if kind == "segmentation":  # a classifier loads the encoder only
        current["decoder_channels"] = [int(c) for c in decoder_channels]
    fits = settings_that_fit(state, current)
    if not fits:
        return ""
    named = ", ".join(f"{key} {value}" for key, value in fits.items())
    built = ", ".join(f"{key} {current[key]}" for key in fits)
    tiny = tiny_settings(BUNDLES_2D[0], tuple(current))  # the 2D bundles share their tiny.json network
    tiny_hint = ("a checkpoint of the pretraining bundle's 2d_tiny.json is fine-tuned with `dira3d finetune --tiny` "
                 "(the bundle's tiny.json: these settings and its roi_size); otherwise "
                 if tiny and all(tiny.get(key) == value for key, value in fits.items()) else "")
    sets = format_overrides(fits, "--set")  # "[..]" quoted for the shell
    bundle_options = " ".join(f"--{key} {shell_word(override_text(value))}" for key, value in fits.items())
    if in_experiment():  # tiny.json is `tiny: true` in the experiment's overrides
        tiny_hint = tiny_hint.replace("`dira3d finetune --tiny`", "`tiny: true` in the experiment config's overrides")
    how = bundle_setting(fits, f"`dira3d finetune {sets}`; `{bundle_options}` for monai.bundle run")
    return (f"pretrained weights from {pretrained} fit {named} (read from its weights), but the task network is built "
            f"with {built}: {tiny_hint}pass the settings it was pretrained with ({how})")
