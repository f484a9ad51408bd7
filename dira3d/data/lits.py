"""LiTS-2017 → normalised CT volumes + liver masks for liver segmentation (LCS).

Input (as downloaded, any folder depth): ``volume-N.nii`` and ``segmentation-N.nii`` (``.nii.gz``
also accepted), labels 0 background, 1 liver, 2 tumour. The task's mask is liver ∪ tumour.
Each case is reoriented to RAS, windowed (HU [−1000, 1000] → [0, 1]), optionally resampled
(image linear, mask nearest) and written to ``volumes/lits-NNN.nii.gz`` and
``labels/lits-NNN.nii.gz``. ``lits_datalist.json`` splits by volume number: 0–99 training,
100–114 validation, 115–129 test (configurable; a partial download uses what exists in each range).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dira3d.data.errors import record_or_raise
from dira3d.data.generic import normalise_image, prepare_mask
from dira3d.data.io import DataError, check_mask_matches, read_image, read_mask, write_nifti
from dira3d.data.pipeline import add_ct_arguments
from dira3d.data.runner import Case, CaseResult, add_common_arguments, batch_stopped, run_cases, run_prepare, safe_case_path, write_datalist
from dira3d.utils.cli_help import DefaultsHelpFormatter

__all__ = ["OFFICIAL_SPLIT", "find_cases", "prepare", "main"]

OFFICIAL_SPLIT = {"training": (0, 99), "validation": (100, 114), "test": (115, 129)}
_NAME = re.compile(r"(volume|segmentation)-(\d+)\.nii(\.gz)?")


def find_cases(src: str | Path, problems: dict[int, str] | None = None) -> dict[int, dict[str, Path | None]]:
    """``{N: {"image": volume-N path or None, "mask": segmentation-N path or None}}`` found under ``src``.

    Args:
        problems: when given, a file found twice or a segmentation without its volume is recorded
            here as ``{N: message}`` instead of raised (:func:`~dira3d.data.errors.record_or_raise`):
            a problem of that case only (the batch reports it as failed).

    Raises:
        DataError: ``src`` is not a folder or holds no ``volume-N.nii``; without ``problems``, also
            a file found twice or a segmentation without its volume.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "is not a folder; --src must hold the LiTS volume-N.nii / segmentation-N.nii files")
    found: dict[int, dict[str, Path | None]] = {}
    for path in sorted(src.rglob("*.nii*")):
        match = _NAME.fullmatch(path.name)
        if not match:
            continue
        key = "image" if match.group(1) == "volume" else "mask"
        number = int(match.group(2))
        slot = found.setdefault(number, {"image": None, "mask": None})
        if slot[key] is not None:
            record_or_raise(problems, number, DataError(path, f"duplicate of {slot[key]}; keep one copy of each "
                                                              "LiTS file"))
        else:
            slot[key] = path
    if not any(s["image"] for s in found.values()):
        raise DataError(src, "holds no volume-N.nii files; point --src at the LiTS training batches")
    for n, slot in found.items():
        if slot["image"] is None:
            record_or_raise(problems, n, DataError(slot["mask"], f"segmentation has no volume-{n}.nii next to it; "
                                                                 "download the volume or remove the segmentation"))
    return dict(sorted(found.items()))


def _process(case: Case, window: Sequence[float], spacing: Sequence[float] | None) -> dict:
    image_path, mask_path = case.params["image"], case.params["mask"]
    if mask_path is None:
        raise DataError(image_path, f"has no segmentation-{case.params['number']}.nii; download it or remove the volume")
    image = read_image(image_path)
    labels = read_mask(mask_path, max_label=2)  # 0 background, 1 liver, 2 tumour
    check_mask_matches(image, labels, image_path, mask_path)
    liver = sitk.Cast(labels > 0, sitk.sitkUInt8)  # the task's foreground: liver ∪ tumour
    volume = normalise_image(image, "ct", window, spacing=spacing, path=image_path)
    mask = prepare_mask(liver, image, spacing)
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    if count == 0:
        raise DataError(mask_path, f"liver mask became empty after resampling to {spacing} mm; use a finer --spacing")
    write_nifti(mask, case.outputs[1])
    write_nifti(volume, case.outputs[0])
    return {"liver_voxels": count, "size": list(volume.GetSize()), "spacing": list(volume.GetSpacing())}


