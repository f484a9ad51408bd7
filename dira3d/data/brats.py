"""BraTS 2018 → normalised MR volumes + whole-tumour masks for brain tumour segmentation (BMS).

Input, as downloaded (``MICCAI_BraTS_2018_Data_Training``): one folder per patient, under
``HGG/`` or ``LGG/`` (or directly under ``--src``), holding ``<id>_t1``, ``<id>_t1ce``,
``<id>_t2``, ``<id>_flair`` and ``<id>_seg`` (``.nii.gz`` or ``.nii``), e.g.
``HGG/Brats18_2013_2_1/Brats18_2013_2_1_flair.nii.gz``. Labels 1 (necrosis / non-enhancing),
2 (oedema), 4 (enhancing); the task's mask is the whole tumour, label > 0.

Per patient: the selected modalities (default all four, in the order given: that is the channel
order) are reoriented to RAS and each scaled to [0, 1] by the 0.5 / 99.5 percentiles of its brain
(non-zero) voxels; background stays 0. One sequence is written as a 3D NIfTI, several as a 4D
NIfTI with the channels in the last dimension (MONAI's ``EnsureChannelFirstd`` moves them first).

Outputs in ``dst``: ``images/<id>.nii.gz``, ``labels/<id>.nii.gz`` (uint8),
``brats_datalist.json`` (``training`` / ``test`` by patient, with ``grade``) and ``split.json``.
The split is the rule of :mod:`dira3d.data.splits`: sorted ids, seeded permutation, cut 190 / 95
(scaled to the patients found).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dira3d import __version__
from dira3d.data.errors import join_errors, record_or_raise
from dira3d.data.generic import normalise_image, prepare_mask
from dira3d.data.io import DataError, check_mask_matches, read_mask, write_nifti
from dira3d.data.runner import Case, CaseResult, add_common_arguments, batch_stopped, run_cases, run_prepare, case_outputs, write_datalist
from dira3d.data.sequences import SEQUENCE_NAMES, stack_sequences
from dira3d.data.splits import earlier_split, split_patients, write_split_file
from dira3d.utils.cli_help import DefaultsHelpFormatter

__all__ = ["MODALITIES", "LABELS", "DEFAULT_SPLIT", "find_patients", "check_labels", "prepare", "main"]

MODALITIES = SEQUENCE_NAMES  # t1, t1ce, t2, flair: the names brats_tumor_seg reads
DEFAULT_SPLIT: dict[str, int] = {"training": 190, "test": 95}
# the values of a BraTS segmentation: 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing (3: the enhancing tumour of
# BraTS 2023, the non-enhancing core before 2017); whatever the edition, the whole tumour is every label > 0
LABELS = (0, 1, 2, 3, 4)
_NAME = re.compile(r"^(?P<pid>.+)_(?P<kind>t1|t1ce|t2|flair|seg)\.nii(\.gz)?$", re.IGNORECASE)


def find_patients(src: str | Path, problems: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    """Find the BraTS patient folders under ``src``.

    Args:
        src: the training-data folder (holding ``HGG/`` and ``LGG/``, or the patient folders).
        problems: when given, a patient id found in two folders is recorded here as
            ``{patient id: message}`` instead of raised (:func:`~dira3d.data.errors.record_or_raise`).

    Returns:
        Patient id → ``{"folder": Path, "grade": "HGG" | "LGG" | "", "t1": Path | None, ...,
        "seg": Path | None}``, sorted by id.

    Raises:
        DataError: ``src`` is not a folder or holds no BraTS file; without ``problems``, also a
            patient id found in two folders.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "is not a folder; --src must hold the BraTS HGG/ and LGG/ patient folders")
    patients: dict[str, dict[str, object]] = {}
    copies: set[Path] = set()  # the second folders of a patient id, reported once each
    for path in sorted(src.rglob("*.nii*")):
        match = _NAME.match(path.name)
        if match is None:
            continue
        pid, kind = match["pid"], match["kind"].lower()
        entry = patients.setdefault(pid, {"folder": path.parent, **{k: None for k in (*MODALITIES, "seg")}})
        if entry["folder"] == path.parent:
            entry[kind] = path
        elif path.parent not in copies:  # a problem of this patient only: reported, the others go on
            copies.add(path.parent)
            record_or_raise(problems, pid, DataError(path, f"patient id {pid} also appears in {entry['folder']}; "
                                                           "keep one copy of each patient"))
    if not patients:
        raise DataError(src, "holds no BraTS files (<id>_t1/_t1ce/_t2/_flair/_seg.nii.gz); check --src")
    for entry in patients.values():
        grade = Path(entry["folder"]).parent.name.upper()
        entry["grade"] = grade if grade in ("HGG", "LGG") else ""
    return dict(sorted(patients.items()))


