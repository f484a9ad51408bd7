"""Task networks for fine-tuning, initialised from a dira3d checkpoint or at random.

What is transferred (docs/method.md): the encoder f_θ for classification, encoder + decoder
(f_θ, g_θ) for segmentation. The load itself is :func:`dira3d.networks.load_pretrained`; this
module picks the parts, builds the network and prints the report of what was and was not loaded,
so that every fine-tuning log says where its weights came from.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from dira3d.data.errors import DataError
from dira3d.utils.checkpoint import check_pretrained_file, checkpoint_problem

__all__ = ["TASK_KINDS", "build_task_network", "initialise_task_network", "checkpoint_mismatch", "checkpoint_problem", "dims_mismatch",
           "network_mismatch", "PRETRAINED_HEADS", "check_pretrained_head"]

logger = logging.getLogger(__name__)

# kind -> the checkpoint parts that initialise it
TASK_KINDS: dict[str, tuple[str, ...]] = {
    "classification": ("encoder",),
    "segmentation": ("encoder", "decoder"),
}

# the segmentation bundles' `pretrained_head` -> load_pretrained's head_policy: "load" copies the pretraining's output
# layer (its restoration head: it predicts image intensity) when its shape fits; "initialise" leaves it as initialised
PRETRAINED_HEADS = {"load": "initialise", "initialise": "always"}


def check_pretrained_head(pretrained_head: object) -> str:
    """Refuse a ``pretrained_head`` setting other than ``"load"`` or ``"initialise"`` in one line (a
    :class:`~dira3d.data.errors.DataError`, one ``error:`` line under ``python -m monai.bundle run``)."""
    if pretrained_head not in PRETRAINED_HEADS:
        raise DataError(None, f"pretrained_head={pretrained_head!r} is not a choice; set pretrained_head to "
                        "initialise (the segmentation output layer starts at random) or load (it starts from the "
                        "pretraining's restoration head when the shapes fit), e.g. `dira3d finetune --set "
                        "pretrained_head=initialise` or `--pretrained_head initialise` for monai.bundle run")
    return str(pretrained_head)


def build_task_network(
    kind: str,
    spatial_dims: int = 3,
    in_channels: int = 1,
    out: int = 1,
    width: float = 1.0,
    pretrained: str | os.PathLike | None = "",
    in_channels_policy: str = "error",
    bn_momentum: float | None = 0.1,
    weights_loaded_later: bool = False,
    pretrained_head: str = "load",
) -> torch.nn.Module:
    """Build a :class:`~dira3d.networks.Classifier` or :class:`~dira3d.networks.Segmenter`.

    Args:
        kind: ``"classification"`` (encoder + pooled linear head → ``out`` logits) or
            ``"segmentation"`` (encoder + decoder → ``out`` logit maps).
        spatial_dims: 2 or 3.
        in_channels: input channels of the task (e.g. 4 for BraTS with all modalities).
        out: number of output logits / channels.
        width: channel width multiplier; must match the checkpoint's when ``pretrained`` is set.
        pretrained: path of a dira3d checkpoint; empty or ``None`` means random initialisation.
        in_channels_policy: what to do when the checkpoint's first convolution has another number
            of input channels: ``"error"`` or ``"repeat"`` (repeat and rescale the kernel).
        bn_momentum: momentum of the BatchNorm running statistics (PyTorch's default 0.1);
            ``None`` uses a cumulative average over all training batches, which gives usable
            eval-mode statistics after a handful of iterations (smoke runs) but keeps those of the
            early weights in longer runs, where eval-mode predictions then fall apart (docs/finetuning.md).
        weights_loaded_later: the caller loads trained weights next (the evaluation and inference
            configs): a random start is then not reported, as it would read as an untrained model.
        pretrained_head: segmentation: ``"load"`` copies the checkpoint's decoder output head (the pretraining's
            restoration layer) when its shape fits, ``"initialise"`` leaves it at random (:data:`PRETRAINED_HEADS`).

    Returns:
        The network, with pretrained weights loaded when asked.

    Raises:
        ValueError: unknown ``kind``, or a checkpoint whose keys or shapes do not fit (the message
            lists the keys and shapes that differ, or the setting to change; a
            :class:`~dira3d.data.errors.DataError`, one ``error:`` line under ``python -m monai.bundle run``).
        FileNotFoundError: ``pretrained`` names a file that does not exist.
    """
    from dira3d.networks import Classifier, Segmenter  # sibling module, imported late

    if kind not in TASK_KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {sorted(TASK_KINDS)}")
    if kind == "classification":
        network: torch.nn.Module = Classifier(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=out, width=width)
    else:
        network = Segmenter(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out, width=width)
    try:
        return initialise_task_network(
            network, kind, pretrained, in_channels_policy, bn_momentum,
            random_message=None if weights_loaded_later else
            f"pretrained: none; {kind} network initialised at random (width={width}, in_channels={in_channels})",
            pretrained_head=pretrained_head)
    except ValueError as err:
        # the dimensions first: a 2D checkpoint at another width was told to change the width, then refused for being 2D
        hint = (dims_mismatch(pretrained, spatial_dims) or network_mismatch(pretrained, "UNet", spatial_dims)
                or _width_mismatch(pretrained, width))
        if hint:  # the one setting to change, rather than dozens of shape mismatches
            raise DataError(None, hint) from err
        if pretrained:  # a checkpoint that does not fit: one `error:` line under monai.bundle run (dira3d.utils.bundle_errors)
            raise DataError(None, str(err)) from err
        raise


def _width_mismatch(pretrained: str | os.PathLike | None, width: float) -> str:
    """The error for a checkpoint pretrained at another ``width`` than the task network's ('' if its
    meta records none, or the same): e.g. a ``dira3d pretrain --tiny`` checkpoint (width 0.125) given to a
    task bundle at its default width 1.0, which failed with the shapes of 48 tensors."""
    from dira3d.utils.checkpoint import load_checkpoint
    from dira3d.utils.setting_hints import bundle_setting

    try:
        meta = load_checkpoint(pretrained).get("meta") or {}
        ckpt_width = float(meta["width"])
    except (KeyError, TypeError, ValueError, OSError):
        return ""
    if ckpt_width == float(width):
        return ""
    how = bundle_setting({"width": ckpt_width}, f"`dira3d finetune --set width={ckpt_width:g}`, `--width {ckpt_width:g}` "
                         "for monai.bundle run")
    return (f"pretrained weights from {pretrained} were pretrained at width {ckpt_width:g}, but the task network is built "
            f"at width {float(width):g}; set the bundle's width to {ckpt_width:g} ({how})")


def dims_mismatch(pretrained: str | os.PathLike | None, spatial_dims: int) -> str:
    """The error for a checkpoint pretrained in other spatial dimensions than the task network's (its meta
    ``spatial_dims``): a 2D pretraining (``2d.json``, or ``spatial_dims`` 2) given to a 3D bundle, or a 3D one to a 2D
    bundle. '' when they are the same, or the meta records none or cannot be read."""
    from dira3d.networks.pretrained import dims_hint
    from dira3d.utils.checkpoint import load_checkpoint

    try:
        meta = load_checkpoint(pretrained).get("meta") or {}
        ckpt_dims, task_dims = int(meta["spatial_dims"]), int(spatial_dims)
    except (KeyError, TypeError, ValueError, OSError, AttributeError):
        return ""
    if ckpt_dims == task_dims:
        return ""
    return (f"pretrained weights from {pretrained} were pretrained in {ckpt_dims}D (checkpoint meta spatial_dims "
            f"{ckpt_dims}), but the task network is {task_dims}D: {dims_hint(ckpt_dims, task_dims)}")


# what each pretrained network is, and the pretraining that makes it (bundles/dira_pretrain)
PRETRAINED_NETWORKS = {
    "UNet": ("Models Genesis U-Net", "configs/train.json without 2d.json (2D patches: spatial_dims 2, see "
                                       "bundles/dira_pretrain/docs/README.md)"),
    "ResNetUNet": ("ResNet U-Net", "configs/2d.json (train.json + 2d.json, see docs/2d.md)"),
}


def network_mismatch(pretrained: str | os.PathLike | None, network: str, spatial_dims: int) -> str:
    """The error for a checkpoint pretrained with another network than the task network's, ``network`` (a key of
    :data:`PRETRAINED_NETWORKS`) in ``spatial_dims``: a U-Net pretraining (``train.json``, in 2D too with
    ``spatial_dims`` 2) given to a 2D bundle's ResNet, or a ResNet U-Net (``2d.json``) to a bundle built on the U-Net.
    Read from the key names of the checkpoint's encoder; '' when it is the same network, when it has other spatial
    dimensions (the dimension check names that), or when the encoder cannot be read or told."""
    from dira3d.networks.weights_fit import infer_network_settings, network_family
    from dira3d.utils.checkpoint import load_checkpoint

    try:
        encoder = load_checkpoint(pretrained).get("encoder")
        found = network_family(encoder) if isinstance(encoder, Mapping) else ""
        dims = infer_network_settings(encoder).get("spatial_dims", spatial_dims) if found else spatial_dims
    except (OSError, ValueError, TypeError, AttributeError, RuntimeError):
        return ""
    if not found or found == network or network not in PRETRAINED_NETWORKS or dims != spatial_dims:
        return ""
    (is_a, _), (needs, how) = PRETRAINED_NETWORKS[found], PRETRAINED_NETWORKS[network]
    return (f"pretrained weights from {pretrained} are a {is_a}'s (read from its encoder's keys), but the task network "
            f"takes a {needs}'s weights: it needs a checkpoint pretrained with bundles/dira_pretrain {how}")


def checkpoint_mismatch(network_def: Mapping[str, Any], pretrained: str | os.PathLike) -> str:
    """The error the task network of a bundle's ``network_def`` (its arguments, references resolved) would raise for
    the checkpoint ``pretrained`` when it was pretrained with another network: in other spatial dimensions
    (:func:`dims_mismatch`), another kind of network (a U-Net for a ResNet or the reverse, :func:`network_mismatch`),
    at another width (:func:`build_task_network`), with another backbone or decoder_channels
    (:func:`~dira3d.evaluation.build_resnet_task_network`).
    '' when it fits, cannot be read, or the network is built otherwise; read without building the network, so that
    ``dira3d experiment`` refuses such a checkpoint once, before any run."""
    target, kind = str(network_def.get("_target_", "")), network_def.get("kind")
    try:
        if target.endswith(".build_task_network"):
            dims, width = (network_def.get(key, _default(build_task_network, key)) for key in ("spatial_dims", "width"))
            return (dims_mismatch(pretrained, dims) or network_mismatch(pretrained, "UNet", int(dims))
                    or _width_mismatch(pretrained, float(width)))
        if target.endswith(".build_resnet_task_network") and kind in TASK_KINDS:
            from dira3d.evaluation.tasks2d import settings_mismatch, build_resnet_task_network

            backbone, channels = (network_def.get(key, _default(build_resnet_task_network, key))
                                  for key in ("backbone", "decoder_channels"))
            return (dims_mismatch(pretrained, 2) or network_mismatch(pretrained, "ResNetUNet", 2)
                    or settings_mismatch(pretrained, kind, str(backbone), [int(c) for c in channels]))
    except (TypeError, ValueError):  # a value the network itself refuses, naming it
        return ""
    return ""


def _default(function, name: str) -> Any:
    return inspect.signature(function).parameters[name].default


def initialise_task_network(network: torch.nn.Module, kind: str, pretrained: str | os.PathLike | None,
                            in_channels_policy: str, bn_momentum: float | None, random_message: str | None,
                            log: logging.Logger = logger, pretrained_head: str = "load") -> torch.nn.Module:
    """Set the batch-norm momentum of a task network, load its pretrained parts, report the load.

    The shared tail of :func:`build_task_network` and
    :func:`~dira3d.evaluation.build_resnet_task_network`.

    Args:
        network: a task network with the ``encoder`` (/ ``decoder``) sub-modules of ``kind``.
        kind: a key of :data:`TASK_KINDS`; picks the checkpoint parts loaded.
        pretrained: checkpoint path; empty or ``None`` keeps the random initialisation.
        in_channels_policy: see :func:`dira3d.networks.load_pretrained`.
        bn_momentum: momentum of every batch-norm layer (``None``: cumulative average).
        random_message: the report printed when there is no checkpoint (``None``: nothing is printed).
        log: logger that receives the report as well.
        pretrained_head: a key of :data:`PRETRAINED_HEADS` (segmentation): load the checkpoint's decoder output head
            when it fits, or initialise it.

    Returns:
        ``network``, with pretrained weights loaded when asked.

    Raises:
        ValueError: a checkpoint whose keys or shapes do not fit. FileNotFoundError: missing checkpoint.
    """
    from dira3d.engines.distributed import launcher_rank  # imported late, as the loader
    from dira3d.networks import load_pretrained  # sibling module, imported late

    check_pretrained_head(pretrained_head)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = bn_momentum
    if not pretrained:
        if random_message is None:
            return network
        message = random_message
    else:
        check_pretrained_file(pretrained)
        # strict: a checkpoint of another architecture would otherwise load nothing, silently
        # segmentation: the restoration head of a pretraining on N channels (in_channels N: BraTS sequences)
        # restores N, the task head predicts its own classes; another output count is re-learnt, not refused
        report = load_pretrained(network, str(pretrained), parts=TASK_KINDS[kind], strict=True,
                                 in_channels_policy=in_channels_policy,
                                 head_policy=PRETRAINED_HEADS[pretrained_head] if kind == "segmentation" else "error",
                                 option="--pretrained")  # errors name the files to give, not Python parts=(...)
        message = f"pretrained: {pretrained} (parts {', '.join(TASK_KINDS[kind])})\n{report.summary()}"
    # under torchrun by rank 0 alone (every rank printed it: the same report once per process)
    if launcher_rank() != 0:
        return network
    # printed where no console handler shows the logged line (`dira3d finetune`, a plain `monai.bundle run` without a
    # logging file, a notebook); with the bundles' logging.conf, which logs to the console, the logged line alone: the
    # report was there twice, printed and logged
    if not _logged_to_console(log):
        print(message, flush=True)
    log.info(message)
    return network


def _logged_to_console(log: logging.Logger, level: int = logging.INFO) -> bool:
    """Whether a record of ``level`` logged by ``log`` reaches a handler that writes to the console (standard output or
    error; a log file's handler does not count), as the bundles' ``logging.conf`` sets up the root logger."""
    import sys

    if not log.isEnabledFor(level):
        return False
    consoles = {id(stream) for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if stream is not None}
    current: logging.Logger | None = log
    while current is not None:
        for handler in current.handlers:
            if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                    and handler.level <= level and id(getattr(handler, "stream", None)) in consoles):
                return True
        current = current.parent if current.propagate else None
    return False
