"""Any folder of scans → normalised RAS NIfTI volumes + a pretraining datalist.

Finds every NIfTI / NRRD / MetaImage file and every DICOM series folder under ``--src``; CT is
windowed to HU [lo, hi] → [0, 1], MR is scaled by the 0.5 / 99.5 percentiles of its non-zero
voxels. Without ``--modality`` the one an earlier run into ``--dst`` recorded is used, else the
scans decide (:func:`dira3d.data.modality.modality_from_scans`): scans without air stop the run before anything is
written. Optional masks are paired by name (``--label-suffix _label`` pairs ``a_label.nrrd`` with
``a.nrrd``, or with ``a_image.nrrd`` when ``--image-suffix _image``) and written as ``uint8``
on the same grid (nearest-neighbour resampling). The validation / test split is drawn over
patients: by default each scan is its own patient; ``--patient-from parent`` groups the scans of a
folder, ``--patient-regex`` takes the patient id from the path (see :func:`patient_ids`).
``--sequences`` makes each case a folder of MR sequences, written as one multi-channel volume as
``dira3d prepare brats`` writes BraTS (:mod:`dira3d.data.sequences`).

The volume pipeline (:func:`normalise_image`, :func:`prepare_mask`) is shared by the dataset
modules: reorient to RAS → normalise → optionally resample. It lives in :mod:`dira3d.data.pipeline`,
the patient grouping and split in :mod:`dira3d.data.patients`, the ``--sequences`` settings check in
:mod:`dira3d.data.sequences`, the search for the scans (:func:`discover`) in :mod:`dira3d.data.scan_search`; the names
of ``__all__`` are importable from here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dira3d.data.datalist import datalist_meta
from dira3d.data.io import (
    IMAGE_SUFFIXES,
    DataError,
    check_mask_matches,
    read_image,
    read_mask,
    write_nifti,
)
from dira3d.data.modality import MODALITIES, check_hu, check_mr, check_not_a_mask, modality_from_scans, recorded_modality
from dira3d.data.patients import (PATIENT_FROM, check_grouping, check_patient_setting, check_split_sizes, earlier_parts,
                                  patient_ids, patient_parts)
from dira3d.data.pipeline import normalise_image, prepare_mask, spacing_spread
from dira3d.data.runner import (Case, CaseResult, add_common_arguments, batch_stopped, run_cases, run_prepare, safe_case_path,
                                 warn_one_validation, write_datalist)
from dira3d.data.scan_search import discover, radiographs_hint
from dira3d.data.sequences import check_channels, check_sequence_settings, find_sequence_cases, stack_sequences
from dira3d.utils.cli_help import DefaultsHelpFormatter

__all__ = ["normalise_image", "prepare_mask", "discover", "patient_ids", "prepare", "main"]


def _process(case: Case, modality: str, window: Sequence[float], percentiles: Sequence[float],
             spacing: Sequence[float] | None, chosen_by: str = "") -> dict:
    image_path, mask_path = case.params["image"], case.params["mask"]
    image = read_image(image_path)
    check_not_a_mask(image, image_path)
    if modality == "ct":
        check_hu(image, image_path, chosen_by)
    else:
        check_mr(image, image_path, chosen_by)
    prepared = normalise_image(image, modality, window, percentiles, spacing, path=image_path)
    info = {"source": str(image_path), "size": list(prepared.GetSize()), "spacing": list(prepared.GetSpacing())}
    if mask_path is not None:
        info["mask_voxels"] = _write_mask(mask_path, image, image_path, spacing, case.outputs[1])
    write_nifti(prepared, case.outputs[0])
    return info


def _write_mask(mask_path: Path, image: sitk.Image, image_path: Path, spacing: Sequence[float] | None, out: Path) -> int:
    """Read, check (on ``image``'s grid, not empty), prepare and write a mask; returns its voxel count."""
    mask = read_mask(mask_path)
    check_mask_matches(image, mask, image_path, mask_path)
    mask = prepare_mask(mask, image, spacing)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise DataError(mask_path, f"mask became empty after resampling to {spacing} mm; use a finer --spacing")
    write_nifti(mask, out)
    return int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))


