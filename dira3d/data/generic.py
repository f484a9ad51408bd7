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
modules: reorient to RAS → normalise → optionally resample.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dira3d.data.errors import record_or_raise
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
from dira3d.data.modality import MODALITIES, check_hu, check_mr, check_not_a_mask, modality_from_scans, recorded_modality
from dira3d.data.normalize import normalize_mr, window_hu
from dira3d.data.runner import Case, CaseResult, add_common_arguments, batch_stopped, run_cases, run_prepare, safe_case_path, write_datalist
from dira3d.data.sequences import check_channels, find_sequence_cases, parse_sequences, stack_sequences
from dira3d.data.splits import extend_split
from dira3d.utils.cli_help import DefaultsHelpFormatter

__all__ = ["normalise_image", "prepare_mask", "discover", "patient_ids", "prepare", "main"]

PATIENT_FROM = ("case", "parent", "regex")


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
            else:
                add(images, _case_id(src, path, image_suffix_), path)
        if dicom and any(looks_like_dicom(Path(root) / n) for n in other) \
                and sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):
            add(images, _case_id(src, Path(root), "") if Path(root) != src else src.name, Path(root))
    for cid in sorted(set(masks) - set(images)):
        record_or_raise(problems, cid, DataError(masks[cid], f"mask has no matching image (expected case {cid!r}); "
                                                             "check --image-suffix / --label-suffix"))
    return [(cid, images.get(cid), masks.get(cid)) for cid in sorted(set(images) | set(masks))]


def _check_patient_setting(patient_from: str, patient_regex: str | None) -> re.Pattern | None:
    """The compiled ``--patient-regex`` (``None`` unless ``patient_from == "regex"``).

    Raises:
        ValueError: unknown ``patient_from``, a regex missing or given without ``"regex"``, a regex
            that does not compile or has not exactly one group.
    """
    if patient_from not in PATIENT_FROM:
        raise ValueError(f"--patient-from must be one of {PATIENT_FROM}, got {patient_from!r}")
    if patient_from != "regex":
        if patient_regex is not None:
            raise ValueError(f"--patient-regex is given but --patient-from is {patient_from!r}; "
                             "drop --patient-from (a regex implies it) or the regex")
        return None
    if not patient_regex:
        raise ValueError("--patient-from regex needs --patient-regex REGEX (one group: the patient id)")
    try:
        pattern = re.compile(patient_regex)
    except re.error as err:
        raise ValueError(f"--patient-regex {patient_regex!r} is not a valid regular expression: {err}") from None
    if pattern.groups != 1:
        raise ValueError(f"--patient-regex {patient_regex!r} has {pattern.groups} groups; it needs exactly one, "
                         r"the patient id (e.g. '^(patient\d+)'; write other groups as (?:...))")
    return pattern


def _patient_id(src: Path, path: Path, case_id: str, patient_from: str, pattern: re.Pattern | None) -> str:
    """The patient of one scan (see :func:`patient_ids`).

    Raises:
        DataError: ``parent`` for a scan directly in ``src``; a regex that does not match the path
            (or captures nothing).
    """
    if patient_from == "case":
        return case_id
    rel = path.relative_to(src).as_posix()
    if patient_from == "parent":
        parent = path.relative_to(src).parent.as_posix()
        if parent == ".":
            raise DataError(path, "lies directly in --src, so --patient-from parent finds no patient folder; move it "
                                  "into a folder of its patient, or use --patient-regex")
        return parent
    match = pattern.search(rel)
    if match is None or not match.group(1):
        found = "does not match" if match is None else "matches but its group captures nothing in"
        raise DataError(path, f"--patient-regex {pattern.pattern!r} {found} its path {rel!r} (relative to --src), so "
                              "its patient is unknown; fix the regex, or move the scan out of --src")
    return match.group(1)