def prepare(src: str | Path, dst: str | Path, *, window: Sequence[float] = (-1000.0, 1000.0),
            spacing: Sequence[float] | None = None, splits: dict[str, Sequence[int]] | None = None,
            workers: int = 1, overwrite: bool = False, dry_run: bool = False, keep_going: bool = False,
            report_path: str | Path | None = None, progress: bool = True) -> list[CaseResult]:
    """Prepare LiTS under ``dst`` (see the module docstring for the outputs).

    Args:
        splits: ``{"training": (first, last), ...}`` inclusive volume-number ranges; default official.
            Volumes outside every range are prepared but not listed.

    A duplicate file or a segmentation without its volume fails that case only.

    Raises:
        DataError: bad layout. ValueError: overlapping or reversed ranges.
    """
    src, dst = Path(src), Path(dst)
    splits = {k: (int(v[0]), int(v[1])) for k, v in (splits or OFFICIAL_SPLIT).items()}
    ranges = sorted((lo, hi, name) for name, (lo, hi) in splits.items())
    for lo, hi, name in ranges:
        if lo > hi:
            raise ValueError(f"the {name} range {lo}-{hi} is reversed; give FIRST LAST with FIRST <= LAST")
    for (lo1, hi1, n1), (lo2, hi2, n2) in zip(ranges, ranges[1:]):
        if lo2 <= hi1:
            raise ValueError(f"the {n1} range {lo1}-{hi1} overlaps the {n2} range {lo2}-{hi2}; ranges must be disjoint")
    cases = []
    problems: dict[int, str] = {}
    for number, files in find_cases(src, problems).items():
        cid = f"lits-{number:03d}"
        outputs = [safe_case_path(dst / "volumes", cid, ".nii.gz"), safe_case_path(dst / "labels", cid, ".nii.gz")]
        cases.append(Case(cid, outputs, {"number": number, **files}, problems.get(number, "")))
    process = partial(_process, window=tuple(window), spacing=None if spacing is None else tuple(spacing))
    results = run_cases(cases, process, out_dir=dst, workers=workers, overwrite=overwrite, dry_run=dry_run,
                        keep_going=keep_going, report_path=report_path, desc="lits", progress=progress,
                        source=src, datalists=[dst / "lits_datalist.json"],
                        settings={"window": list(window), "spacing": None if spacing is None else list(spacing)})
    if dry_run or batch_stopped(results, keep_going):
        return results
    lists: dict[str, list[dict]] = {name: [] for name in splits}
    for case, result in zip(cases, results):
        number = case.params["number"]
        name = next((n for lo, hi, n in ranges if lo <= number <= hi), None)
        if result.ok and name is not None:
            lists[name].append({"image": case.outputs[0], "label": case.outputs[1], "case_id": case.case_id,
                                "volume": number})
    meta = {"dataset": "lits", "window": list(window), "spacing": None if spacing is None else list(spacing),
            "orientation": "RAS", "label": "liver (1) ∪ tumour (2) → 1", "splits": {k: list(v) for k, v in splits.items()},
            "source": str(src.resolve())}
    write_datalist(dst / "lits_datalist.json", lists, meta,
                   split_advice="check --train-range / --val-range / --test-range (volume numbers, both ends included; "
                                "default 0 99, 100 114, 115 129) against the volume-N.nii files found: a partial "
                                "download fills only the ranges its volumes fall in")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dira3d prepare lits", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_common_arguments(parser)
    add_ct_arguments(parser, "resample to this spacing in mm (image linear, mask nearest); default native")
    for name, (lo, hi) in OFFICIAL_SPLIT.items():
        flag = {"training": "train", "validation": "val", "test": "test"}[name]
        parser.add_argument(f"--{flag}-range", type=int, nargs=2, default=(lo, hi), metavar=("FIRST", "LAST"),
                            help=f"volume numbers of the {name} split (default {lo} {hi})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_prepare("dira3d prepare lits", prepare, args, window=args.window, spacing=args.spacing,
                       splits={"training": args.train_range, "validation": args.val_range, "test": args.test_range})