_SEQUENCE_IS_A_MASK = "make the --sequences pattern that matched it skip it (a mask goes in --label-pattern)"


def _check_sequence(image: sitk.Image, path: Path) -> None:
    check_not_a_mask(image, path, advice=_SEQUENCE_IS_A_MASK)
    check_mr(image, path)


def _process_sequences(case: Case, percentiles: Sequence[float], spacing: Sequence[float] | None) -> dict:
    """One case of ``--sequences``: its sequences stacked as ``prepare brats`` stacks them (each MR-scaled,
    channels last in the order of ``--sequences``) and its mask, if any, on the same grid."""
    paths, mask_path = case.params["sequences"], case.params["mask"]
    volume, reference, reference_path = stack_sequences(
        paths, lambda image, path: normalise_image(image, "mr", percentiles=percentiles, spacing=spacing, path=path),
        _check_sequence)
    info = {"sources": {name: str(path) for name, path in paths.items()}, "size": list(volume.GetSize()[:3]),
            "spacing": list(volume.GetSpacing()[:3])}
    if mask_path is not None:
        info["mask_voxels"] = _write_mask(mask_path, reference, reference_path, spacing, case.outputs[1])
    write_nifti(volume, case.outputs[0])
    return info


def _check_volume_channels(case: Case, channels: int) -> None:
    """``check_outputs`` of ``--sequences``: a volume of another run (other sequences, a single scan) is redone."""
    check_channels(case.outputs[0], channels)


