"""Patients and the validation / test split of ``dira3d prepare generic``.

Which scans are one patient (``--patient-from``, ``--patient-regex``: :func:`patient_ids`), the seeded
split over patients that keeps an earlier run's split when the same rule is rerun (:func:`patient_parts`,
its sizes checked by :func:`check_split_sizes`, the earlier split read back from the datalist by
:func:`earlier_parts`), and the refusal to re-split a datalist with another patient grouping
(:func:`check_grouping`). :mod:`dira3d.data.generic` re-exports :func:`patient_ids` and uses the rest.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dira3d.data.errors import DataError, record_or_raise
from dira3d.data.splits import extend_split

__all__ = ["PATIENT_FROM", "patient_ids", "check_patient_setting", "check_split_sizes", "patient_parts",
           "earlier_parts", "check_grouping"]

PATIENT_FROM = ("case", "parent", "regex")


def check_patient_setting(patient_from: str, patient_regex: str | None) -> re.Pattern | None:
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
    pattern = check_patient_setting(patient_from, patient_regex)
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


def earlier_parts(datalist: Path, src: str | os.PathLike, rule: dict) -> dict[str, list[str]] | None:
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


def patient_parts(patients: Sequence[str], val_fraction: float, test_fraction: float, seed: int,
                  unit: str = "patient", earlier: dict[str, list[str]] | None = None) -> dict[str, str]:
    """``{patient: "training" | "validation" | "test"}``: a seeded permutation of ``patients`` (in
    the order given: sorted), whose first ``val_fraction`` go to validation and the next
    ``test_fraction`` to test (each rounded; see :func:`check_split_sizes`). With ``earlier`` (the
    split of an earlier run of the same rule) its patients keep their parts and only new ones are
    dealt out (:func:`dira3d.data.splits.extend_split`)."""
    n_val, n_test = check_split_sizes(len(patients), val_fraction, test_fraction, unit)
    kept = extend_split(patients, {"training": len(patients) - n_val - n_test, "validation": n_val, "test": n_test},
                        seed, earlier)
    if kept is not None:
        return {patient: name for name, ids in kept.items() for patient in ids}
    order = np.random.default_rng(seed).permutation(len(patients))
    part = dict.fromkeys(patients, "training")
    part.update({patients[i]: "validation" for i in order[:n_val]})
    part.update({patients[i]: "test" for i in order[n_val:n_val + n_test]})
    return part


def check_split_sizes(count: int, val_fraction: float, test_fraction: float, unit: str = "case") -> tuple[int, int]:
    """``(validation, test)`` counts of ``unit`` (each fraction of ``count``, rounded), leaving training at least one.

    Raises:
        ValueError: the two parts would take every case (patient).
    """
    n_val, n_test = int(round(val_fraction * count)), int(round(test_fraction * count))
    if count and n_val + n_test >= count:
        raise ValueError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} take {n_val} + {n_test} of "
                         f"the {count} {unit}(s), leaving none to train on; lower them (or add scans)")
    return n_val, n_test


def check_grouping(datalist: Path, src: str | os.PathLike, grouping: dict[str, str | None], overwrite: bool) -> None:
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
