"""The inputs of ``dira3d localise`` (:mod:`dira3d.evaluation.localise`): the boxes of a ChestX-ray14 box datalist
(:func:`load_box_entries`, each ``label_index`` checked by :func:`check_label_index`), a radiograph loaded as the 2D
bundles' inference loads it (:func:`load_cxr_image`), a box scaled to the classifier's grid (:func:`scale_box`) and
the size the datalist's PNGs were prepared at (:func:`prepared_size_of`, else :data:`DEFAULT_SIZE`), and the
backbone / roi_size / classes a fine-tuned model was trained with, from its run's ``metrics.json`` (:func:`trained_settings`).

:func:`load_box_entries`, :func:`scale_box`, :func:`load_cxr_image`, :func:`trained_settings` and :data:`DEFAULT_SIZE` are also importable from
:mod:`dira3d.evaluation.localise`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dira3d.utils.files import read_json

if TYPE_CHECKING:
    import torch

# light to import (torch and MONAI are imported by load_cxr_image): `dira3d localise` refuses a missing box datalist
# (check_box_datalist) before they load
__all__ = ["DEFAULT_SIZE", "trained_settings", "load_box_entries", "check_box_datalist", "check_label_index", "scale_box", "load_cxr_image",
           "prepared_size_of"]

# dira3d.data.cxr.DEFAULT_SIZE, the bundles' prepared_size (not imported here: dira3d.data.cxr loads SimpleITK;
# tests/test_cxr_prepared_size.py checks they agree)
DEFAULT_SIZE = 512


def load_box_entries(bbox_datalist: str | os.PathLike, split: str | None = "test",
                     num_classes: int | None = None) -> list[dict[str, Any]]:
    """Box entries of ``split`` (``None``: every split) with absolute image paths.

    Args:
        bbox_datalist: ``bbox_datalist.json`` of ``dira3d prepare chestxray14``.
        split: the split to read; None: every split.
        num_classes: the classifier's number of outputs; each ``label_index`` must be below it
            (None: only checked to be a whole number ≥ 0).

    An image that does not exist is kept (:func:`~dira3d.evaluation.localise.localise` leaves its boxes out, naming
    it, as it does an unreadable image) unless every box's image is missing.

    Raises:
        FileNotFoundError: the datalist is missing, or every image it names is.
        ValueError: no such split, an entry without ``image`` / ``box`` / ``label_index``, or a
            ``label_index`` that is not a whole number in ``[0, num_classes)`` (names the file, the entry
            and the valid range).
    """
    path = check_box_datalist(bbox_datalist)
    fix = "regenerate it with `dira3d prepare chestxray14` (from BBox_List_2017.csv) or fix it there"
    content = read_json(path, "box datalist", fix)
    keys = [k for k, v in content.items() if isinstance(v, list)] if split is None else [split]
    if split is not None and not isinstance(content.get(split), list):
        raise ValueError(f"box datalist {path} has no split {split!r} (found {sorted(k for k, v in content.items() if isinstance(v, list))}); "
                         "pass --split with one of them")
    entries, missing_images = [], []
    for key in keys:
        for index, entry in enumerate(content[key]):
            missing = [name for name in ("image", "box", "label_index") if name not in entry] if isinstance(entry, dict) \
                else ["image", "box", "label_index"]
            box = entry.get("box") if not missing else None
            if missing or not isinstance(box, list) or len(box) != 4:
                raise ValueError(f"entry {index} of split {key!r} in {path} lacks {missing or ['a 4-value box']}; "
                                 f"expected {{image, label, label_index, box: [x, y, w, h]}}; {fix}")
            check_label_index(entry["label_index"], num_classes, f"entry {index} of split {key!r} in {path}", fix)
            if not isinstance(entry["image"], str) \
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
                raise ValueError(f"entry {index} of split {key!r} in {path} has image {entry['image']!r}, box {box!r}; "
                                 f"expected a path and 4 numbers [x, y, w, h]; {fix}")
            image = Path(entry["image"])
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                missing_images.append((image, key, index))
            entries.append({**entry, "image": str(image)})
    if not entries:
        raise ValueError(f"box datalist {path} holds no boxes in split {split!r}")
    if len(missing_images) == len(entries):  # a datalist moved away from its images (paths relative to its folder)
        image, key, index = missing_images[0]
        others = f", nor do the images of its {len(entries) - 1} other box(es)" if len(entries) > 1 else ""
        raise FileNotFoundError(f"image {image} named by {path} (split {key!r}, entry {index}) does not exist{others}; "
                                "relative paths are read from the datalist's folder: keep it beside the images folder "
                                "`dira3d prepare` wrote")
    return entries


def check_box_datalist(bbox_datalist: str | os.PathLike) -> Path:
    """``bbox_datalist`` as a path, refused when it is not a file (:func:`load_box_entries`' first check).

    Raises:
        FileNotFoundError: it does not exist (or is not a file).
    """
    path = Path(bbox_datalist)
    if not path.is_file():
        raise FileNotFoundError(f"box datalist {path} does not exist; `dira3d prepare chestxray14` writes bbox_datalist.json "
                                "when BBox_List_2017.csv is present")
    return path


def check_label_index(value: Any, num_classes: int | None, where: str, fix: str) -> None:
    """Refuse a ``label_index`` that is not a whole number in ``[0, num_classes)``: Grad-CAM of a class
    the classifier does not have fails with an IndexError, and a negative index maps another class."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if whole and value >= 0 and (num_classes is None or value < num_classes):
        return
    valid = (f"a whole number from 0 to {num_classes - 1} (the classifier has {num_classes} classes: --num-classes "
             f"{num_classes})"
             if num_classes is not None else "a whole number from 0 (the finding's place in the labels)")
    raise ValueError(f"{where} has label_index {value!r}; expected {valid}; {fix}")


def scale_box(box: Sequence[float], image_size: Sequence[int], roi_size: Sequence[int]) -> tuple[int, int, int, int]:
    """``[x, y, w, h]`` in pixels of an image of ``image_size`` (x, y) → ``(x0, y0, x1, y1)`` on the resized grid.

    The box is widened to whole pixels (floor of the start, ceil of the end) and clipped to the grid.
    """
    sx, sy = roi_size[0] / image_size[0], roi_size[1] / image_size[1]
    x, y, w, h = (float(v) for v in box)
    x0, y0 = max(0, math.floor(x * sx)), max(0, math.floor(y * sy))
    x1, y1 = min(int(roi_size[0]), math.ceil((x + w) * sx)), min(int(roi_size[1]), math.ceil((y + h) * sy))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def load_cxr_image(path: str | os.PathLike, roi_size: Sequence[int],
                   prepared_size: int | None = DEFAULT_SIZE) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load a radiograph as the 2D bundles' inference does: ``(1, X, Y)`` in [0, 1] resized to ``roi_size``, through
    ``prepared_size`` as the bundle's setting (:class:`~dira3d.evaluation.radiographs.PrepareRadiographd`; 0 or None:
    straight); also the original (x, y) size.

    A PNG, JPEG, TIFF, BMP or DICOM file is read by :class:`~dira3d.evaluation.radiographs.LoadRadiographd`, i.e.
    by :func:`dira3d.data.cxr.read_radiograph` as ``dira3d prepare chestxray14`` reads it: a 12/16-bit image min-max
    scaled to 0..255 (MONAI's ``PILReader`` kept a 16-bit PNG's own values, which were clipped to white), a
    ``MONOCHROME1`` DICOM bone bright, a grey image stored in colour as its grey channel (with a warning). Any other
    file must hold a grey image of 0..255.

    Raises:
        DataError: not an image (unreadable, empty, missing), a colour or transparent image, not a one-channel 2D
            image, or intensities outside 0..255 (a file read by MONAI's other readers), naming the file.
    """
    import torch
    from monai.transforms import EnsureChannelFirst, Resize, ScaleIntensityRange

    from dira3d.engines.inputs import check_volume
    from dira3d.evaluation.radiographs import LoadRadiographd, PrepareRadiographd

    # LoadRadiographd (a LoadVolumed): a file that is not an image, empty or missing is a DataError naming it
    image = EnsureChannelFirst()(LoadRadiographd("image", image_only=True)({"image": str(path)})["image"])
    check_volume(image, path, spatial_dims=2, slices=False, channels=1, value_range=(0.0, 255.0),
                 range_advice="the classifier takes a grey image of 0..255 (the PNGs `dira3d prepare chestxray14` "
                              "writes): save the radiograph as PNG or DICOM, which are min-max scaled as preparation "
                              "scales them, or give the prepared PNG")
    size = (int(image.shape[1]), int(image.shape[2]))
    image = PrepareRadiographd("image", prepared_size)({"image": image})["image"]
    image = ScaleIntensityRange(0.0, 255.0, 0.0, 1.0, clip=True)(image)
    image = Resize(tuple(int(s) for s in roi_size), mode="area")(image)
    return torch.as_tensor(image, dtype=torch.float32), size


def prepared_size_of(bbox_datalist: str | os.PathLike) -> int:
    """``meta.size`` of a box datalist (the ``--size`` of ``dira3d prepare chestxray14``), else :data:`DEFAULT_SIZE`."""
    from dira3d.data.datalist import datalist_meta

    size = datalist_meta(bbox_datalist).get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else DEFAULT_SIZE


def trained_settings(model_path: str | os.PathLike) -> tuple[dict[str, Any], Path | None]:
    """The ``backbone``, ``roi_size`` and ``num_classes`` a ``dira3d finetune`` model (``<output-dir>/models/model.pt``)
    was trained with, as its run's ``<output-dir>/metrics.json`` records them: its ``settings`` say whether it was a
    ``--tiny`` run (then the values of the recorded bundle's ``tiny.json``) and hold the ``--set`` values given
    (``backbone``, ``roi_size``, ``out_channels``), which win; ``({}, None)`` without that file. Returns them and the file.

    Raises:
        ValueError: the file is not a JSON object (a FileContentError), or one of those values is not of its kind.
    """
    from dira3d.evaluation.bundle_lookup import BUNDLES, tiny_settings

    model = Path(model_path).absolute()
    path = model.parent.parent / "metrics.json"
    if model.parent.name != "models" or not path.is_file():
        return {}, None
    fix = "fix or delete it, or pass --backbone, --roi-size and --num-classes, the settings the model was trained with"
    result = read_json(path, "fine-tuning record", fix)
    if result.get("bundle") in BUNDLES:  # a 3D model: refused by the weights check, which says so
        return {}, None
    settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
    found = tiny_settings(result["bundle"], ("backbone", "roi_size")) if settings.get("tiny") is True and \
        isinstance(result.get("bundle"), str) else {}
    found |= {key: settings[key] for key in ("backbone", "roi_size") if key in settings}
    if "out_channels" in settings:
        found["num_classes"] = settings["out_channels"]
    roi = found.get("roi_size", [1, 1])
    if (not isinstance(found.get("backbone", ""), str) or not isinstance(roi, list) or len(roi) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in roi)
            or type(found.get("num_classes", 1)) is not int):
        raise ValueError(f"fine-tuning record {path}: backbone {found.get('backbone')!r}, roi_size {found.get('roi_size')!r} "
                         f"or out_channels {found.get('num_classes')!r} is not a name, two sizes or a number; {fix}")
    return found, path
