"""A fine-tuned bundle's network with its weights, and what to pass when the weights do not fit.

- :func:`bundle_paths` resolves a bundle folder or name to its root, config and ``metadata.json``;
  :func:`bundle_parser` reads that config with overrides checked (MONAI adds an unknown id silently).
- :func:`load_bundle_network` builds the bundle's ``network_def`` and loads ``models/model.pt``; when
  the weights do not fit, :func:`fit_hint` names the settings that do (``dira3d export``, the MONAI
  Label app's checks).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from dira3d.deploy.export_checks import (  # light; bundle_paths, missing_weights_error re-exported here
    bundle_paths,
    check_meta_overrides,
    missing_weights_error,
    split_meta_overrides,
)
from dira3d.utils import load_checkpoint
from dira3d.utils.overrides import check_overrides

__all__ = ["bundle_paths", "bundle_parser", "fit_hint", "load_bundle_network", "missing_weights_error"]


def bundle_parser(bundle_dir: str | os.PathLike, config_file: str, overrides: Mapping[str, Any] | None,
                  ckpt_dir: str | os.PathLike | None = None) -> ConfigParser:
    """The bundle's ``configs/<config_file>`` with its ``metadata.json``, ``bundle_root`` set and ``overrides`` applied
    (``_meta_#...`` ids set fields of ``metadata.json``, as ``python -m monai.bundle`` takes them).

    ``ckpt_dir``: the folder of the weights given (``--checkpoint``), set as the config's ``ckpt_dir`` unless an
    override sets it: the settings the config reads from the training run's files there (``preprocessing.json``:
    ``brats_tumor_seg``'s ``modalities``, hence its ``in_channels``) are those of the model, not of whatever the
    bundle's own ``models/`` holds.

    Raises:
        FileNotFoundError: no such bundle (see :func:`bundle_paths`).
        ValueError: an override id ``config_file`` (or, for ``_meta_#...``, ``metadata.json``) does not define (with
            the closest one).
    """
    root, config, meta = bundle_paths(bundle_dir, config_file)
    settings, fields = split_meta_overrides(overrides)
    # MONAI adds an unknown id silently: a typo (widht=0.125) would build the default network
    check_overrides([config], settings, where="--override (overrides=)")
    check_meta_overrides(meta, fields)
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(meta))
    parser["bundle_root"] = str(root)
    if ckpt_dir is not None and "ckpt_dir" in parser and "ckpt_dir" not in settings:
        parser["ckpt_dir"] = str(ckpt_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


# config ids that decide the shape of a bundle's network (2D: ResNet depth and decoder; 3D: width),
# plus roi_size, which sets the example input of an export and the image size of the 2D bundles
_NETWORK_SETTINGS_2D = ("backbone", "decoder_channels", "in_channels", "roi_size")
_NETWORK_SETTINGS_3D = ("width", "in_channels", "roi_size")


def _config_value(parser: ConfigParser, key: str) -> Any:
    try:
        return parser.get_parsed_content(key) if key in parser else None
    except Exception:  # an expression that does not resolve on its own: not worth a second error
        return None


def fit_hint(state: Mapping[str, Any], parser: ConfigParser, root: Path, network: torch.nn.Module | None = None,
             option: Callable[[Mapping[str, Any]], str] | None = None) -> str:
    """Which config overrides make ``state`` fit the bundle's network, as a sentence for an error.

    The settings that matter are named (2D: backbone / decoder_channels / roi_size, no decoder_channels for
    classification weights, which have no ``decoder.`` keys; 3D: width); the
    values that fit are read from the state_dict's keys and shapes; when they are those of the
    bundle's ``tiny.json`` (a ``dira3d finetune --tiny`` model) its ``roi_size`` is added. ``option`` writes
    settings as the caller takes them (default ``--override id=value ...`` of ``dira3d export``; the MONAI
    Label app passes its ``--conf bundle_overrides`` JSON).
    """
    from dira3d.evaluation.finetune import tiny_settings
    from dira3d.networks.weights_fit import format_overrides, infer_network_settings, same_value, settings_that_fit

    two_d = "backbone" in parser
    names = _NETWORK_SETTINGS_2D if two_d else _NETWORK_SETTINGS_3D
    classifier = two_d and not any(str(k).startswith("decoder.") for k in state)
    if classifier:  # a classification network has no decoder: its settings are not the user's to pass
        names = tuple(k for k in names if k != "decoder_channels")
    current = {k: _config_value(parser, k) for k in names if k in parser}
    current = {k: v for k, v in current.items() if v is not None}
    inferred = infer_network_settings(state)
    network_dims = 2 if two_d else _config_value(parser, "spatial_dims") or 3
    if isinstance(inferred.get("spatial_dims"), int) and inferred["spatial_dims"] != network_dims:
        return (f"the weights are of a {inferred['spatial_dims']}D network and {root.name} builds a {network_dims}D one: "
                "use the weights fine-tuned with this bundle")
    if network is not None:
        kinds = ["segmentation" if any(k.startswith("decoder.") for k in keys) else "classification"
                 for keys in (state, network.state_dict())]
        if kinds[0] != kinds[1]:
            return (f"the weights are of a {kinds[0]} network and {root.name} builds a {kinds[1]} one: "
                    "use the weights fine-tuned with this bundle")
    fits = settings_that_fit(state, current)
    tiny = tiny_settings(root, names)
    from_tiny = bool(fits) and all(k in tiny and same_value(tiny[k], fits[k]) for k in fits)
    if from_tiny:  # a --tiny model: roi_size cannot be read from weights, tiny.json has it
        fits = {**fits, **{k: v for k, v in tiny.items() if k not in fits and not same_value(current.get(k), v)}}
    outputs, classes, names_too = _config_value(parser, "out_channels"), "", ""
    if classifier and isinstance(inferred.get("out"), int) and isinstance(outputs, int) and inferred["out"] != outputs:
        # a classifier fine-tuned with --set out_channels=14 (CheXpert's 14 labels): its names must come along
        fits = {**fits, "out_channels": inferred["out"]}
        classes = f" ({inferred['out']} outputs, {root.name} has {outputs})"
        names_too = (", with class_names, one name per output in the order of the training datalist's meta.labels"
                     if "class_names" in parser else "")
    settings = " / ".join(k for k in names if k != "in_channels")
    example = {"backbone": "resnet10", "decoder_channels": [16, 16, 8, 8, 8], "roi_size": [64, 64]} if two_d \
        else {"width": 0.125}
    example = {k: v for k, v in example.items() if k in names}
    if not fits:
        return (f"pass the settings the weights were trained with ({settings}; e.g. "
                f"{(option or format_overrides)(example)} for a model fine-tuned with --tiny)")
    origin = f" (those of {root.name}'s tiny.json: a model fine-tuned with --tiny)" if from_tiny else ""
    text = option(fits) if option else f"{format_overrides(fits)} (overrides={dict(fits)})"
    return f"the weights fit other settings{origin}{classes}: pass {text}{names_too}"


def load_bundle_network(
    bundle_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    config_file: str = "inference.json",
    overrides: Mapping[str, Any] | None = None,
    hint_option: Callable[[Mapping[str, Any]], str] | None = None,
) -> torch.nn.Module:
    """Build the bundle's ``network_def`` and load its fine-tuned weights (eval mode, CPU).

    Args:
        bundle_dir: the bundle folder (``configs/``, ``models/``), or a bundle name (``luna16_nodule_fpr``).
        checkpoint: weights to load; default ``<bundle>/models/model.pt`` (a plain state_dict, or
            one under ``"model"`` / ``"network"``).
        config_file: the config that defines ``network_def``.
        overrides: config ids to override, e.g. ``{"width": 0.125}``.
        hint_option: how the error writes the overrides that fit (see :func:`fit_hint`).

    Returns:
        the network with the weights loaded, in eval mode.

    Raises:
        FileNotFoundError: the bundle configs or the checkpoint are missing (or no bundle has that name).
        ValueError: the checkpoint does not fit the network: counts and the first keys, and the
            overrides that fit (2D: backbone / decoder_channels / roi_size; 3D: width).
            Also an override id that ``config_file`` does not define (with the closest one).
    """
    from dira3d.networks.weights_fit import mismatch_summary, state_dict_mismatch

    root, _, _ = bundle_paths(bundle_dir, config_file)
    path = Path(checkpoint) if checkpoint else root / "models" / "model.pt"
    # the checkpoint's folder is the config's ckpt_dir: a brats_tumor_seg model's modalities (its in_channels) are
    # read from the preprocessing.json beside its weights
    parser = bundle_parser(root, config_file, overrides, ckpt_dir=path.parent)
    network = parser.get_parsed_content("network_def", instantiate=True)
    if not path.is_file():
        raise missing_weights_error(path)
    state = load_checkpoint(path)
    for wrapper in ("model", "network", "state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if isinstance(state.get("encoder"), Mapping):  # {"encoder": sd, "decoder": sd, "meta": ...}: was called a classifier
        parts = " and ".join(repr(k) for k in ("encoder", "decoder") if isinstance(state.get(k), Mapping))
        raise ValueError(f"{path} is a dira3d pretraining checkpoint (weights under {parts}), not a model fine-tuned "
                         f"with {root.name}: "
                         f"fine-tune it first (`dira3d finetune --bundle {root.name} --pretrained {path}`) and give that "
                         "run's models/model.pt; `dira3d export pretrained` exports the pretrained weights themselves")
    missing, unexpected, mismatched = state_dict_mismatch(state, network)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not fit the network of {root} (config overrides {dict(overrides or {})}): "
            f"{mismatch_summary(missing, unexpected, mismatched)}.\n{fit_hint(state, parser, root, network, hint_option)}"
        )
    network.load_state_dict(state)
    return network.eval()