def check_labels(labels: sitk.Image, path: str | Path) -> None:
    """Refuse a segmentation holding a value no BraTS edition uses (:data:`LABELS`): another labelling (a
    parcellation, a 0 / 255 mask) whose every value > 0 would silently become tumour.

    Raises:
        DataError: naming the file, the values found and the BraTS labels.
    """
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    other = [int(v) for v in values if int(v) not in LABELS]
    if other:
        shown = ", ".join(map(str, other[:8])) + (f" ... ({len(other)} values)" if len(other) > 8 else "")
        raise DataError(path, f"holds label value(s) {shown}, which BraTS does not use (0 background, 1 necrotic / "
                              "non-enhancing core, 2 oedema, 4 enhancing; 3 in BraTS 2023): is it this patient's "
                              "BraTS segmentation? fix the file or leave the patient out (a mask of another labelling: "
                              "`dira3d prepare generic`, docs/data.md)")


def _process(case: Case, modalities: Sequence[str], percentiles: Sequence[float],
             spacing: Sequence[float] | None) -> dict:
    files = case.params
    missing = [k for k in (*modalities, "seg") if files[k] is None]
    if missing:
        names = ", ".join(f"{case.case_id}_{k}.nii.gz" for k in missing)
        raise DataError(files["folder"], f"is missing {names}; re-download the patient or drop it")
    volume, reference, reference_path = stack_sequences(
        {kind: files[kind] for kind in modalities},
        lambda image, path: normalise_image(image, "mr", percentiles=percentiles, spacing=spacing, path=path))
    labels = read_mask(files["seg"])
    check_labels(labels, files["seg"])
    check_mask_matches(reference, labels, reference_path, files["seg"])
    mask = prepare_mask(sitk.Cast(labels > 0, sitk.sitkUInt8), reference, spacing)  # whole tumour
    write_nifti(mask, case.outputs[1])
    write_nifti(volume, case.outputs[0])
    return {"tumour_voxels": int(np.count_nonzero(sitk.GetArrayViewFromImage(mask))),
            "size": list(mask.GetSize())}


