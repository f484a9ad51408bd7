"""The refusals of ``dira3d export`` that need neither torch nor MONAI, so that they come at once.

- :func:`check_model_export`: ``torchscript`` / ``onnx`` — an unknown bundle (:func:`bundle_paths`), an ``--out`` that
  is a folder or exists (without ``--overwrite``) or cannot be written (:func:`check_new_output`), a missing
  ``--check-scan`` (:func:`check_scan_exists`) or missing fine-tuned weights (:func:`missing_weights_error`), an
  ``--input-shape`` the bundle's network cannot take (:func:`check_input_shape`, with the bundle's
  :func:`network_divisor`; its config read as JSON).
- :func:`check_pretrained_export`: ``pretrained`` — an unknown format, a missing ``--checkpoint``, an ``--out`` that is a
  file or holds an earlier export (without ``--overwrite``).

:mod:`dira3d.deploy.export`, :mod:`dira3d.deploy.bundle_network` and :mod:`dira3d.deploy.weights` run the same checks
(and re-export these names); ``dira3d export`` runs them before it imports those modules (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dira3d.utils.atomic import check_writable
from dira3d.utils.checkpoint import check_checkpoint_file, checkpoint_problem

__all__ = ["FORMATS", "META_PREFIX", "bundle_paths", "check_input_shape", "check_meta_overrides", "check_model_export",
           "check_new_output", "check_pretrained_export", "check_scan_exists", "missing_weights_error", "network_divisor",
           "split_meta_overrides"]

FORMATS = ("pt", "safetensors")  # the file formats of `dira3d export pretrained`
META_PREFIX = "_meta_#"  # an override of a field of metadata.json (``_meta_#version``), as monai.bundle takes it


def bundle_paths(bundle_dir: str | os.PathLike, config_file: str) -> tuple[Path, Path, Path]:
    """``(root, config, metadata)`` of a bundle given as a folder or as a name (``luna16_nodule_fpr``),
    resolved as ``dira3d finetune --bundle`` resolves it (:func:`dira3d.evaluation.finetune.bundle_path`)."""
    from dira3d.evaluation.finetune import bundle_path  # light module; one resolution rule for every command

    root = bundle_path(bundle_dir, config_file)  # FileNotFoundError naming the valid bundle names
    config = root / "configs" / config_file
    meta = root / "configs" / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} does not exist: is {root} a dira3d bundle (configs/{config_file}, configs/metadata.json)?")
    return root, config, meta


def missing_weights_error(path: Path) -> FileNotFoundError:
    """The error for fine-tuned weights ``path`` that do not exist, saying how to give them (``--checkpoint``)."""
    problem = "do not exist" if not os.path.isdir(path) else checkpoint_problem(path)
    return FileNotFoundError(f"fine-tuned weights {path} {problem}; pass the model to export with --checkpoint "
                             "(`dira3d finetune --output-dir D` writes D/models/model.pt)")


def split_meta_overrides(overrides: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``overrides`` as ``(config overrides, metadata overrides)``: the ids that start with ``_meta_`` (``_meta_#version``)
    set fields of ``metadata.json``, the others settings of the config."""
    config: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        (meta if str(key).startswith("_meta_") else config)[key] = value
    return config, meta


def check_meta_overrides(meta: Path, overrides: Mapping[str, Any], where: str = "--override (overrides=)") -> None:
    """Refuse ``_meta_#a#b`` ids (the metadata overrides of ``overrides``; others are left to the config's check) that
    name no field of ``meta`` (``metadata.json``), with the closest field: MONAI adds a misspelt one without a word, so
    ``_meta_#verison=0.2.0`` would leave the version as it was. ``_meta_`` alone (the whole metadata) is refused too.

    Raises:
        ValueError: one line naming the override, the file and what to give.
    """
    from dira3d.utils.files import read_json
    from dira3d.utils.overrides import did_you_mean

    keys = [str(k) for k in overrides if str(k).startswith("_meta_")]
    if not keys:
        return
    content = read_json(meta, "bundle metadata", "fix it there (one JSON object)", unique_keys=False)
    for key in keys:
        if not key.startswith(META_PREFIX) or key == META_PREFIX:
            raise ValueError(f"{where}: {key!r} does not name a field of {meta.name}; set one field at a time, e.g. "
                             f"{META_PREFIX}version=0.2.0 or {META_PREFIX}network_data_format#inputs#image#modality=MR")
        node: Any = content
        parts = key[len(META_PREFIX):].split("#")
        for depth, part in enumerate(parts):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                field = "#".join(parts[:depth + 1])
                known = [f"{'#'.join(parts[:depth] + [k])}" for k in node] if isinstance(node, dict) else []
                raise ValueError(f"{where}: {key}: {meta} has no field {did_you_mean([field], known)} (MONAI would add "
                                 "it without a word, leaving the field meant as it was); fix the id, or add the field "
                                 "to a copy of the bundle's metadata.json and export that bundle")


