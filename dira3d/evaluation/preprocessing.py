"""The intensity preparation a fine-tuned model was trained on, kept beside its weights.

``dira3d prepare`` records in the datalist's ``meta`` how it scaled the volumes: ``modality``
(``ct`` or ``mr``), the HU ``window`` (CT) or the ``percentiles`` (MR), and for BraTS the sequences
the images hold in channel order (``channels``). A model fine-tuned on them expects a raw scan at
inference to be scaled and laid out the same way. ``dira3d finetune`` copies those settings to
``<ckpt_dir>/preprocessing.json`` next to ``model.pt`` (:func:`training_preprocessing`,
:func:`write_preprocessing`), with the sequences the network was given (the bundle's ``modalities``,
``brats_tumor_seg``). ``inference.json`` of ``lits_liver_seg`` reads its ``modality``, ``hu_window``
and ``percentiles`` defaults from there, and that of ``brats_tumor_seg`` its ``percentiles``,
``modalities`` and ``image_channels`` (:func:`trained_preprocessing`), so a model fine-tuned on MRI
(``prepare generic --modality mr``), on a soft-tissue window (``--window -100 400``), on BraTS data
prepared with ``--percentiles 1 99`` or ``--modalities flair t1`` is fed raw scans as it was trained.
For the 2D chest X-ray datasets the datalist's ``meta.size`` (``dira3d prepare <dataset> --size``) is kept as
``prepared_size``, which the 2D bundles' ``inference.json`` reads, so a model trained on PNGs prepared at 256 is
given a raw radiograph resized through 256 as its training images were, not through the default 512.
For the 3D datasets the voxel size the volumes were resampled to (``meta.spacing``, ``dira3d prepare --spacing``;
null when they kept their own) is kept as ``spacing``, and ``inference.json`` of the 3D segmentation bundles takes its
``pixdim`` default from it (:func:`trained_spacing`): a raw scan is resampled to the training voxel size, as
nnU-Net does, and the prediction is written back on the scan's own grid.
A value given on the command line (``--modality ct``, ``--pixdim 0``) wins.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from dira3d.data.datalist import datalist_meta
from dira3d.data.errors import DataError
from dira3d.utils.atomic import atomic_write_text
from dira3d.utils.files import read_json

__all__ = ["PREPROCESSING_FILE", "datalist_preprocessing", "prepared_spacing", "trained_preprocessing", "trained_spacing",
           "training_preprocessing", "write_preprocessing"]

logger = logging.getLogger(__name__)

PREPROCESSING_FILE = "preprocessing.json"
# datalist meta keys that say how intensities were scaled and (BraTS) which sequences the channels hold
_DATALIST_KEYS = ("modality", "window", "percentiles", "channels")
# ... and the bundle setting that says which sequences the network was given, in its channel order; and the side
# the 2D PNGs were stored at (meta "size" of the 2D preparations), the 2D bundles' prepared_size
_KEYS = (*_DATALIST_KEYS, "modalities", "prepared_size", "spacing")
NATIVE_PIXDIM = [0.0, 0.0, 0.0]  # Spacingd: a zero keeps the scan's own voxel size along that axis
# the inference.json setting each key is the default of (what to pass instead of a bad file)
_SETTINGS = {"modality": "--modality", "window": "--hu_window", "percentiles": "--percentiles", "channels": "--image_channels",
             "modalities": "--modalities", "prepared_size": "--prepared_size", "spacing": "--pixdim"}
_REDO = "fine-tune again to write it, or fix it, or delete it and pass {} on the command line"


def prepared_spacing(value: Any) -> list[float] | None:
    """A datalist's ``meta.spacing`` as three voxel sizes in mm (one number = isotropic, as ``prepare lidc --spacing``
    writes it); None for null (the volumes kept their own) or anything that is not one or three positive numbers."""
    values = [value] if isinstance(value, (int, float)) else value
    if not isinstance(values, list) or len(values) not in (1, 3):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values):
        return None
    return [float(v) for v in values] * (3 // len(values))


def datalist_preprocessing(datalist: str | os.PathLike | None) -> dict[str, Any]:
    """``modality`` / ``window`` / ``percentiles`` / ``channels`` of a prepared datalist's ``meta`` (those
    it records, without nulls), ``prepared_size``, its ``size`` (the 2D preparations' ``--size``, a whole
    number; 0 = native size), and ``spacing``, the voxel size the 3D volumes were resampled to
    (:func:`prepared_spacing`; null when the meta records a null spacing: the volumes kept their own);
    empty for a datalist without them (or none)."""
    meta = datalist_meta(datalist)  # lenient: the datalist reader reports a broken file with its own message
    settings = {key: meta[key] for key in _DATALIST_KEYS if meta.get(key) is not None}
    if "spacing" in meta and (meta["spacing"] is None or prepared_spacing(meta["spacing"])):
        settings["spacing"] = prepared_spacing(meta["spacing"])
    size = meta.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        settings["prepared_size"] = size
    return settings


def training_preprocessing(datalist: str | os.PathLike | None, modalities: Any = None,
                           image_channels: Any = None) -> dict[str, Any]:
    """What a fine-tuning run gave its network, for ``preprocessing.json``: :func:`datalist_preprocessing`,
    plus, for ``brats_tumor_seg``, its ``modalities`` setting (the sequences the network sees, in order) and
    its ``image_channels`` setting (the sequences the images held; it wins over the datalist's ``channels``).

    Raises:
        ValueError: an unknown sequence name (see ``dira3d.evaluation.transforms.modality_channels``).
    """
    from dira3d.evaluation.transforms import modality_channels

    settings = datalist_preprocessing(datalist)
    if image_channels:
        settings["channels"] = modality_channels(list(image_channels))
    if modalities is not None:
        settings["modalities"] = modality_channels(modalities)
    return settings


def write_preprocessing(ckpt_dir: str | os.PathLike, settings: dict[str, Any]) -> Path | None:
    """Write ``settings`` (see :func:`training_preprocessing`) to ``<ckpt_dir>/preprocessing.json``
    atomically; nothing when there are none. Returns the file written."""
    if not settings:
        return None
    path = Path(ckpt_dir) / PREPROCESSING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=2))
    return path


def trained_preprocessing(ckpt_dir: str | os.PathLike, key: str, default: Any) -> Any:
    """The ``key`` (``modality``, ``window``, ``percentiles``, ``channels``, ``modalities``, ``prepared_size`` or ``spacing``) the model in
    ``ckpt_dir`` was trained with, read from ``<ckpt_dir>/preprocessing.json``; ``default`` when the file or the key is absent
    (a model trained before dira3d recorded it, or on a datalist that does not say).

    Raises:
        DataError: (a ``ValueError``) the file exists but is not a JSON object, or its ``key`` is not of the form that
            setting takes (``spacing`` a string, ``percentiles`` not two numbers, ...); it names the file, the key and
            what to do, and under ``python -m monai.bundle run`` ends the run in one ``error:`` line
            (:mod:`dira3d.utils.bundle_errors`).
    """
    if key not in _KEYS:
        raise ValueError(f"unknown preprocessing key {key!r}; one of {_KEYS}")
    path = Path(ckpt_dir) / PREPROCESSING_FILE
    if not path.is_file():
        return default
    fix = _REDO.format(f"the settings it recorded (those of {', '.join(_SETTINGS.values())} that the bundle takes)")
    try:  # garbled, empty, not UTF-8, not a JSON object: one FileContentError (a DataError) naming it
        settings = read_json(path, "the model's preprocessing record", fix)
    except OSError as err:
        raise DataError(path, f"cannot be read ({err}); {fix}") from err
    if key not in settings:
        return default
    problem = _bad_value(key, settings[key])
    if problem:
        raise DataError(path, f"{key} {settings[key]!r} is not {problem}; {_REDO.format(_SETTINGS[key])}")
    from dira3d.engines.distributed import launcher_rank  # imported late: the engines import torch's distributed

    if launcher_rank() == 0:  # under torchrun every rank read it: rank 0 says so once
        logger.info("inference %s %s: as the model was trained (%s)", key, settings[key], path)
    return settings[key]


def _numbers(value: Any, count: int) -> bool:
    return (isinstance(value, list) and len(value) == count and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _bad_value(key: str, value: Any) -> str:
    """What the ``key`` of ``preprocessing.json`` must be, when ``value`` is not that (a file edited by hand, or
    written by something else); empty when it is."""
    from dira3d.evaluation.transforms import BRATS_MODALITIES

    if key == "modality" and not (isinstance(value, str) and value.lower() in ("ct", "mr")):
        return '"ct" or "mr"'
    if key == "window" and not (_numbers(value, 2) and value[0] < value[1]):
        return "two numbers, the low and high ends of the HU window"
    if key == "percentiles" and not (_numbers(value, 2) and 0 <= value[0] < value[1] <= 100):
        return "two increasing percentiles between 0 and 100"
    if key in ("channels", "modalities") and not (isinstance(value, list) and value and
                                                  all(isinstance(v, str) and v.lower() in BRATS_MODALITIES for v in value)):
        return f"a list of sequence names from {list(BRATS_MODALITIES)}"
    if key == "prepared_size" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return "a whole number of pixels (0: the native size)"
    if key == "spacing" and value is not None and prepared_spacing(value) is None:
        return "null or three positive voxel sizes in mm"
    return ""


def trained_spacing(ckpt_dir: str | os.PathLike, default: Sequence[float] = tuple(NATIVE_PIXDIM)) -> list[float]:
    """The ``pixdim`` default of the 3D ``inference.json``: the voxel size the model's training volumes were resampled
    to (``spacing`` in ``<ckpt_dir>/preprocessing.json``), so that a raw scan is resampled the same way; ``[0, 0, 0]``
    (the scan's own voxels) when they kept their own (null); the bundle's ``default`` when there is no file and, with
    a one-line note, when the file predates the record (pass ``--pixdim`` as the volumes were prepared).

    Raises:
        DataError: the file is garbled, or its ``spacing`` is not null or three positive numbers (named, with what to do).
    """
    missing = object()
    spacing = trained_preprocessing(ckpt_dir, "spacing", missing)
    path = Path(ckpt_dir) / PREPROCESSING_FILE
    if spacing is missing:
        if path.is_file():
            logger.warning("%s does not record the voxel spacing the model was trained at (fine-tuned before dira3d "
                           "recorded it): pixdim stays %s (0 = the scan's own voxel size); pass --pixdim as the training "
                           "volumes were prepared (dira3d prepare --spacing, the datalist's meta.spacing)", path, list(default))
        return [float(v) for v in default]
    if spacing is None:
        return list(NATIVE_PIXDIM)
    return prepared_spacing(spacing)  # checked by trained_preprocessing