def patient_ids(src: str | os.PathLike, found: Sequence[tuple[str, Path | None, Path | None]],
                patient_from: str = "case", patient_regex: str | None = None,
                problems: dict[str, str] | None = None) -> dict[str, str]:
    """The patient of each scan found by :func:`discover`, which the validation / test split keeps together.

    Args:
        src: the folder given to :func:`discover`.
        found: :func:`discover`'s ``(case_id, image_path, mask_path)``.
        patient_from: ``"case"`` (each scan is its own patient: the patient id is the case id),
            ``"parent"`` (the folder holding the scan, relative to ``src``, e.g. ``site_b/patient007``;
            for a DICOM series, the folder above the series folder) or ``"regex"``.
        patient_regex: with ``"regex"``: a regular expression with one group, searched
            (``re.search``) in the scan's path relative to ``src`` with ``/`` separators and its
            suffix (``patient007/ct_2019.nii.gz``; a DICOM series: its folder's path); the group is
            the patient id.
        problems: when given, a scan without a patient (a regex that does not match; ``parent`` for
            a scan directly in ``src``) is recorded here as ``{case_id: message}`` instead of raised;
            such a case, and one already in ``problems``, is left out of the result.

    Returns:
        ``{case_id: patient_id}``.

    Raises:
        ValueError: a bad ``patient_from`` / ``patient_regex`` (see ``--patient-regex``).
        DataError: without ``problems``, a scan without a patient.
    """
    pattern = _check_patient_setting(patient_from, patient_regex)
    src = Path(src)
    out: dict[str, str] = {}
    for cid, image_path, mask_path in found:
        if problems is not None and cid in problems:  # already failed (e.g. a mask without its image)
            continue
        try:
            out[cid] = _patient_id(src, image_path or mask_path, cid, patient_from, pattern)
        except DataError as err:
            record_or_raise(problems, cid, err)
    return out


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
    patterns = _check_sequence_settings(sequences, label_pattern, modality, image_suffix, label_suffix)
    if patterns:
        modality = "mr"
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    _check_patient_setting(patient_from, patient_regex)
    _check_src_outside_outputs(src, dst)
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
        found = discover(src, image_suffix, label_suffix, exclude=[dst], problems=problems)
    if not found:
        raise DataError(src, f"no scans found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series folders)")
    patients = patient_ids(src, found, patient_from, patient_regex, problems)
    unit = "case" if patient_from == "case" else "patient"
    # before any case: a bad split wastes no work (a case without a patient counts as one)
    _check_split_sizes(len(set(patients.values())) + sum(cid not in patients for cid, _, _ in found),
                       val_fraction, test_fraction, unit)
    dst = Path(dst)
    grouping = {"patient_from": patient_from, "patient_regex": patient_regex}
    _check_grouping(dst / "pretrain_datalist.json", src, grouping, overwrite)
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
    earlier = _earlier_parts(dst / "pretrain_datalist.json", src, {"val_fraction": val_fraction, "test_fraction": test_fraction,
                                                                  "seed": seed, **grouping})  # fmt: skip
    part = _split_patients(sorted({patients[c.case_id] for c in good}), val_fraction, test_fraction, seed, unit, earlier)
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
    # generic has no subsets: name its own options, and why an empty 'validation' list matters for the next step
    causes = [f"{option} is 0 (the default)" if fraction == 0 else
              f"{option} {fraction:g} of the {n_patients} patient(s) rounds to none (whole patients)"
              for part, option, fraction in (("validation", "--val-fraction", val_fraction), ("test", "--test-fraction", test_fraction))
              if part in splits and not splits[part]]
    advice = "; ".join(causes) + ("; `dira3d visual-words` (unless --val-neighbours 0) and pretraining with dis_mode moco, "
                                  "barlow or simsiam validate on the 'validation' list" if not splits["validation"] else "")
    example = "--val-fraction 0.1" if not splits["validation"] else "--test-fraction 0.2"
    advice += f"; rerun with a larger fraction (e.g. {example}; the volumes written are kept)"
    write_datalist(dst / "pretrain_datalist.json", splits, meta, split_advice=advice)
    return results


def _check_sequence_settings(sequences: str | Sequence[str] | None, label_pattern: str | None, modality: str | None,
                             image_suffix: str, label_suffix: str | None) -> dict[str, str]:
    """The ``{name: pattern}`` of ``--sequences`` (empty without it).

    Raises:
        ValueError: a bad ``--sequences``; ``--label-pattern`` without it; with it, ``--modality ct``,
            ``--image-suffix`` or ``--label-suffix`` (single-scan options).
    """
    if sequences is None:
        if label_pattern is not None:
            raise ValueError("--label-pattern names the mask in a case folder of --sequences; give --sequences too, "
                             "or pair masks with single scans by --label-suffix")
        return {}
    patterns = parse_sequences(sequences)
    if modality == "ct":
        raise ValueError("--sequences stacks MR sequences (scaled as mr); drop --modality ct")
    if image_suffix or label_suffix is not None:
        raise ValueError("--image-suffix / --label-suffix pair single scans; with --sequences the mask is found by "
                         "--label-pattern (e.g. --label-pattern '*mask*')")
    if label_pattern is not None and not label_pattern.strip():
        raise ValueError("--label-pattern is empty; give the mask's file name pattern, e.g. '*mask*'")
    return patterns