def check_new_output(out: Path, overwrite: bool, what: str = "--out folder") -> None:
    """Refuse to replace an earlier export unless asked to (``--overwrite``), and a folder ``out`` cannot be
    written to (before the network is built and traced; ``what`` names it in the error).

    Raises:
        FileExistsError: ``out`` is a folder, or exists (without ``overwrite``).
        FolderNotWritableError: its folder cannot be created or written to.
    """
    if out.is_dir():
        raise FileExistsError(f"--out {out} is a folder; give the file to write, e.g. {out / 'model.ts'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (an earlier export); choose another --out, or pass --overwrite "
                              "(overwrite=True) to replace it")
    check_writable(out.parent, what=what, advice="pass --out with a file in a writable folder")


def check_scan_exists(check_scan: str | os.PathLike | None) -> None:
    """Refuse a ``--check-scan`` (``check_scan=``) that does not exist before the network is built; it is read last.

    Raises:
        FileNotFoundError: ``check_scan`` is given and is not a file.
    """
    if check_scan is not None and not Path(check_scan).is_file():
        raise FileNotFoundError(f"--check-scan {check_scan} does not exist (or is not a file); give a CT scan "
                                "(NRRD, NIfTI, MetaImage), or leave it out to check on a random input")


# the size check a task bundle's initialize runs on its roi_size: dira3d.utils.check_sizes(3, multiple=8, roi_size=...)
_SIZE_CHECK = re.compile(r"check_sizes\(\s*[^,()]+,\s*multiple\s*=\s*(\d+|@[\w#]+)\s*,\s*roi_size\s*=")


def network_divisor(config: Mapping[str, Any]) -> int | None:
    """What every spatial size of a bundle network's input must be a multiple of (its downsampling: 8 for the 3D
    U-Net, 32 for the 2D ResNets), as the bundle says it: its ``network_divisor`` id (``dira_pretrain``), or the
    ``multiple`` of the ``dira3d.utils.check_sizes(..., roi_size=@roi_size)`` its ``initialize`` runs (the task
    bundles); None when ``config`` (a config as read from JSON) has neither."""
    value: Any = config.get("network_divisor")
    if value is None:
        steps = config.get("initialize")
        found = [m for step in steps if isinstance(step, str) for m in _SIZE_CHECK.findall(step)] \
            if isinstance(steps, list) else []
        value = found[0] if found else None
        if isinstance(value, str) and value.startswith("@"):
            value = config.get(value[1:])
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _shape_text(shape: Sequence[int]) -> str:
    return " ".join(map(str, shape))


def check_input_shape(input_shape: Sequence[int], roi_size: Sequence[int] | None, in_channels: int | None = None,
                      multiple: int | None = None) -> list[int]:
    """``--input-shape`` (``input_shape=``) ``B C *sizes`` checked against a bundle's network: ``len(roi_size)``
    sizes, a batch >= 1, ``in_channels`` channels and sizes >= 1 that are multiples of ``multiple`` (the network's
    downsampling, :func:`network_divisor`); each check is skipped when what it needs is None (``roi_size`` too).

    Returns:
        the shape as a list of ints.

    Raises:
        ValueError: one line naming ``--input-shape``, the number that does not fit and a shape that does.
    """
    shape = [int(s) for s in input_shape]
    given = f"--input-shape (input_shape) {_shape_text(shape)}"
    count = f"{len(shape)} number{'' if len(shape) == 1 else 's'}"
    channels = in_channels if in_channels is not None else (shape[1] if len(shape) > 1 and shape[1] >= 1 else 1)
    if roi_size is not None:
        example = _shape_text([1, channels, *roi_size])
        if len(shape) != 2 + len(roi_size):  # was PyTorch's "expected 5D input (got 4D input)"
            raise ValueError(f"{given} has {count}; the bundle's network is {len(roi_size)}D: give B C "
                             f"and {len(roi_size)} sizes, e.g. {example}")
    else:
        example = _shape_text([1, channels, *(s if s >= 1 else 1 for s in shape[2:])])
    if len(shape) < 3:
        raise ValueError(f"{given} has {count}; give B C and one size per axis, e.g. 1 1 64 64 32")
    if shape[0] < 1:  # batch 0 failed in the agreement check ("max(): Expected reduction dim"), -1 in torch.rand
        raise ValueError(f"{given}: batch {shape[0]} is not a batch size >= 1; give e.g. {example}")
    if in_channels is not None and shape[1] != in_channels:  # was a convolution's "expected input ... to have 1 channels"
        raise ValueError(f"{given}: {shape[1]} channels, but the bundle's network takes {in_channels} (in_channels); "
                         f"give e.g. {example}")
    if shape[1] < 1:
        raise ValueError(f"{given}: {shape[1]} channels is not a channel count >= 1; give e.g. {example}")
    sizes = shape[2:]
    bad = next((s for s in sizes if s < 1), None)
    if bad is not None:
        raise ValueError(f"{given}: size {bad} is not a size >= 1; give e.g. {example}")
    if multiple and any(s % multiple for s in sizes):  # was a decoder's "Sizes of tensors must match" (2D) or worse
        from dira3d.utils.seeding import nearest_fitting_sizes  # light: numpy, no torch

        bad = next(s for s in sizes if s % multiple)
        nearest = " or ".join(_shape_text(shape[:2] + s) for s in nearest_fitting_sizes(sizes, multiple))
        raise ValueError(f"{given}: size {bad} is not a multiple of {multiple} (the network's downsampling); give e.g. "
                         f"{nearest} (the nearest sizes that fit)")
    return shape


