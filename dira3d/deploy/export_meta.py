"""The configs a TorchScript export embeds (``dira3d export torchscript``), describing the model exported.

- :func:`exported_meta_overrides`: ``_meta_#...`` values that make the embedded ``metadata.json``'s
  ``network_data_format`` say what the network exported takes and emits: ``inputs.image`` its ``in_channels`` and
  sequences, ``inputs.image`` / ``outputs.pred`` its ``roi_size``, ``outputs`` its ``out_channels`` and
  ``class_names``, when the overrides change them.
- :func:`trained_values`: the config's settings that read files of the training run (``preprocessing.json`` beside the
  weights: ``pixdim``, ``hu_window``, ``modality``, ``percentiles``, ``modalities``, ``prepared_size``), resolved to
  values, so that the embedded ``inference.json`` preprocesses as the model was trained wherever it is copied.
- :func:`embedded_config`: the config with the overrides and those values applied, as the file ``ckpt_export`` embeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from dira3d.deploy.export_checks import split_meta_overrides

__all__ = ["TRAINED_EXPRESSION", "embedded_config", "exported_meta_overrides", "trained_values"]

IMAGE_META = "_meta_#network_data_format#inputs#image"
# the expressions of the bundles' inference.json that read <ckpt_dir>/preprocessing.json (dira3d.evaluation.preprocessing)
TRAINED_EXPRESSION = "dira3d.evaluation.trained_"


def _parsed(parser: ConfigParser, key: str) -> Any:
    try:
        return parser.get_parsed_content(key) if key in parser else None
    except Exception:  # an expression of the user's that does not resolve here: not described
        return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def exported_meta_overrides(parser: ConfigParser, bundle_config: Mapping[str, Any]) -> dict[str, Any]:
    """``_meta_`` overrides (``ckpt_export`` applies them to the embedded ``metadata.json``) that make its
    ``network_data_format`` describe the network exported (``parser``: the config with the export's overrides and the
    bundle's metadata; ``bundle_config``: the bundle's config as written, before the overrides):

    - ``inputs.image``: ``num_channels`` its ``in_channels``, ``channel_def`` the sequences a bundle's ``modalities``
      names in channel order (``brats_tumor_seg``), else, when its count no longer fits, ``channel <i>`` (a 4-channel
      BraTS model embedded the bundle's metadata of one FLAIR channel);
    - ``inputs.image`` and ``outputs.pred``: a ``spatial_shape`` that is the bundle's ``roi_size`` follows an
      overridden ``roi_size`` (a ``--tiny`` export, 16x16x8, said 64x64x32);
    - ``outputs.pred`` and ``post_processed_outputs.pred``: an overridden ``out_channels`` / ``class_names`` (a CheXpert
      model of 14 labels) gives ``num_channels`` and ``channel_def`` (the names, else ``output <i>``).

    Nothing where the config does not say; an override the user gave for the same field wins (the caller applies
    the user's after these).
    """
    from dira3d.evaluation.transforms import modality_channels

    wanted: dict[str, Any] = {}
    image, channels = parser.get(IMAGE_META, None), _count(_parsed(parser, "in_channels"))
    if isinstance(image, dict) and channels is not None:
        try:
            names = modality_channels(_parsed(parser, "modalities")) if _parsed(parser, "modalities") else []
        except ValueError:  # an unknown sequence: the network build refuses it by name
            names = []
        defined = image.get("channel_def")
        if len(names) == channels:
            defined = {str(i): name for i, name in enumerate(names)}
        elif isinstance(defined, dict) and len(defined) != channels:
            defined = {str(i): f"channel {i}" for i in range(channels)}
        wanted.update({f"{IMAGE_META}#num_channels": channels, f"{IMAGE_META}#channel_def": defined})
    roi, bundle_roi = _parsed(parser, "roi_size"), bundle_config.get("roi_size")
    if isinstance(roi, (list, tuple)) and isinstance(bundle_roi, list) and list(roi) != bundle_roi:
        for section in (IMAGE_META, "_meta_#network_data_format#outputs#pred"):
            if parser.get(f"{section}#spatial_shape", None) == bundle_roi:
                wanted[f"{section}#spatial_shape"] = [int(s) for s in roi]
    outputs, classes = _count(_parsed(parser, "out_channels")), _parsed(parser, "class_names")
    changed = any(key in parser and parser.get(key) != bundle_config.get(key) for key in ("out_channels", "class_names"))
    if changed and outputs is not None:
        for section in ("outputs", "post_processed_outputs"):
            key = f"_meta_#network_data_format#{section}#pred"
            described = parser.get(key, None)
            if not isinstance(described, dict):
                continue
            wanted[f"{key}#num_channels"] = outputs
            if isinstance(classes, (list, tuple)) and len(classes) == outputs:
                wanted[f"{key}#channel_def"] = {str(i): str(name) for i, name in enumerate(classes)}
            elif isinstance(described.get("channel_def"), dict) and len(described["channel_def"]) != outputs:
                wanted[f"{key}#channel_def"] = {str(i): f"output {i}" for i in range(outputs)}
    return {key: value for key, value in wanted.items() if value is not None and value != parser.get(key, None)}


def trained_values(parser: ConfigParser) -> dict[str, Any]:
    """The config's top-level settings whose expression reads the training run's files (:data:`TRAINED_EXPRESSION`:
    ``$dira3d.evaluation.trained_spacing(@ckpt_dir)``, ``trained_preprocessing(@ckpt_dir, 'window', ...)``), resolved
    with ``parser`` (its ``ckpt_dir`` the folder of the weights exported). A setting an override gave a value keeps it.

    Raises:
        ValueError: the run's ``preprocessing.json`` is garbled or holds a bad value (``DataError``, naming it).
    """
    values: dict[str, Any] = {}
    for key, raw in parser.get().items():
        if key != "_meta_" and isinstance(raw, str) and raw.startswith("$") and TRAINED_EXPRESSION in raw:
            values[key] = parser.get_parsed_content(key)
    return values


def embedded_config(config: Path, overrides: Mapping[str, Any] | None, folder: Path,
                    resolved: Mapping[str, Any] | None = None) -> Path:
    """``config`` with ``overrides`` and ``resolved`` (:func:`trained_values`) applied, written as ``folder/<config's
    name>`` (``config`` itself when there are none): ``ckpt_export`` embeds the file it is given, under its name without
    suffix plus ``.json`` (``inference.json``), so the TorchScript file holds the settings the network was exported with
    (it held the unmodified config: a ``--tiny`` export said width 1.0) and the preprocessing it was trained with (it
    held ``$dira3d.evaluation.trained_spacing(@ckpt_dir)``, which, run without the training run's
    ``preprocessing.json``, fell back to the defaults without a word). ``_meta_#...`` overrides go to the embedded
    ``metadata.json`` (``ckpt_export`` applies them) and are left out here.

    Raises:
        ValueError: an override value that JSON cannot hold (an object given through the Python API).
    """
    settings, _ = split_meta_overrides(overrides)
    changes = {**settings, **dict(resolved or {})}
    if not changes:
        return config
    parser = ConfigParser()
    parser.read_config(str(config))
    for key, value in changes.items():
        parser[key] = value
    content = {k: v for k, v in parser.get().items() if k != "_meta_"}
    try:
        text = json.dumps(content, indent=4)  # ASCII, as the bundles' configs are
    except TypeError as err:
        raise ValueError(f"an override value cannot be embedded in the TorchScript file's {config.name} (JSON: {err}); "
                         "give numbers, text, lists or mappings") from None
    merged = folder / config.name
    merged.write_text(text + "\n", encoding="ascii")
    return merged