def _check_volume_channels(case: Case, channels: int) -> None:
    """``check_outputs`` of ``--sequences``: a volume of another run (other sequences, a single scan) is redone."""
    check_channels(case.outputs[0], channels)


def _earlier_datalist(datalist: Path, src: str | os.PathLike) -> tuple[dict, dict] | None:
    """``(datalist, its patient grouping)`` of the datalist an earlier run of this ``src`` wrote (a datalist
    written before the grouping options existed was split by case); None when there is none, it cannot be
    read, or it was prepared from another source (:func:`~dira3d.data.runner.run_cases` refuses that)."""
    try:
        data = json.loads(datalist.read_text(encoding="utf-8"))
        meta = data["meta"]
        if meta.get("source") != str(Path(src).resolve()):
            return None
        return data, {"patient_from": meta.get("patient_from", "case"), "patient_regex": meta.get("patient_regex")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _earlier_parts(datalist: Path, src: str | os.PathLike, rule: dict) -> dict[str, list[str]] | None:
    """Part → patient ids of the datalist an earlier run of this ``src`` wrote with the same split ``rule``
    (fractions, seed, grouping; as its meta records them); None when there is none or it differs."""
    earlier = _earlier_datalist(datalist, src)
    if earlier is None:
        return None
    data, grouping = earlier
    try:
        meta = data["meta"]
        recorded = {"val_fraction": meta["val_fraction"], "test_fraction": meta["test_fraction"], "seed": meta["seed"],
                    **grouping}
        if recorded != rule:
            return None
        return {name: [str(e.get("patient_id", e["case_id"])) for e in data.get(name, [])]
                for name in ("training", "validation", "test")}
    except (KeyError, TypeError, AttributeError):
        return None


def _split_patients(patients: Sequence[str], val_fraction: float, test_fraction: float, seed: int,
                    unit: str = "patient", earlier: dict[str, list[str]] | None = None) -> dict[str, str]:
    """``{patient: "training" | "validation" | "test"}``: a seeded permutation of ``patients`` (in
    the order given: sorted), whose first ``val_fraction`` go to validation and the next
    ``test_fraction`` to test (each rounded; see :func:`_check_split_sizes`). With ``earlier`` (the
    split of an earlier run of the same rule) its patients keep their parts and only new ones are
    dealt out (:func:`dira3d.data.splits.extend_split`)."""
    n_val, n_test = _check_split_sizes(len(patients), val_fraction, test_fraction, unit)
    kept = extend_split(patients, {"training": len(patients) - n_val - n_test, "validation": n_val, "test": n_test},
                        seed, earlier)
    if kept is not None:
        return {patient: name for name, ids in kept.items() for patient in ids}
    order = np.random.default_rng(seed).permutation(len(patients))
    part = dict.fromkeys(patients, "training")
    part.update({patients[i]: "validation" for i in order[:n_val]})
    part.update({patients[i]: "test" for i in order[n_val:n_val + n_test]})
    return part


def _check_split_sizes(count: int, val_fraction: float, test_fraction: float, unit: str = "case") -> tuple[int, int]:
    """``(validation, test)`` counts of ``unit`` (each fraction of ``count``, rounded), leaving training at least one.

    Raises:
        ValueError: the two parts would take every case (patient).
    """
    n_val, n_test = int(round(val_fraction * count)), int(round(test_fraction * count))
    if count and n_val + n_test >= count:
        raise ValueError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} take {n_val} + {n_test} of "
                         f"the {count} {unit}(s), leaving none to train on; lower them (or add scans)")
    return n_val, n_test


def _check_grouping(datalist: Path, src: str | os.PathLike, grouping: dict[str, str | None], overwrite: bool) -> None:
    """Refuse to re-split ``datalist`` (of this ``src``) with another patient grouping: its validation /
    test lists would change under results already made with them. A datalist written before the
    option existed was split by case. An unreadable datalist or one of another ``src`` is left to
    :func:`~dira3d.data.runner.run_cases`, which refuses it with its own message.

    Raises:
        DataError: the datalist records another grouping and ``overwrite`` is false.
    """
    earlier = None if overwrite else _earlier_datalist(datalist, src)
    if earlier is None:
        return
    old = earlier[1]

    def flags(g: dict) -> str:
        return f"--patient-regex {g['patient_regex']!r}" if g["patient_from"] == "regex" else f"--patient-from {g['patient_from']}"

    if old != grouping:
        raise DataError(datalist, f"was split by patient with {flags(old)} (now {flags(grouping)}); re-splitting would "
                                  "move scans between training, validation and test. Choose another --dst, move this "
                                  "datalist away to re-split the volumes already prepared (they do not depend on the "
                                  "grouping), or pass --overwrite to redo every case")


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
