"""Any folder of scans → normalised RAS NIfTI volumes + a pretraining datalist.

Finds every NIfTI / NRRD / MetaImage file and every DICOM series folder under ``--src``; CT is
windowed to HU [lo, hi] → [0, 1], MR is scaled by the 0.5 / 99.5 percentiles of its non-zero
voxels. Optional masks are paired by name (``--label-suffix _label`` pairs ``a_label.nrrd`` with
``a.nrrd``, or with ``a_image.nrrd`` when ``--image-suffix _image``) and written as ``uint8``
on the same grid (nearest-neighbour resampling).

The volume pipeline (:func:`normalise_image`, :func:`prepare_mask`) is shared by the dataset
modules: reorient to RAS → normalise → optionally resample.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dira3d.data.errors import DataWarning, record_or_raise
from dira3d.data.geometry import resample
from dira3d.data.io import (
    IMAGE_SUFFIXES,
    DataError,
    check_mask_matches,
    image_suffix,
    image_to_xyz,
    looks_like_dicom,
    read_image,
    read_mask,
    to_ras,
    write_nifti,
    xyz_to_image,
)
from dira3d.data.normalize import normalize_mr, window_hu
from dira3d.data.runner import Case, CaseResult, add_common_arguments, batch_stopped, run_cases, run_prepare, safe_case_path, write_datalist

__all__ = ["normalise_image", "prepare_mask", "discover", "prepare", "main"]

MODALITIES = ("ct", "mr")


def normalise_image(image: sitk.Image, modality: str = "ct", window: Sequence[float] = (-1000.0, 1000.0),
                    percentiles: Sequence[float] = (0.5, 99.5), spacing: Sequence[float] | None = None,
                    path: str | os.PathLike | None = None) -> sitk.Image:
    """The prepared form of a scan: RAS, float32 in [0, 1], optionally resampled.

    Args:
        image: as read by :func:`dira3d.data.io.read_image`.
        modality: ``"ct"`` (HU window) or ``"mr"`` (percentiles of the non-zero voxels).
        window: CT window ``(lo, hi)`` in HU.
        percentiles: MR ``(lower, upper)`` percentiles.
        spacing: new spacing in mm ``(x, y, z)`` (or one number); ``None`` keeps the native grid.
        path: named in error messages.

    Raises:
        DataError: unknown modality or a volume that cannot be normalised (e.g. constant MR).
    """
    if modality not in MODALITIES:
        raise DataError(path, f"unknown modality {modality!r}; use one of {MODALITIES}")
    image = to_ras(image)
    array = image_to_xyz(image)
    try:
        scaled = window_hu(array, *window) if modality == "ct" else normalize_mr(array, None, *percentiles)
    except ValueError as err:
        raise DataError(path, str(err)) from err
    out = xyz_to_image(scaled, image)
    # normalise first, then interpolate: 0 (air / MR background) fills outside the old grid
    return resample(out, spacing, "linear", 0.0) if spacing is not None else out


def prepare_mask(mask: sitk.Image, image: sitk.Image, spacing: Sequence[float] | None = None) -> sitk.Image:
    """A ``uint8`` mask reoriented to RAS (and resampled with nearest neighbour) like its image."""
    mask = to_ras(sitk.Cast(mask, sitk.sitkUInt8))
    return resample(mask, spacing, "nearest", 0) if spacing is not None else mask


def _case_id(src: Path, path: Path, strip: str) -> str:
    rel = path.relative_to(src)
    name = rel.name[: len(rel.name) - len(image_suffix(rel.name))] if path.is_file() else rel.name
    if strip and name.endswith(strip):
        name = name[: -len(strip)]
    return "_".join([*rel.parent.parts, name]) if rel.parent.parts else name


def discover(src: str | os.PathLike, image_suffix_: str = "", label_suffix: str | None = None,
             dicom: bool = True, exclude: Sequence[str | os.PathLike] = (),
             problems: dict[str, str] | None = None) -> list[tuple[str, Path | None, Path | None]]:
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
        dirs[:] = sorted(d for d in dirs if (Path(root) / d).resolve() not in skip)
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
            else:
                add(images, _case_id(src, path, image_suffix_), path)
        if dicom and any(looks_like_dicom(Path(root) / n) for n in other) \
                and sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):
            add(images, _case_id(src, Path(root), "") if Path(root) != src else src.name, Path(root))
    for cid in sorted(set(masks) - set(images)):
        record_or_raise(problems, cid, DataError(masks[cid], f"mask has no matching image (expected case {cid!r}); "
                                                             "check --image-suffix / --label-suffix"))
    return [(cid, images.get(cid), masks.get(cid)) for cid in sorted(set(images) | set(masks))]


_MASK_VALUES = 16  # an integer image with this few distinct values is a label map, not a scan


def _check_not_a_mask(image: sitk.Image, path: str | os.PathLike) -> None:
    """A mask left among the scans (no ``--label-suffix``) would be normalised into a flat volume."""
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        return
    if np.unique(array[::4, ::4, ::4]).size > _MASK_VALUES:  # a coarse look settles almost every scan
        return
    values = np.unique(array)
    if 2 <= values.size <= _MASK_VALUES:  # (a constant image is no mask; the modality checks judge it)
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise DataError(path, f"has only {values.size} distinct values ({shown}): it looks like a mask, not a scan; "
                              "give masks a suffix and pass it (e.g. --image-suffix _image --label-suffix _label), "
                              "or move the file out of --src")


_AIR_HU = -500.0  # every CT in HU has air (or the scanner's padding, -1024 / -3024) below this


def _warn_if_not_hu(image: sitk.Image, path: str | os.PathLike) -> None:
    """An MRI (or a CT stored without its rescale intercept) given as ``--modality ct`` is windowed
    to a flat, saturated volume without any error: warn, naming the file."""
    array = sitk.GetArrayViewFromImage(image)
    lowest = float(np.min(array))
    if lowest > _AIR_HU and float(np.max(array)) > lowest:  # (a constant image is no scan at all: judged elsewhere)
        warnings.warn(f"{path}: no voxel below {_AIR_HU:g} HU (lowest {lowest:g}), so this does not look like a CT in "
                      "Hounsfield units and the HU window will flatten it; for an MRI pass --modality mr",
                      DataWarning, stacklevel=2)


def _process(case: Case, modality: str, window: Sequence[float], percentiles: Sequence[float],
             spacing: Sequence[float] | None) -> dict:
    image_path, mask_path = case.params["image"], case.params["mask"]
    image = read_image(image_path)
    _check_not_a_mask(image, image_path)
    if modality == "ct":
        _warn_if_not_hu(image, image_path)
    prepared = normalise_image(image, modality, window, percentiles, spacing, path=image_path)
    info = {"source": str(image_path), "size": list(prepared.GetSize()), "spacing": list(prepared.GetSpacing())}
    if mask_path is not None:
        mask = read_mask(mask_path)
        check_mask_matches(image, mask, image_path, mask_path)
        mask = prepare_mask(mask, image, spacing)
        if not sitk.GetArrayViewFromImage(mask).any():
            raise DataError(mask_path, f"mask became empty after resampling to {spacing} mm; use a finer --spacing")
        write_nifti(mask, case.outputs[1])
        info["mask_voxels"] = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    write_nifti(prepared, case.outputs[0])
    return info


def prepare(src: str | os.PathLike, dst: str | os.PathLike, *, modality: str = "ct",
            window: Sequence[float] = (-1000.0, 1000.0), percentiles: Sequence[float] = (0.5, 99.5),
            spacing: Sequence[float] | None = None, image_suffix: str = "", label_suffix: str | None = None,
            val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0, workers: int = 1,
            overwrite: bool = False, dry_run: bool = False, keep_going: bool = False,
            report_path: str | os.PathLike | None = None, progress: bool = True) -> list[CaseResult]:
    """Convert every scan under ``src`` and write ``dst/pretrain_datalist.json``.

    Outputs: ``volumes/<case_id>.nii.gz`` (float32 [0, 1], RAS), ``labels/<case_id>.nii.gz``
    (uint8) when masks are paired, ``pretrain_datalist.json`` (``training`` and, with
    ``val_fraction > 0``, ``validation`` — a seeded random choice of cases; with
    ``test_fraction > 0`` also ``test``, the next cases of the same seeded order, which the
    fine-tuning bundles score) and ``report.json``. The datalist lists the good cases; it is written
    unless a failure stopped the batch.

    A mask without its image and two inputs with the same case id are failed cases (reported,
    the others go on with ``keep_going``).

    Raises:
        DataError: ``src`` is not a folder or holds no scans; a datalist of another ``src`` in ``dst``.
        ValueError: bad settings (modality, fractions, or fractions that leave no training case).
    """
    if modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {MODALITIES}, got {modality!r}")
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    problems: dict[str, str] = {}
    found = discover(src, image_suffix, label_suffix, exclude=[dst], problems=problems)
    if not found:
        raise DataError(src, f"no scans found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series folders)")
    _check_split_sizes(len(found), val_fraction, test_fraction)  # before any case: a bad split wastes no work
    dst = Path(dst)
    cases = []
    for cid, image_path, mask_path in found:
        outputs = [safe_case_path(dst / "volumes", cid, ".nii.gz")]
        if mask_path is not None:
            outputs.append(safe_case_path(dst / "labels", cid, ".nii.gz"))
        cases.append(Case(cid, outputs, {"image": image_path, "mask": mask_path}, problems.get(cid, "")))
    spacing_t = None if spacing is None else tuple(float(s) for s in np.broadcast_to(spacing, (3,)))
    process = partial(_process, modality=modality, window=tuple(window), percentiles=tuple(percentiles),
                      spacing=spacing_t)
    settings = {"modality": modality, "window": list(window) if modality == "ct" else None,
                "percentiles": list(percentiles) if modality == "mr" else None,
                "spacing": None if spacing_t is None else list(spacing_t)}  # as the datalist's meta records them
    results = run_cases(cases, process, out_dir=dst, workers=workers, overwrite=overwrite, dry_run=dry_run,
                        keep_going=keep_going, report_path=report_path, desc="generic", progress=progress,
                        source=src, datalists=[dst / "pretrain_datalist.json"], settings=settings)
    if dry_run or batch_stopped(results, keep_going):
        return results
    good = [c for c, r in zip(cases, results) if r.ok]
    n_val, n_test = _check_split_sizes(len(good), val_fraction, test_fraction)
    order = np.random.default_rng(seed).permutation(len(good))
    part = {good[i].case_id: "validation" for i in order[:n_val]}
    part.update({good[i].case_id: "test" for i in order[n_val:n_val + n_test]})
    splits: dict[str, list[dict]] = {"training": [], "validation": []} | ({"test": []} if n_test else {})
    for case in good:
        entry = {"image": case.outputs[0], "case_id": case.case_id}
        if len(case.outputs) > 1:
            entry["label"] = case.outputs[1]
        splits[part.get(case.case_id, "training")].append(entry)
    meta = {"dataset": "generic", **settings, "orientation": "RAS", "val_fraction": val_fraction,
            "test_fraction": test_fraction, "seed": seed, "source": str(Path(src).resolve())}
    write_datalist(dst / "pretrain_datalist.json", splits, meta)
    return results


def _check_split_sizes(cases: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """``(validation, test)`` case counts (each fraction of ``cases``, rounded), leaving training at least one.

    Raises:
        ValueError: the two parts would take every case.
    """
    n_val, n_test = int(round(val_fraction * cases)), int(round(test_fraction * cases))
    if cases and n_val + n_test >= cases:
        raise ValueError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} take {n_val} + {n_test} of "
                         f"the {cases} case(s), leaving none to train on; lower them (or add scans)")
    return n_val, n_test


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dira3d prepare generic", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--modality", choices=MODALITIES, default="ct", help="ct: HU window; mr: percentiles")
    parser.add_argument("--window", type=float, nargs=2, default=(-1000.0, 1000.0), metavar=("LO", "HI"),
                        help="CT HU window mapped to [0, 1] (default -1000 1000)")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOWER", "UPPER"),
                        help="MR percentiles mapped to [0, 1] (default 0.5 99.5)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                        help="resample to this spacing (one value or x y z); default: native")
    parser.add_argument("--image-suffix", default="", help="stem suffix dropped from image names, e.g. _image")
    parser.add_argument("--label-suffix", default=None, help="stem suffix of mask files, e.g. _label")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="fraction of cases for validation")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="fraction of cases for a 'test' list (what `dira3d finetune` scores on your own labelled scans)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation and test choice")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.spacing is not None and len(args.spacing) not in (1, 3):
        raise SystemExit("--spacing takes one value or three (x y z)")
    return run_prepare("dira3d prepare generic", prepare, args, modality=args.modality, window=args.window,
                       percentiles=args.percentiles, spacing=args.spacing, image_suffix=args.image_suffix,
                       label_suffix=args.label_suffix, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, seed=args.seed)
