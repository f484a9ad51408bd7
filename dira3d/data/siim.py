"""SIIM-ACR Pneumothorax → resized 8-bit PNGs + 0/1 pneumothorax masks + a segmentation datalist.

Input (``--src``, any depth): ``dicom-images-train/<study>/<series>/<SOPInstanceUID>.dcm`` and
``train-rle.csv`` (``ImageId, EncodedPixels``; ``-1`` = no pneumothorax; one row per component,
several rows of one image are merged). The RLE is decoded by :mod:`dira3d.data.rle` with the
DICOM's own size. An ImageId of the CSV without a DICOM (a partial download), or with two, is a
failed case of its own (``--keep-going`` prepares the others; the number without a DICOM is
``meta.images_without_dicom``); DICOMs absent from the CSV (the unlabelled test images) are ignored.

Output (``--dst``): ``images/<ImageId>.png``, ``masks/<ImageId>.png`` (values 0/1) and
``siim_datalist.json`` with ``{"image", "label": mask, "case_id": DICOM PatientID, "pneumothorax":
0|1}``; training / validation / test are a seeded patient-level split (default 70 / 10 / 20 %
of the patients, recorded in ``split.json``), as the challenge's test labels are not public.

``pneumothorax`` says whether the mask written has foreground, which fine-tuning relies on to keep a case
with pneumothorax in its holdout (:data:`dira3d.evaluation.datalists.FOREGROUND_KEYS`): a pneumothorax so
small that it vanishes when the mask is resized to ``--size`` (area average below one half everywhere)
gives an empty mask and ``pneumothorax`` 0, with a warning for that case in ``report.json``. A case
written by this run gives it from the mask array; a case skipped by a rerun, from its mask PNG (read once,
when it is checked; an unreadable mask PNG is redone), so a rerun into a ``--dst`` prepared by an
earlier version, whose flag came from the CSV, rewrites the datalist with the flags of the masks there.
"""

from __future__ import annotations

import argparse
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from dira3d.data.cxr import (
    check_size,
    dicom_patient_id,
    read_csv_rows,
    read_radiograph,
    resize_image,
    resize_mask,
    write_png,
)
from dira3d.data.cxr_splits import (
    earlier_patient_split,
    fraction_split_parser,
    patient_split,
    run_fraction_prepare,
    split_entries,
    write_fraction_datalist,
)
from dira3d.data.errors import OR_KEEP_GOING, DataWarning, record_or_raise
from dira3d.data.io import DataError
from dira3d.data.rle import decode_rle
from dira3d.data.runner import Case, CaseResult, batch_stopped, run_cases, case_outputs

__all__ = ["read_rle_csv", "read_patient_id", "decode_masks", "prepare", "main"]


def read_rle_csv(path: str | Path) -> dict[str, list[str]]:
    """``{ImageId: [rle, ...]}`` from ``train-rle.csv`` (file order; ``"-1"`` rows kept).

    Raises:
        DataError: missing columns or an empty ``ImageId``.
    """
    masks: dict[str, list[str]] = defaultdict(list)
    for number, row in enumerate(read_csv_rows(path, ("ImageId", "EncodedPixels")), start=2):
        if not row["ImageId"]:
            raise DataError(path, f"row {number} has an empty ImageId")
        masks[row["ImageId"]].append(row["EncodedPixels"])
    return dict(masks)


def read_patient_id(path: str | Path) -> str:
    """The DICOM ``PatientID`` (0010,0020) of ``path``, read from the header only.

    Raises:
        DataError: unreadable header or no PatientID.
    """
    patient = dicom_patient_id(path)
    if not patient:
        raise DataError(path, "has no PatientID (0010,0020); the patient-level split needs it")
    return patient


def decode_masks(rles: list[str], shape: tuple[int, int], where: str = "") -> np.ndarray:
    """Union of the decoded RLE components of one image, ``uint8`` 0/1 of ``shape``.

    Raises:
        DataError: a component that cannot be decoded (``where`` names the CSV and image).
    """
    mask = np.zeros(shape, np.uint8)
    for rle in rles:
        try:
            mask |= decode_rle(rle, shape)
        except ValueError as err:
            raise DataError(where or None, str(err)) from err
    return mask


def _process(case: Case, size: int) -> dict:
    path = case.params["path"]
    read_patient_id(path)  # the split needs it: a DICOM without one fails its own case, not the whole run
    array = read_radiograph(path)  # the reading the bundles' inference shares (MONOCHROME1, >8-bit)
    mask = decode_masks(case.params["rles"], array.shape, f"{case.params['csv']} ImageId {case.case_id}")
    stored = resize_mask(mask, size)
    write_png(case.outputs[1], stored)
    write_png(case.outputs[0], resize_image(array, size))
    pixels, kept = int(mask.sum()), int(stored.sum())
    if pixels and not kept:
        warnings.warn(f"{case.outputs[1]}: the pneumothorax of {pixels} pixel(s) in {case.params['csv']} vanished when "
                      f"the mask was resized to {size}x{size} (area average below one half everywhere): the mask "
                      "written is empty, so the entry's pneumothorax is 0; a larger --size (0 keeps the native size) "
                      "keeps it", DataWarning, stacklevel=2)
    return {"pixels": pixels, "mask_pixels": kept}


