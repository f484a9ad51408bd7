"""Any folder of chest radiographs (PNG, JPEG, TIFF, BMP, DICOM) → 8-bit grey PNGs + a 2D pretraining datalist.

The 2D counterpart of ``dira3d prepare generic`` for your own X-rays, without labels: what the 2D pretraining
configs (``bundles/dira_pretrain/configs/2d.json``) read. Each file is read as the other 2D preparations and the
2D bundles' inference read theirs (:func:`dira3d.data.cxr.read_radiograph`: 12/16-bit and DICOM min-max scaled,
``MONOCHROME1`` inverted, a grey image stored in colour taken as its grey channel with a warning, a coloured or
transparent one a failed case, and so is a mask: 2 to 16 integer values) and resized to ``--size``.

Input (``--src``, searched recursively; hidden files and folders, ``--dst`` inside it and the ``images/`` of an
earlier run's ``--dst`` in it, which holds its ``radiographs_datalist.json`` or ``report.json``, are left out): files
ending in ``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``, ``.bmp`` or ``.dcm``, and DICOM files (the ``DICM`` tag
after the preamble) without a suffix, ending in ``.ima`` / ``.dicom``, or named by a UID (``1.2.840.113619.5``, whose
suffix is a number), but ``DICOMDIR`` (the index of a DICOM CD, which holds no image).

Output (``--dst``): ``images/<case_id>.png`` (the case id is the file name without its suffix, prefixed by its
sub-folders: ``site_b/x1.dcm`` → ``site_b_x1``; a DICOM found by its tag keeps its whole name: ``1.2.840.5``), ``radiographs_datalist.json`` whose entries are ``{"image",
"case_id": patient id}`` in ``training`` / ``validation`` (/ ``test`` with ``--test-fraction``), a seeded split of
the patients, recorded in ``split.json``.

Patients (kept in one part of the split): by default (``--patient-from dicom``) a DICOM file's ``PatientID``
(0010,0020), so a patient's PA and lateral views or two visits never land in different parts; a DICOM whose
PatientID is blank (anonymised) and every non-DICOM file is its own patient (its case id), with one warning that
counts the DICOMs without one. ``--patient-from case`` makes every image its own patient, ``parent`` / ``--patient-regex``
take the patient from the path as for ``generic``; these options win over the DICOM PatientID.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from dira3d.data.cxr import check_size, dicom_patient_id, read_radiograph, resize_image, write_png
from dira3d.data.cxr_splits import (
    asked_no_validation,
    earlier_patient_split,
    fraction_split_parser,
    patient_split,
    run_fraction_prepare,
    split_entries,
    warn_one_validation_image,
    write_patient_split,
)
from dira3d.data.errors import record_or_raise
from dira3d.data.guards import is_earlier_output
from dira3d.data.io import DataError
from dira3d.data.normalize import mask_values
from dira3d.data.patients import PATIENT_FROM, check_patient_setting, patient_ids
from dira3d.data.runner import Case, CaseResult, batch_stopped, run_cases, safe_case_path, write_datalist
from dira3d.utils.files import looks_like_dicom

__all__ = ["SUFFIXES", "DATALIST", "PATIENT_CHOICES", "find_radiographs", "prepare", "main"]

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
DATALIST = "radiographs_datalist.json"
PATIENT_CHOICES = ("dicom", *PATIENT_FROM)  # dicom: the DICOM PatientID, else the case (the default)


def find_radiographs(src: str | os.PathLike, exclude: str | os.PathLike | None = None,
                     problems: dict[str, str] | None = None) -> dict[str, Path]:
    """``{case_id: file}`` of the radiographs under ``src`` (see the module docstring).

    Args:
        exclude: a folder not searched (``--dst`` inside ``--src``).
        problems: when given, two files of one case id (``a.png`` and ``a.dcm``) are recorded here as
            ``{case_id: message}`` naming both, and the case fails; without it they raise.

    Raises:
        DataError: ``src`` is not a folder, or holds no radiograph (the message names what it holds).
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "is not a folder; --src must be the folder holding the radiographs")
    skip = Path(exclude).resolve() if exclude else None
    found: dict[str, Path] = {}
    others: list[str] = []
    for root, dirs, files in os.walk(src):
        # the images/ of an earlier run's --dst inside --src (another --size): copies of the radiographs, which a
        # split could put in another part than their originals; they were prepared again as more radiographs
        outputs = is_earlier_output(Path(root), "radiographs", DATALIST)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() != skip
                         and not (outputs and d == "images"))
        for name in sorted(files):
            path = Path(root) / name
            suffix = path.suffix.lower()
            if name.startswith("."):
                continue
            # DICOMDIR: the index of a DICOM CD or USB stick (a DICOM file without pixels), not a radiograph. A DICOM
            # named by its SOP instance UID (1.2.840.113619.2.55.3.5: its "suffix" is .5) is found by its DICM tag.
            named = suffix in SUFFIXES
            if name.upper() == "DICOMDIR" or not (named or _is_dicom(path)):
                others.append(name)
                continue
            rel = path.relative_to(src)
            cid = "_".join([*rel.parent.parts, path.stem if named else name])
            if cid in found:
                record_or_raise(problems, cid, DataError(path, f"gives the same case id {cid!r} as {found[cid]}, so both "
                                                               "would write the same PNG; rename or move one of them"))
                continue
            found[cid] = path
    if not found:
        held = f" (it holds {len(others)} other file(s), e.g. {sorted(others)[:3]})" if others else " (it is empty)"
        raise DataError(src, f"holds no radiograph: no file ending in {', '.join(SUFFIXES)} and no DICOM file{held}; "
                             "3D scans (NIfTI, NRRD, MetaImage, DICOM series) are prepared by `dira3d prepare generic`")
    return found