def _check_input_shape_in(config: Path, input_shape: Sequence[int], overrides: Mapping[str, Any] | None) -> None:
    """:func:`check_input_shape` with what ``config`` says as JSON (before MONAI parses it): ``roi_size`` and
    ``in_channels`` (``overrides`` first) when they are plain values, and :func:`network_divisor`. A config JSON
    cannot read, or an expression, leaves the check to the export (which parses the config)."""
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(content, dict):
        return
    settings = {**content, **dict(overrides or {})}
    roi, channels = settings.get("roi_size"), settings.get("in_channels")
    if not (isinstance(roi, list) and roi and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in roi)):
        return  # an expression, or a roi_size the export refuses in its own words
    if isinstance(channels, bool) or not isinstance(channels, int):
        channels = None  # an expression (brats_tumor_seg: one channel per modality), checked once it is parsed
    check_input_shape(input_shape, roi, channels, network_divisor(settings))


def check_model_export(bundle_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                       checkpoint: str | os.PathLike | None = None, overwrite: bool = False,
                       check_scan: str | os.PathLike | None = None,
                       config_file: str = "inference.json", input_shape: Sequence[int] | None = None,
                       overrides: Mapping[str, Any] | None = None) -> tuple[Path, Path, Path, Path, Path]:
    """The refusals of a TorchScript / ONNX export, in order, before the network is built: the bundle, ``out``
    (default ``<bundle>/models/model.ts``), ``check_scan``, the weights (default ``<bundle>/models/model.pt``) and
    ``input_shape`` (:func:`check_input_shape`, with the config's ``roi_size``, ``in_channels`` and
    :func:`network_divisor`, ``overrides`` applied).

    Returns:
        ``(root, config, metadata, out, checkpoint)`` as paths.

    Raises:
        FileNotFoundError: no such bundle, a missing ``check_scan`` or weights file.
        FileExistsError: ``out`` is a folder, or exists (without ``overwrite``).
        FolderNotWritableError: ``out``'s folder cannot be created or written to.
        ValueError: an ``input_shape`` the network cannot take; a ``_meta_#...`` override naming no field of
            ``metadata.json`` (:func:`check_meta_overrides`).
    """
    root, config, meta = bundle_paths(bundle_dir, config_file)
    # the default is inside the bundle, which may be read-only (installed by an admin, in a container image)
    what = "--out folder" if out else "the bundle's models folder (the default --out)"
    out = Path(out) if out else root / "models" / "model.ts"
    check_new_output(out, overwrite, what=what)
    check_scan_exists(check_scan)
    ckpt = Path(checkpoint) if checkpoint else root / "models" / "model.pt"
    if not ckpt.is_file():
        raise missing_weights_error(ckpt)
    check_meta_overrides(meta, overrides or {})
    if input_shape:
        _check_input_shape_in(config, input_shape, overrides)
    return root, config, meta, out, ckpt


def check_pretrained_export(checkpoint: str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike,
                            parts: Sequence[str], formats: Sequence[str] = FORMATS, given_by: str = "checkpoint=",
                            overwrite: bool = False) -> list[Path]:
    """The refusals of :func:`dira3d.deploy.weights.export_pretrained` before the checkpoint is read: an unknown
    format, a missing checkpoint file (``checkpoint`` given as a path), an ``out_dir`` that is a file or holds files
    this export would replace (without ``overwrite``).

    Returns:
        the files the export writes (each part in each format, then ``key_map.json``).

    Raises:
        ValueError: an unknown format, or none.
        FileNotFoundError: the checkpoint file does not exist.
        FileExistsError: ``out_dir`` is a file, or holds files of an earlier export (without ``overwrite``).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats={list(formats)!r}: use one or both of {FORMATS}")
    if isinstance(checkpoint, (str, os.PathLike)):
        check_checkpoint_file(checkpoint, given_by=given_by)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder for the exported weights")
    targets = [out / f"{part}.{fmt}" for part in parts for fmt in formats] + [out / "key_map.json"]
    earlier = [p.name for p in targets if p.exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(earlier)} of an earlier export, which this one would replace; "
                              "choose another folder, or pass --overwrite (overwrite=True) to replace them")
    return targets
