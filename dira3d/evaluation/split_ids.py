"""Which cases each split of a fine-tuning run holds: ``splits.json`` in the run's folder, and a short digest of each
split in its ``metrics.json`` (``split_digests``) and in ``dira3d experiment``'s ``results.csv`` (whose split columns
:func:`split_columns` reads from a run's ``metrics.json``).

``metrics.json`` records how many cases, patients and positives each split holds (``splits``,
:func:`dira3d.evaluation.split_checks.describe_split`); two runs of the same sizes may still have trained on other
cases (a change of the subset rules that kept the counts, e.g. the nested label fractions of 2026-11-26). The ids
make the splits comparable: a case is its ``image`` path relative to the datalist's folder (``images/p001.nii.gz``;
absolute where it lies outside that folder; several images of one entry joined by ``+``), a stable id of every
prepared datalist (each candidate cube and each crop has its own file); a patient is its ``patient_id``, else
its ``case_id`` (:func:`dira3d.evaluation.datalists.patient_of`). The digest of a split is the first 16 hex digits of
the sha256 of its sorted case ids joined by newlines, so it can be recomputed from ``splits.json``::

    python -c "import hashlib, json; s = json.load(open('splits.json'))['train']; \\
    print(hashlib.sha256('\\n'.join(s['cases']).encode()).hexdigest()[:16], s['digest'])"
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from dira3d.evaluation.datalists import patient_of
from dira3d.utils.atomic import atomic_write_text

__all__ = ["SPLITS_FILE", "DIGEST_LENGTH", "DIGEST_FIELDS", "SPLIT_FIELDS", "case_id", "split_digest", "split_ids",
           "write_splits", "split_columns", "scored_split"]

SPLITS_FILE = "splits.json"  # in a fine-tuning run's output folder
DIGEST_LENGTH = 16  # hex digits of the sha256 kept: 64 bits, no accidental clash between a grid's splits


def case_id(entry: Mapping, root: Path | None) -> str:
    """The id of a datalist entry (already resolved by ``load_split``: absolute paths): its ``image`` path relative
    to ``root`` (the datalist's folder), as POSIX text; absolute where it lies outside ``root`` (or ``root`` is None);
    several images joined by ``+``; an entry without ``image`` is its ``case_id``."""
    image = entry.get("image")
    if image is None:
        return str(entry.get("case_id"))
    images = image if isinstance(image, (list, tuple)) else [image]
    return "+".join(_relative(str(p), root) for p in images)


def _relative(path: str, root: Path | None) -> str:
    if root is not None and os.path.isabs(path):
        relative = os.path.relpath(os.path.normpath(path), os.path.normpath(str(root)))
        if relative != ".." and not relative.startswith(".." + os.sep):
            return Path(relative).as_posix()
    return Path(path).as_posix()


def split_digest(ids: list[str]) -> str:
    """The first :data:`DIGEST_LENGTH` hex digits of the sha256 of ``ids`` sorted and joined by newlines."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:DIGEST_LENGTH]


def split_ids(entries: list[Mapping], root: Path | None) -> dict:
    """``{"digest", "cases", "patients"}`` of a split: its sorted case ids (:func:`case_id`; one per entry, so a
    case listed twice is there twice), their digest (:func:`split_digest`) and its sorted distinct patients."""
    cases = sorted(case_id(e, root) for e in entries)
    patients = sorted({patient_of(e) for e in entries if "case_id" in e or "patient_id" in e})
    return {"digest": split_digest(cases), "cases": cases, "patients": patients}


def write_splits(out: Path, datalist: str | os.PathLike | None, entries: Mapping[str, list[Mapping]]) -> dict[str, str]:
    """Write ``out/splits.json`` (the datalist, then each split's :func:`split_ids`, e.g. ``train``, ``holdout``,
    ``test``) atomically; returns the digests (``{split: digest}``) for ``metrics.json``'s ``split_digests``."""
    root = Path(datalist).resolve().parent if datalist else None
    splits = {name: split_ids(list(items), root) for name, items in entries.items() if items}
    record = {"datalist": str(Path(datalist).resolve()) if datalist else None,
              "ids": "cases: image paths relative to the datalist's folder; patients: patient_id, else case_id; "
                     f"digest: sha256 of the sorted cases joined by newlines, first {DIGEST_LENGTH} hex digits",
              **splits}
    atomic_write_text(out / SPLITS_FILE, json.dumps(record, indent=1))
    return {name: split["digest"] for name, split in splits.items()}


# the test split's size and positives, the number of training cases, and the digests of the cases of the training,
# holdout and test splits (split_columns); may be empty, and absent from a results.csv written before 2026-11-26
# (train_cases and the digests: 2026-11-27; its rows are read and kept; the columns are added when a run is added)
DIGEST_FIELDS = ["train_digest", "holdout_digest", "test_digest"]
SPLIT_FIELDS = ["test_cases", "test_positive", "train_cases"] + DIGEST_FIELDS


def scored_split(result: Mapping) -> str:
    """The split a fine-tuning run's ``metrics`` were scored on, from its ``metrics.json`` (``result``): its
    ``eval_split``; a ``metrics.json`` written before that was recorded (2026-11-27) scored ``settings.eval_split``
    when given (``--set eval_split=holdout``: it still filed that split under ``splits.test``), else the test split."""
    recorded = result.get("eval_split")
    if recorded is None:
        recorded = (result.get("settings") or {}).get("eval_split")
    return "test" if recorded is None else str(recorded)


def split_columns(run_dir: Path, metric: str, value: float) -> dict[str, str]:
    """``test_cases`` and ``test_positive`` of a finished run, from ``splits.test`` of its ``metrics.json``
    (:func:`dira3d.evaluation.split_checks.describe_split`): the test split's number of cases and its positives,
    a number (binary classification: entries of class 1; segmentation: cases with foreground) or, multi-label,
    the positives of each class in class order joined by ``;`` (``"3;0;12"``); ``train_cases``, from
    ``splits.train``: the cases the network trained on (the label fraction's selection less the early-stopping
    holdout); ``train_digest``, ``holdout_digest``, ``test_digest``, from ``split_digests``: which cases each split
    holds (:mod:`dira3d.evaluation.split_ids`, listed in the run's ``splits.json``). ``""`` where not known: no
    ``metrics.json`` (a runner that writes none), one of an earlier run (its ``metric`` is not ``value``), or no
    such count recorded (a segmentation split without flags or scored masks); the test split's columns are ``""``
    too for a run that scored another split (:func:`scored_split`)."""
    columns = dict.fromkeys(SPLIT_FIELDS, "")
    try:
        result = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        saved = result["metrics"][metric]
        if saved is None or float(saved) != value:
            return columns
        scored_test = scored_split(result) == "test"  # else no test split was scored (an earlier dira3d filed the
        # scored holdout under splits.test: not read as the test split's)
        test = result["splits"]["test"] if scored_test else {}
        cases, positive = test.get("cases"), test.get("positive")
        if cases is not None:
            columns["test_cases"] = str(int(cases))
        if positive is not None:
            columns["test_positive"] = (";".join(str(int(p)) for p in positive) if isinstance(positive, list)
                                        else str(int(positive)))
        train = result["splits"].get("train") or {}
        if train.get("cases") is not None:
            columns["train_cases"] = str(int(train["cases"]))
        digests = result.get("split_digests") or {}
        names = ("train", "holdout", "test") if scored_test else ("train", "holdout")
        columns.update({f"{name}_digest": str(digests[name]) for name in names if digests.get(name)})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # unreadable or of another layout: not known
        return dict.fromkeys(SPLIT_FIELDS, "")
    return columns