def _is_dicom(path: Path) -> bool:
    """A DICOM file whose name does not end in a radiograph suffix: none (``IM0001``), ``.ima`` / ``.dicom``, or a
    number (a UID file name); the ``DICM`` tag after the preamble decides (:func:`looks_like_dicom`)."""
    suffix = path.suffix.lower()
    return (not suffix or suffix in (".ima", ".dicom") or suffix[1:].isdigit()) and looks_like_dicom(path)


def _process(case: Case, size: int) -> dict:
    """Read, check and write one radiograph. A mask among them (a dataset's mask folder, e.g. Montgomery's
    ``ManualMask``, under ``--src``: 2 to 16 integer values) fails its case, as the 2D bundles' inference refuses one:
    it was prepared and pretrained on as an X-ray without a word."""
    path = case.params["path"]
    array = read_radiograph(path)
    values = mask_values(array)
    if values is not None:
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise DataError(path, f"has only {values.size} distinct values ({shown}): it looks like a mask, not a "
                              "radiograph; move it (and its mask folder) out of --src")
    write_png(case.outputs[0], resize_image(array, size))
    return {"shape": list(array.shape)}


def _dicom_patients(cases: list[Case], patients: dict[str, str]) -> list[str]:
    """Put the ``PatientID`` of each DICOM case (a ``.dcm`` file, or one found by its DICM tag) into ``patients``; the
    case ids of the DICOMs without one (blank, anonymised, or a header that cannot be read) are returned and keep
    their case id as patient."""
    without = []
    for case in cases:
        path = Path(case.params["path"])
        if path.suffix.lower() in SUFFIXES and path.suffix.lower() != ".dcm":  # PNG, JPEG, ...: no header to ask
            continue
        try:
            patient = dicom_patient_id(path)
        except DataError:
            patient = ""
        if patient:
            patients[case.case_id] = patient
        else:
            without.append(case.case_id)
    return without