def prepare(src: str | Path, dst: str | Path, *, modalities: Sequence[str] = MODALITIES,
            percentiles: Sequence[float] = (0.5, 99.5), spacing: Sequence[float] | None = None,
            split: Sequence[int] = (190, 95), seed: int = 0, workers: int = 1, overwrite: bool = False,
            dry_run: bool = False, keep_going: bool = False, report_path: str | Path | None = None,
            progress: bool = True) -> list[CaseResult]:
    """Prepare BraTS 2018 under ``dst`` (see the module docstring for the outputs).

    Args:
        modalities: MR sequences to keep, in channel order (``t1``, ``t1ce``, ``t2``, ``flair``).
        percentiles: MR normalisation percentiles of the brain voxels.
        spacing: resample to this spacing in mm; ``None`` keeps the native 1 mm grid.
        split: reference sizes (training, test), scaled to the patients found.
        seed: seed of the patient split.
        workers, overwrite, dry_run, keep_going, report_path, progress: see :func:`run_cases`.

    Returns:
        One result per patient.

    Raises:
        ValueError: unknown or repeated sequence, bad split sizes. DataError: bad layout.
    """
    modalities = tuple(s.lower() for s in modalities)
    unknown = [s for s in modalities if s not in MODALITIES]
    if not modalities or unknown or len(set(modalities)) != len(modalities):
        raise ValueError(f"--modalities {list(modalities)} must be distinct names among {list(MODALITIES)}")
    if len(split) != 2:
        raise ValueError(f"--split needs two sizes (training test), got {list(split)}")
    dst = Path(dst)
    problems: dict[str, str] = {}
    patients = find_patients(src, problems)
    cases = []
    for pid, files in patients.items():
        outputs, bad_id = case_outputs(pid, [(dst / "images", ".nii.gz"), (dst / "labels", ".nii.gz")], files["folder"])
        cases.append(Case(pid, outputs, files, join_errors(bad_id, problems.get(pid, ""))))
    process = partial(_process, modalities=modalities, percentiles=tuple(percentiles),
                      spacing=None if spacing is None else tuple(spacing))
    results = run_cases(cases, process, out_dir=dst, workers=workers, overwrite=overwrite, dry_run=dry_run,
                        keep_going=keep_going, report_path=report_path, desc="brats", progress=progress,
                        source=src, datalists=[dst / "brats_datalist.json"],
                        settings={"channels": list(modalities), "percentiles": list(percentiles),
                                  "spacing": None if spacing is None else list(spacing)})
    if dry_run or batch_stopped(results, keep_going):
        return results
    rule = {"dataset": "brats2018", "method": "sorted patient ids permuted by numpy default_rng(seed), cut in order",
            "seed": seed, "reference_sizes": dict(zip(DEFAULT_SPLIT, split))}
    parts = split_patients(list(patients), dict(zip(DEFAULT_SPLIT, split)),
                           seed, earlier=earlier_split(dst / "split.json", rule))  # a rerun keeps its patients' parts
    part_of = {pid: name for name, pids in parts.items() for pid in pids}
    lists: dict[str, list[dict]] = {name: [] for name in DEFAULT_SPLIT}
    for case, result in zip(cases, results):
        if result.ok:
            lists[part_of[case.case_id]].append({"image": case.outputs[0], "label": case.outputs[1],
                                                 "case_id": case.case_id, "grade": case.params["grade"]})
    write_split_file(dst / "split.json", parts, rule)
    meta = {"dataset": "brats2018", "channels": list(modalities), "channel_axis": "last (4D NIfTI)"
            if len(modalities) > 1 else None, "percentiles": list(percentiles),
            "spacing": None if spacing is None else list(spacing), "orientation": "RAS",
            "label": "whole tumour: labels 1, 2, 4 → 1", "split": rule, "source": str(Path(src).resolve()),
            "version": __version__}
    write_datalist(dst / "brats_datalist.json", lists, meta,
                   split_advice=f"--split {' '.join(map(str, split))} is cut over the {len(part_of)} patient(s) found, "
                                "so a part is empty below 2 patients: prepare more patients, or change --split",
                   asked_empty={name: f"--split {' '.join(map(str, split))} gives it size 0"  # asked for none
                                for name, size in zip(DEFAULT_SPLIT, split) if size == 0})
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dira3d prepare brats", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES, metavar="MOD",
                        help="MR modalities in channel order (default t1 t1ce t2 flair; e.g. --modalities flair)")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"),
                        help="brain-voxel percentiles mapped to 0 and 1 (default 0.5 99.5)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="resample to this spacing in mm; default native (1 mm)")
    parser.add_argument("--split", type=int, nargs=2, default=(190, 95), metavar=("TRAIN", "TEST"),
                        help="reference split sizes, scaled to the patients found (default 190 95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dira3d prepare brats``: parse options, run :func:`prepare`, print a summary."""
    args = build_parser().parse_args(argv)
    return run_prepare("dira3d prepare brats", prepare, args, modalities=args.modalities,
                       percentiles=args.percentiles, spacing=args.spacing, split=args.split, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
