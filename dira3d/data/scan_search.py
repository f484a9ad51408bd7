"""Finding the scans of ``dira3d prepare generic`` under ``--src`` (:func:`discover`): every NIfTI / NRRD / MetaImage
file and every DICOM series folder, masks paired by name, a task bundle's predictions set aside; and the hint for a
folder of 2D images that ``generic`` does not read (:func:`radiographs_hint`).

:func:`discover` is also importable from :mod:`dira3d.data.generic`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk

from dira3d.data.errors import record_or_raise
from dira3d.data.io import DataError, image_suffix, looks_like_dicom
from dira3d.data.nifti_header import is_marked_prediction

__all__ = ["discover", "radiographs_hint"]


def _case_id(src: Path, path: Path, strip: str) -> str:
    rel = path.relative_to(src)
    name = rel.name[: len(rel.name) - len(image_suffix(rel.name))] if path.is_file() else rel.name
    if strip and name.endswith(strip):
        name = name[: -len(strip)]
    return "_".join([*rel.parent.parts, name]) if rel.parent.parts else name


def radiographs_hint(src: Path) -> str:
    """What to run for a folder of 2D images (chest X-rays as PNG / JPEG ...), which ``generic`` does not read
    ('' when it holds none): it said only that no scans were found."""
    from dira3d.data.radiographs import find_radiographs

    try:  # as `prepare radiographs` would find them (hidden files left out), DICOMs aside: generic reads those
        found = find_radiographs(src)
    except DataError:
        return ""
    images = sorted(p.relative_to(src).as_posix() for p in found.values() if p.suffix.lower() not in ("", ".dcm"))
    if not images:
        return ""
    return (f"; it holds {len(images)} 2D image file(s) (e.g. {', '.join(images[:3])}): chest X-rays are prepared by "
            "`dira3d prepare radiographs` (docs/data_2d.md)")


_NO_SERIES = ("holds {n} DICOM file(s) ({names}) but GDCM found no image series in them (empty, truncated "
              "or not DICOM image files); copy the series again, or move the folder out of --src")


def discover(src: str | os.PathLike, image_suffix_: str = "", label_suffix: str | None = None,
             dicom: bool = True, exclude: Sequence[str | os.PathLike] = (),
             problems: dict[str, str] | None = None,
             predictions: list[Path] | None = None) -> list[tuple[str, Path | None, Path | None]]:
    """Find the scans under ``src``.

    Args:
        image_suffix_: stem suffix removed from image names to form case ids (e.g. ``"_image"``).
        label_suffix: stem suffix marking mask files (e.g. ``"_label"``); ``None``: no masks.
        dicom: also look for DICOM series folders.
        exclude: folders not searched (the output folder when it lies inside ``src``).
        problems: when given, a problem of one case (a mask whose image is missing, two inputs
            with the same case id) is recorded here as ``{case_id: message}`` instead of raised
            (:func:`~dira3d.data.errors.record_or_raise`); the case is still returned (with image
            ``None`` for a lone mask).
        predictions: when given, collects the NIfTI files that carry the mark of a task bundle's prediction
            (``inference.json`` writes ``<scan>_seg.nii.gz`` next to the scan): they are left out of the scans
            (a prediction named like a mask, ``label_suffix``, stays a mask: e.g. one corrected by hand).

    Returns:
        Sorted ``(case_id, image_path, mask_path or None)``.

    Raises:
        DataError: ``src`` missing; without ``problems``, also a mask whose image is missing or two
            inputs with the same case id (e.g. ``a.nrrd`` and ``a.nii.gz``, or ``b/c.nrrd`` and ``b_c.nrrd``).
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "is not a folder; --src must be the folder holding the scans")
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    skip = {Path(p).resolve() for p in exclude}

    def add(found: dict[str, Path], cid: str, path: Path) -> None:
        if cid in found:
            record_or_raise(problems, cid, DataError(path, f"gives the same case id {cid!r} as {found[cid]}, so both "
                                                           "would write the same output; rename or move one of them"))
        found.setdefault(cid, path)

    for root, dirs, files in os.walk(src):
        # hidden folders (.snapshot, .git, .Trash, a tool's cache) are left out, as hidden files are
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() not in skip)
        other = []
        for name in sorted(files):
            path = Path(root) / name
            suffix = image_suffix(name)
            if name.endswith(".raw") or name.endswith(".zraw") or name.startswith("."):
                continue
            if not suffix:
                other.append(name)
                continue
            stem = name[: -len(suffix)]
            if label_suffix and stem.endswith(label_suffix):
                add(masks, _case_id(src, path, label_suffix), path)
            elif predictions is not None and is_marked_prediction(path):
                predictions.append(path)
            else:
                add(images, _case_id(src, path, image_suffix_), path)
        dicoms = [n for n in other if n.upper() != "DICOMDIR" and looks_like_dicom(Path(root) / n)] if dicom else []
        if dicoms:
            cid = _case_id(src, Path(root), "") if Path(root) != src else src.name
            if not sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):  # every file unreadable: was left out silently
                record_or_raise(problems, cid, DataError(Path(root), _NO_SERIES.format(
                    n=len(dicoms), names=", ".join(dicoms[:3]) + (", ..." if len(dicoms) > 3 else ""))))
            add(images, cid, Path(root))
    for cid in sorted(set(masks) - set(images)):
        record_or_raise(problems, cid, DataError(masks[cid], f"mask has no matching image (expected case {cid!r}); "
                                                             "check --image-suffix / --label-suffix"))
    return [(cid, images.get(cid), masks.get(cid)) for cid in sorted(set(images) | set(masks))]