def prepare(src: str | Path, dst: str | Path, *, size: int = 512, val_fraction: float = 0.1, test_fraction: float = 0.0,
            seed: int = 0, patient_from: str = "dicom", patient_regex: str | None = None, workers: int = 1,
            overwrite: bool = False, dry_run: bool = False, keep_going: bool = False,
            report_path: str | Path | None = None, progress: bool = True) -> list[CaseResult]:
    """Prepare a folder of radiographs under ``dst`` (see the module docstring for the outputs).

    Args:
        patient_from: ``"dicom"`` (a DICOM's PatientID, else the case), ``"case"``, ``"parent"`` or ``"regex"``
            (see the module docstring).

    Returns:
        One result per file found; a file that cannot be read, a coloured or transparent image, a mask, a
        multi-frame DICOM, two files of one case id or an image without a patient (a ``--patient-regex`` that does not
        match) is a failed case, named in the report, without stopping the others under ``keep_going``.

    Raises:
        DataError: no radiograph under ``src``, or ``dst`` is ``src``. ValueError: bad settings.
    """
    src, dst = Path(src), Path(dst)
    size = check_size(size)
    patient_split([], val_fraction, test_fraction)  # validates the fractions before any work
    if patient_from not in PATIENT_CHOICES:
        raise ValueError(f"--patient-from must be one of {PATIENT_CHOICES}, got {patient_from!r}")
    by_path = "case" if patient_from == "dicom" else patient_from
    check_patient_setting(by_path, patient_regex)
    if src.is_dir() and dst.resolve() == src.resolve():
        raise DataError(dst, "is --src: the prepared PNGs would be written into its images/ among the radiographs, and "
                             "a rerun would prepare them again as more radiographs; choose an output folder of its own "
                             "with --dst (a folder inside --src is fine)")
    problems: dict[str, str] = {}
    found = find_radiographs(src, exclude=dst, problems=problems)
    patients = patient_ids(src, [(cid, path, None) for cid, path in found.items()], by_path, patient_regex, problems)
    cases = [Case(cid, [safe_case_path(dst / "images", cid, ".png")], {"path": path}, error=problems.get(cid, ""))
             for cid, path in found.items()]
    results = run_cases(cases, partial(_process, size=size), out_dir=dst, workers=workers, overwrite=overwrite,
                        dry_run=dry_run, keep_going=keep_going, report_path=report_path, desc="radiographs",
                        progress=progress, source=src, datalists=[dst / DATALIST], settings={"size": size})
    if dry_run or batch_stopped(results, keep_going):
        return results
    grouping = {"patient_from": patient_from, "patient_regex": patient_regex}
    done = [case for case, result in zip(cases, results) if result.ok]
    without_id = _dicom_patients(done, patients) if patient_from == "dicom" else []
    if without_id:
        print(f"WARNING {DATALIST}: {len(without_id)} DICOM file(s) have no PatientID (0010,0020) (e.g. "
              f"{', '.join(sorted(without_id)[:3])}), so each of them is its own patient in the split; give their "
              "patients with --patient-from parent or --patient-regex", file=sys.stderr)
    split, lists = split_entries(
        [(patients[case.case_id], {"image": case.outputs[0], "case_id": patients[case.case_id]}) for case in done],
        val_fraction, test_fraction, seed,  # a rerun with the same rule keeps its patients' parts
        earlier_patient_split(dst, seed, val_fraction=val_fraction, test_fraction=test_fraction, **grouping))
    meta = {"dataset": "radiographs", "size": size, "image_format": "png uint8 grey",
            "split": {"method": "patient-level", "val_fraction": val_fraction, "test_fraction": test_fraction,
                      "seed": seed, **grouping},
            "source": str(src.resolve())}
    if patient_from == "dicom":
        meta["dicoms_without_patient_id"] = len(without_id)
    write_datalist(dst / DATALIST, lists, meta,
                   split_advice="--val-fraction / --test-fraction round to whole patients; 2D pretraining with 2d.json "
                                "validates on the 'validation' list: rerun with a larger --val-fraction (the PNGs "
                                "written are kept)",
                   asked_empty=asked_no_validation(val_fraction, "2D pretraining with 2d.json validates on that list: "
                                                                 "--override validation=false pretrains without"))
    warn_one_validation_image(dst / DATALIST, lists)
    write_patient_split(dst, split, seed, val_fraction=val_fraction, test_fraction=test_fraction, **grouping)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = fraction_split_parser("dira3d prepare radiographs", __doc__, test_fraction=0.0)
    parser.add_argument("--patient-from", choices=PATIENT_CHOICES, default=None,
                        help="what makes images one patient, kept in one part of the split: dicom (default: a DICOM's "
                             "PatientID; a DICOM without one and any other image is its own patient), case (each image "
                             "is its own patient), parent (the folder holding it), regex (--patient-regex)")
    parser.add_argument("--patient-regex", default=None, metavar="REGEX",
                        help="regular expression with one group, searched in each image's path relative to --src; the "
                             "group is the patient id; implies --patient-from regex")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_fraction_prepare("dira3d prepare radiographs", prepare, args,
                                patient_from=args.patient_from or ("regex" if args.patient_regex is not None else "dicom"),
                                patient_regex=args.patient_regex)