def _read_stored_flag(case: Case, flags: dict[str, bool]) -> None:
    """``check_outputs`` of :func:`run_cases`: whether the mask PNG of a case about to be skipped has
    foreground, into ``flags``; a mask that cannot be read is a :class:`DataError`, and the case is redone."""
    try:
        with Image.open(case.outputs[1]) as image:
            flags[case.case_id] = bool(np.asarray(image).any())
    except (OSError, ValueError, SyntaxError) as err:  # Pillow: UnidentifiedImageError, truncated file...
        raise DataError(case.outputs[1], f"cannot be read as a PNG ({type(err).__name__}: {str(err)[:200]})") from err


def prepare(src: str | Path, dst: str | Path, *, size: int = 512, val_fraction: float = 0.1,
            test_fraction: float = 0.2, seed: int = 0, workers: int = 1, overwrite: bool = False,
            dry_run: bool = False, keep_going: bool = False, report_path: str | Path | None = None,
            progress: bool = True) -> list[CaseResult]:
    """Prepare SIIM-ACR under ``dst`` (see the module docstring for the outputs).

    Args:
        size: output side in pixels (0 keeps 1024²).
        val_fraction, test_fraction: fractions of the patients for validation and test.
        seed: seed of the patient-level split.

    Raises:
        DataError: no CSV, no DICOM, malformed CSV or DICOM header. ValueError: bad settings.
    """
    src, dst = Path(src), Path(dst)
    size = check_size(size)
    patient_split([], val_fraction, test_fraction)  # validates the fractions before any work
    if not src.is_dir():
        raise DataError(src, "is not a folder; --src must hold train-rle.csv and dicom-images-train/")
    csvs = sorted(src.rglob("train-rle.csv"))
    if not csvs:
        raise DataError(src, "holds no train-rle.csv; download it with the DICOM images")
    csv_path = csvs[0]
    rles = read_rle_csv(csv_path)
    dicoms: dict[str, Path] = {}
    problems: dict[str, str] = {}  # ImageId → why its case fails
    for path in sorted(src.rglob("*.dcm")):
        if path.stem in rles:
            if path.stem in dicoms:  # which copy is right cannot be told: that image fails, the others go on
                record_or_raise(problems, path.stem, DataError(path, f"duplicate of {dicoms[path.stem]}; keep one "
                                                                     "copy of each DICOM"))
                continue
            dicoms[path.stem] = path
    if not dicoms:
        raise DataError(src, f"holds none of the {len(rles)} DICOM files named in {csv_path.name}; extract "
                             "dicom-images-train under --src")
    # every ImageId of the CSV is a case; one without a DICOM (a partial download) or with two is a
    # failed case of its own, so --keep-going prepares the rest
    cases = []
    for image_id in sorted(rles):
        outputs, bad_id = case_outputs(image_id, [(dst / "images", ".png"), (dst / "masks", ".png")], f"{csv_path} ImageId")
        if bad_id:
            record_or_raise(problems, image_id, DataError(None, bad_id))
        if image_id not in dicoms:
            record_or_raise(problems, image_id, DataError(csv_path, f"ImageId {image_id} has no DICOM {image_id}.dcm "
                                                                    f"under {src} (partial download?); extract the "
                                                                    "whole dicom-images-train"
                                                                    + OR_KEEP_GOING * (not keep_going)))
        cases.append(Case(image_id, outputs, {"path": dicoms.get(image_id), "rles": rles[image_id], "csv": csv_path},
                          error=problems.get(image_id, "")))
    skipped_flags: dict[str, bool] = {}  # a skipped case's mask has foreground (read when it is checked)
    results = run_cases(cases, partial(_process, size=size), out_dir=dst, workers=workers, overwrite=overwrite,
                        dry_run=dry_run, keep_going=keep_going, report_path=report_path, desc="siim",
                        progress=progress, source=src, datalists=[dst / "siim_datalist.json"],
                        settings={"size": size}, check_outputs=partial(_read_stored_flag, flags=skipped_flags))
    if dry_run or batch_stopped(results, keep_going):
        return results

    entries = []
    for case, result in zip(cases, results):
        if not result.ok:
            continue
        patient = read_patient_id(case.params["path"])
        # the mask written, not the CSV: a tiny pneumothorax can vanish in the resize
        positive = result.info["mask_pixels"] > 0 if result.status == "written" else skipped_flags[case.case_id]
        entries.append((patient, {"image": case.outputs[0], "label": case.outputs[1], "case_id": patient,
                                  "pneumothorax": int(positive)}))
    split, lists = split_entries(entries, val_fraction, test_fraction, seed,  # a rerun keeps its patients' parts
                                 earlier_patient_split(dst, seed, val_fraction=val_fraction, test_fraction=test_fraction))
    missing = len(rles) - len(dicoms)
    meta = {"dataset": "siim-acr", "size": size, "image_format": "png uint8 grey", "mask_format": "png uint8 0/1",
            "rle": "relative starts, column-major (Kaggle)", "images_without_dicom": missing,
            "split": {"method": "patient-level", "val_fraction": val_fraction, "test_fraction": test_fraction,
                      "seed": seed}, "source": str(src.resolve())}
    write_fraction_datalist(dst / "siim_datalist.json", lists, meta, split, seed, val_fraction, test_fraction)
    return results


def build_parser() -> argparse.ArgumentParser:
    return fraction_split_parser("dira3d prepare siim", __doc__)


def main(argv: list[str] | None = None) -> int:
    return run_fraction_prepare("dira3d prepare siim", prepare, build_parser().parse_args(argv))