def _check_src_outside_outputs(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse a ``--dst`` whose output folders hold the scans of ``--src`` (or are ``--src`` itself).

    ``--dst`` equal to ``--src`` puts ``volumes/`` among the scans, and a rerun reads the prepared volumes
    as new scans (twice the cases, normalised twice); ``--src D/volumes --dst D`` names every output after
    its own input: the first run skips them all ("outputs exist") and lists the raw scans as prepared
    volumes, ``--overwrite`` replaces the scans. (A ``--dst`` inside ``--src``, e.g. ``--src D --dst
    D/prepared``, is fine: it is left out of the search.)

    Raises:
        ValueError: naming both folders and what to do.
    """
    source, out = Path(src).resolve(), Path(dst).resolve()
    clash = next((folder for folder in (out, out / "volumes", out / "labels")
                  if source == folder or (folder != out and folder in source.parents)), None)
    if clash is not None:
        what = "is --src itself" if clash == out else f"would write its {clash.name}/ folder where the scans of --src {src} are"
        raise ValueError(f"--dst {dst} {what}: the prepared volumes would be written among (or over) the scans and a "
                         "rerun would read them as scans; give --dst a folder of its own, e.g. a new folder "
                         "next to --src (a --dst inside --src is left out of the search)")


def _check_src_not_prepared(src: str | os.PathLike) -> None:
    """Refuse a ``--src`` that is the output of ``dira3d prepare`` (its ``--dst``, or the ``volumes/`` in it): its
    volumes, already in [0, 1], were prepared again as scans without air (flattened by the HU window, with a warning
    per volume under ``--modality ct``) instead of being passed on to the next step by their datalist.

    Raises:
        DataError: naming the datalist found, the folder it was prepared from and what to do.
    """
    folder = Path(src)
    for where in (folder, folder.parent) if folder.name in ("volumes", "images", "labels") else (folder,):
        for datalist in sorted(where.glob("*datalist.json")) if where.is_dir() else ():
            meta = datalist_meta(datalist)
            if meta.get("dataset") and meta.get("source"):
                raise DataError(src, f"is the output of `dira3d prepare {meta['dataset']}` ({datalist} lists its volumes, "
                                     f"prepared from {meta['source']}): they are prepared already; pass {datalist} to "
                                     "the next step (`dira3d visual-words --datalist`, `dira3d pretrain --datalist`), or "
                                     "give --src the folder of the original scans")


def prepare(src: str | os.PathLike, dst: str | os.PathLike, *, modality: str | None = None,
            window: Sequence[float] = (-1000.0, 1000.0), percentiles: Sequence[float] = (0.5, 99.5),
            spacing: Sequence[float] | None = None, image_suffix: str = "", label_suffix: str | None = None,
            val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0,
            patient_from: str = "case", patient_regex: str | None = None,
            sequences: str | Sequence[str] | None = None, label_pattern: str | None = None, workers: int = 1,
            overwrite: bool = False, dry_run: bool = False, keep_going: bool = False,
            report_path: str | os.PathLike | None = None, progress: bool = True) -> list[CaseResult]:
    """Convert every scan under ``src`` and write ``dst/pretrain_datalist.json``.

    Outputs: ``volumes/<case_id>.nii.gz`` (float32 [0, 1], RAS), ``labels/<case_id>.nii.gz``
    (uint8) when masks are paired, ``pretrain_datalist.json`` (``training`` and, with
    ``val_fraction > 0``, ``validation`` — a seeded random choice of patients; with
    ``test_fraction > 0`` also ``test``, the next patients of the same seeded order, which the
    fine-tuning bundles score) and ``report.json``. The datalist lists the good cases, each entry
    with its ``case_id`` and ``patient_id``; it is written unless a failure stopped the batch.

    ``modality`` ``None`` (``--modality`` not given): the one an earlier run of this ``src`` into ``dst``
    recorded, else decided from the scans (:func:`dira3d.data.modality.modality_from_scans`): ``ct`` when those read have air
    (below -500 HU), an error before anything is written when they have none (an MRI: pass ``"mr"``; a CT
    without its rescale intercept or cropped without air: pass ``"ct"``) or are mixed. Chosen so, ``ct``
    fails a case without air (it is not written), where an explicit ``"ct"`` only warns about it. The
    choice is printed once (stderr) and recorded as ``meta.modality``.

    The split is over patients (``patient_from``, ``patient_regex``: see :func:`patient_ids`), so
    the scans of one patient share a part; the fractions count patients. The default
    ``patient_from="case"`` makes each scan its own patient (the split of dira3d before the option
    existed: same seed and case ids, same split).

    A mask without its image, two inputs with the same case id and a scan whose patient is unknown
    (``--patient-regex`` does not match it) are failed cases (reported, the others go on with
    ``keep_going``).

    ``sequences`` (``["t1=*T1w*", "flair=*FLAIR*"]``, :func:`dira3d.data.sequences.parse_sequences`): a case is
    a folder holding one image file (or DICOM series folder) per sequence, matched by those patterns, and
    with ``label_pattern`` its mask (:func:`dira3d.data.sequences.find_sequence_cases`). The sequences must
    share one voxel grid; each is scaled as MR and they are written as one volume, channels last in the
    order given, as ``dira3d prepare brats`` writes them (``meta.channels`` names them, so
    ``brats_tumor_seg`` reads the datalist). A case missing a sequence or its mask, with two files matching
    one pattern, or with a sequence on another grid fails alone. The modality is ``mr``.

    Raises:
        DataError: ``src`` is not a folder or holds no scans; a datalist of another ``src``, or one
            split with another patient grouping, in ``dst`` (without ``overwrite``); without ``modality``,
            scans without air or a mix of scans with and without (before anything is written).
        ValueError: bad settings (modality, fractions, patient grouping, or fractions that leave no
            training patient).
    """
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {MODALITIES}, got {modality!r}")
    patterns = check_sequence_settings(sequences, label_pattern, modality, image_suffix, label_suffix)
    if patterns:
        modality = "mr"
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    check_patient_setting(patient_from, patient_regex)
    _check_src_outside_outputs(src, dst)
    _check_src_not_prepared(src)
    problems: dict[str, str] = {}
    if patterns:
        folders = find_sequence_cases(src, patterns, label_pattern, exclude=[dst], problems=problems)
        if not folders:
            raise DataError(src, f"no folder holds an image file or DICOM series folder whose name matches --sequences "
                                 f"{' '.join(f'{k}={v}' for k, v in patterns.items())}; check the patterns (shell "
                                 "patterns such as *T1w*, matched case-insensitively to the file names)")
        found = [(cid, folder, None) for cid, folder, _, _ in folders]  # the case folder stands for its scans
        files = {cid: (paths, mask) for cid, _, paths, mask in folders}
    else:
        predictions: list[Path] = []
        found = discover(src, image_suffix, label_suffix, exclude=[dst], problems=problems, predictions=predictions)
        if predictions:  # inference writes next to the scan by default: a rerun found them among the scans
            print(f"left out {len(predictions)} prediction file(s) written by a dira3d bundle's inference, not scans: "
                  f"{', '.join(str(p) for p in predictions[:3])}{', ...' if len(predictions) > 3 else ''} (to use them "
                  "as masks, e.g. corrected by hand, pass their suffix as --label-suffix)", file=sys.stderr)
    if not found:
        raise DataError(src, f"no scans found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series folders)"
                             + radiographs_hint(src))
    patients = patient_ids(src, found, patient_from, patient_regex, problems)
    unit = "case" if patient_from == "case" else "patient"
    # before any case: a bad split wastes no work (a case without a patient counts as one)
    check_split_sizes(len(set(patients.values())) + sum(cid not in patients for cid, _, _ in found),
                      val_fraction, test_fraction, unit)
    dst = Path(dst)
    grouping = {"patient_from": patient_from, "patient_regex": patient_regex}
    check_grouping(dst / "pretrain_datalist.json", src, grouping, overwrite)
    cases = []
    for cid, image_path, mask_path in found:
        if patterns:  # with --label-pattern every case has a mask, or fails for the lack of one
            params, labelled = {"sequences": files[cid][0], "mask": files[cid][1]}, label_pattern is not None
        else:
            params, labelled = {"image": image_path, "mask": mask_path}, mask_path is not None
        outputs = [safe_case_path(dst / "volumes", cid, ".nii.gz")]
        if labelled:
            outputs.append(safe_case_path(dst / "labels", cid, ".nii.gz"))
        cases.append(Case(cid, outputs, params, problems.get(cid, "")))
    chosen_by = ""  # why the modality was chosen when --modality was not given: its cases of the other kind then fail
    if modality is None:
        recorded = recorded_modality(dst, src, report_path)
        if recorded is not None:
            modality, chosen_by = recorded[0], f"as recorded in {recorded[1]} by an earlier run into this --dst"
        else:
            modality, chosen_by = modality_from_scans(cases, src)
    spacing_t = None if spacing is None else tuple(float(s) for s in np.broadcast_to(spacing, (3,)))
    process = partial(_process, modality=modality, window=tuple(window), percentiles=tuple(percentiles),
                      spacing=spacing_t, chosen_by=chosen_by)
    check_outputs = None
    if patterns:
        process = partial(_process_sequences, percentiles=tuple(percentiles), spacing=spacing_t)
        check_outputs = partial(_check_volume_channels, channels=len(patterns))
    settings = {"modality": modality, "window": list(window) if modality == "ct" else None,
                "percentiles": list(percentiles) if modality == "mr" else None,
                "spacing": None if spacing_t is None else list(spacing_t),
                "channels": list(patterns) or None}  # as the datalist's meta records them
    results = run_cases(cases, process, out_dir=dst, workers=workers, overwrite=overwrite, dry_run=dry_run,
                        keep_going=keep_going, report_path=report_path, desc="generic", progress=progress,
                        source=src, datalists=[dst / "pretrain_datalist.json"], settings=settings,
                        check_outputs=check_outputs)
    if chosen_by:  # after run_cases' own checks: a refused run says one thing
        print(f"--modality not given: prepared as {modality} ({chosen_by}); pass --modality ct or mr to choose",
              file=sys.stderr)
    if dry_run or batch_stopped(results, keep_going):
        return results
    good = [c for c, r in zip(cases, results) if r.ok]
    earlier = earlier_parts(dst / "pretrain_datalist.json", src, {"val_fraction": val_fraction, "test_fraction": test_fraction,
                                                                 "seed": seed, **grouping})  # fmt: skip
    part = patient_parts(sorted({patients[c.case_id] for c in good}), val_fraction, test_fraction, seed, unit, earlier)
    # asked for (--test-fraction) but rounded to no patient: an empty list, which write_datalist warns about
    has_test = test_fraction > 0 or "test" in part.values()
    splits: dict[str, list[dict]] = {"training": [], "validation": []} | ({"test": []} if has_test else {})
    for case in good:
        entry = {"image": case.outputs[0], "case_id": case.case_id, "patient_id": patients[case.case_id]}
        if len(case.outputs) > 1:
            entry["label"] = case.outputs[1]
        splits[part[patients[case.case_id]]].append(entry)
    meta = {"dataset": "generic", **settings, "orientation": "RAS", "val_fraction": val_fraction,
            "test_fraction": test_fraction, "seed": seed, **grouping, "source": str(Path(src).resolve())}
    if patterns:
        meta.update(channel_axis="last (4D NIfTI)" if len(patterns) > 1 else None, sequences=patterns,
                    label_pattern=label_pattern)
    n_patients = len({patients[c.case_id] for c in good})
    labelled = any("label" in e for entries in splits.values() for e in entries)
    fractions = (("validation", "--val-fraction", val_fraction), ("test", "--test-fraction", test_fraction))
    # a fraction of 0 (the default) asked for no such list: a note of what reads it (write_datalist), no rerun advice
    asked = {part: f"{option} 0 (the default)" for part, option, fraction in fractions if fraction == 0}
    if "validation" in asked:  # why an empty 'validation' list matters for the next step
        asked["validation"] += f"; {_PRETRAINING_WITHOUT_VALIDATION if labelled else _VALIDATION_USERS}"
    # generic has no subsets: name its own options
    rounded = [part for part, _, fraction in fractions if fraction > 0 and part in splits and not splits[part]]
    advice = "; ".join(f"{option} {fraction:g} of the {n_patients} patient(s) rounds to none (whole patients)"
                       for part, option, fraction in fractions if part in rounded)
    if not labelled:
        advice += f"; {_VALIDATION_USERS}" if "validation" in rounded else ""
        advice += "; " + _larger_fraction(splits, n_patients, rounded[0]) if rounded else ""
    else:  # for fine-tuning (write_datalist says it needs no 'validation' list): a rerun only to pretrain on them too
        if "test" in rounded:  # what fine-tuning scores on
            advice += "; " + _larger_fraction(splits, n_patients, "test")
        if "validation" in rounded:
            advice += f"; {_PRETRAINING_WITHOUT_VALIDATION}; for a 'validation' list to pretrain with: " + \
                _larger_fraction(splits, n_patients, "validation")
    write_datalist(dst / "pretrain_datalist.json", splits, meta, split_advice=advice, asked_empty=asked)
    spread = "" if spacing_t is not None else spacing_spread([(c.case_id, c.outputs[0]) for c in good])
    if spread:
        print(f"WARNING pretrain_datalist.json: {spread}", file=sys.stderr)
    if not any("label" in e for e in splits["training"]):  # for pretraining
        warn_one_validation(dst / "pretrain_datalist.json", splits, "`dira3d visual-words` validation words "
                            "(--val-neighbours 2 or more, for a validation of pretraining on its output) and Barlow "
                            "Twins pretraining (dis_mode barlow) need")
    return results


# what needs the 'validation' list of a pretraining datalist: visual-word validation words (without them, a
# `dira3d visual-words --val-neighbours 0` output, pretraining runs without validation), and the instance modes
_VALIDATION_USERS = ("`dira3d visual-words` (its validation words: without them pretraining on its output runs without "
                     "validation) and pretraining with dis_mode moco, barlow or simsiam validate on the 'validation' "
                     "list (or pretrain without validation: --override validation=false)")
# the same for a labelled datalist, prepared for fine-tuning: what pretraining on it too does without that list
_PRETRAINING_WITHOUT_VALIDATION = (
    "to pretrain on these volumes too: `dira3d pretrain` on them (every volume its own class) validates on their "
    "'training' list, but pretraining on the output of `dira3d visual-words` (no validation words) or with dis_mode "
    "moco, barlow or simsiam (--override validation=false) runs without validation: its result is last.pt, not best.pt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dira3d prepare generic", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--modality", choices=MODALITIES, default=None,
                        help="ct: HU window; mr: percentiles. Not given: the modality an earlier run into --dst "
                             "recorded, else taken from the scans: ct when they have air (below -500 HU; a scan "
                             "without it then fails its case); scans without air, or a mix, stop the run before "
                             "anything is written (pass mr for MRI, ct for a CT without air)")
    parser.add_argument("--window", type=float, nargs=2, default=(-1000.0, 1000.0), metavar=("LO", "HI"),
                        help="CT HU window mapped to [0, 1] (default -1000 1000)")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOWER", "UPPER"),
                        help="MR percentiles mapped to [0, 1] (default 0.5 99.5)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                        help="resample to this spacing (one value or x y z); default: native")
    parser.add_argument("--sequences", nargs="+", default=None, metavar="NAME=PATTERN",
                        help="multi-sequence MRI, one folder per case: the sequence names (t1, t1ce, t2, flair) and "
                             "the file name pattern of each in its case folder (shell pattern, case-insensitive; an "
                             "image file or a DICOM series folder), in channel order, e.g. 't1=*T1w*' "
                             "'flair=*FLAIR*'; written as one volume per case, as prepare brats writes them "
                             "(implies --modality mr)")
    parser.add_argument("--label-pattern", default=None, metavar="PATTERN",
                        help="with --sequences: the file name pattern of the mask in each case folder, e.g. '*mask*'")
    parser.add_argument("--image-suffix", default="", help="stem suffix dropped from image names, e.g. _image")
    parser.add_argument("--label-suffix", default=None, help="stem suffix of mask files, e.g. _label")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="fraction of cases for validation")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="fraction of cases for a 'test' list (what `dira3d finetune` scores on your own labelled scans)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation and test choice")
    parser.add_argument("--patient-from", choices=PATIENT_FROM, default=None,
                        help="what makes scans one patient, kept in one part of the split: case (default: each scan "
                             "is its own patient), parent (the folder holding the scan, e.g. patient007/ct_2019.nii.gz "
                             "-> patient007), regex (--patient-regex)")
    parser.add_argument("--patient-regex", default=None, metavar="REGEX",
                        help="regular expression with one group, searched in each scan's path relative to --src "
                             r"(e.g. '^(patient\d+)' for patient007_a.nii.gz or patient007/ct.nii.gz); the group is "
                             "the patient id; implies --patient-from regex")
    return parser


def _larger_fraction(splits: dict[str, list[dict]], patients: int, part: str | None = None) -> str:
    """The advice for an empty ``part`` list (None: 'validation' if empty, else 'test'): a fraction that gives it a
    patient and leaves one to train on (the example was a fixed 0.1, which rounds to none again below 5 patients, the
    case it was given for)."""
    part = part or ("validation" if not splits["validation"] else "test")
    option, usual = ("--val-fraction", 0.1) if part == "validation" else ("--test-fraction", 0.2)
    other = sum(len({e["patient_id"] for e in splits.get(name, [])}) for name in ("validation", "test") if name != part)
    fraction = max(usual, np.ceil(100 / max(patients, 1)) / 100)
    if patients - other - int(round(fraction * patients)) < 1:
        return f"the {patients} patient(s) leave none for the {part!r} list beside training: add scans"
    return f"rerun with a larger fraction (e.g. {option} {fraction:g}; the volumes written are kept)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.spacing is not None and len(args.spacing) not in (1, 3):
        raise SystemExit("--spacing takes one value or three (x y z)")
    return run_prepare("dira3d prepare generic", prepare, args, modality=args.modality, window=args.window,
                       percentiles=args.percentiles, spacing=args.spacing, image_suffix=args.image_suffix,
                       label_suffix=args.label_suffix, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, seed=args.seed,
                       patient_from=args.patient_from or ("regex" if args.patient_regex is not None else "case"),
                       patient_regex=args.patient_regex, sequences=args.sequences, label_pattern=args.label_pattern)
