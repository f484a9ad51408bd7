"""The patient-level split of the 2D chest X-ray preparations (ChestX-ray14, CheXpert, SIIM-ACR, Montgomery,
``dira3d prepare radiographs``) and its ``split.json`` record.

:func:`patient_split` deals patients into training / validation (/ test) by fractions with
:func:`dira3d.data.splits.split_patients` (seeded, reproducible); :func:`split_entries` does it for datalist
entries tagged with their patient; :func:`write_patient_split` records the split in ``split.json`` and
:func:`earlier_patient_split` reads back the one an earlier run recorded with the same rule, so that a rerun keeps its
patients' parts; :func:`warn_one_validation_image` warns about a 'validation' list of one image and
:func:`fraction_split_advice` / :func:`val_fraction_split_advice` say what to do about an empty list (and
:func:`asked_no_validation` names the one ``--val-fraction 0`` asked for); :func:`write_fraction_datalist`,
:func:`fraction_split_parser` and :func:`run_fraction_prepare` are the ends the prepares split by both fractions
(SIIM-ACR, Montgomery) share. The file records
the method as ``dira3d.data.cxr.patient_split`` (:data:`SPLIT_METHOD`), the module these functions were first in, so
that files written before they moved here still match.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from dira3d.data.cxr import add_size_argument
from dira3d.data.runner import add_common_arguments, run_prepare, warn_one_validation, write_datalist
from dira3d.data.splits import earlier_split, split_patients, write_split_file
from dira3d.utils.cli_help import DefaultsHelpFormatter

__all__ = [
    "SPLIT_METHOD",
    "patient_split",
    "split_entries",
    "write_patient_split",
    "earlier_patient_split",
    "add_split_arguments",
    "warn_one_validation_image",
    "fraction_split_advice",
    "val_fraction_split_advice",
    "asked_no_validation",
    "write_fraction_datalist",
    "fraction_split_parser",
    "run_fraction_prepare",
]


def patient_split(patients: Sequence[str], val_fraction: float, test_fraction: float = 0.0,
                  seed: int = 0, earlier: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Seeded patient-level split into training / validation (/ test) by fractions of the patients.

    Uses :func:`dira3d.data.splits.split_patients` (sorted ids, ``default_rng(seed)`` permutation,
    largest-remainder sizes), so the same ids and seed always give the same split.

    Args:
        patients: patient ids (duplicates are merged).
        val_fraction: fraction of the patients for validation, in [0, 1).
        test_fraction: fraction for test, in [0, 1); 0 makes no test part.
        seed: permutation seed.
        earlier: the split an earlier run recorded (:func:`earlier_patient_split`): its patients keep
            their parts, only new patients are dealt out.

    Returns:
        ``{"training": [...], "validation": [...](, "test": [...])}``, disjoint, covering ``patients``.

    Raises:
        ValueError: fractions outside [0, 1) or summing to 1 or more (names the options).
    """
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} {value} must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"--val-fraction {val_fraction} + --test-fraction {test_fraction} leave no training "
                         "patients; make their sum smaller than 1")
    parts = {"training": 1.0 - val_fraction - test_fraction, "validation": val_fraction}
    if test_fraction > 0:
        parts["test"] = test_fraction
    ids = sorted(set(patients))
    if not ids:
        return {name: [] for name in parts}
    # integer reference sizes in parts per million (split_patients scales them to len(ids))
    return split_patients(ids, {k: int(round(v * 1_000_000)) for k, v in parts.items()}, seed=seed, earlier=earlier)


def split_entries(entries: Sequence[tuple[str, dict]], val_fraction: float, test_fraction: float = 0.0,
                  seed: int = 0, earlier: Mapping[str, Sequence[str]] | None = None,
                  ) -> tuple[dict[str, list[str]], dict[str, list[dict]]]:
    """Patient-level split (:func:`patient_split`) of datalist entries, each tagged with its patient.

    Args:
        entries: ``(patient id, datalist entry)`` pairs; a patient may own several entries.
        val_fraction: fraction of the patients for validation, in [0, 1).
        test_fraction: fraction for test, in [0, 1); 0 makes no test part.
        seed: permutation seed.
        earlier: an earlier run's split to keep (see :func:`patient_split`).

    Returns:
        ``(split, lists)``: part name → patient ids, and part name → the entries of those patients
        (in the order of ``entries``).

    Raises:
        ValueError: bad fractions (see :func:`patient_split`).
    """
    split = patient_split([patient for patient, _ in entries], val_fraction, test_fraction, seed, earlier)
    part_of_patient = {p: name for name, ids in split.items() for p in ids}
    lists: dict[str, list[dict]] = {name: [] for name in split}
    for patient, entry in entries:
        lists[part_of_patient[patient]].append(entry)
    return split, lists


# the method name split.json records: the module these functions came from (dira3d.data.cxr), kept so that an
# earlier run's split.json still matches the rule and its patients keep their parts (earlier_split compares it)
SPLIT_METHOD = "dira3d.data.cxr.patient_split"


def _split_rule(seed: int, details: Mapping[str, object]) -> dict[str, object]:
    return {"method": SPLIT_METHOD, "seed": seed, **details}


def write_patient_split(dst: str | os.PathLike, split: dict[str, list[str]], seed: int, **details) -> Path:
    """Record a :func:`patient_split` as ``dst/split.json`` (method, seed and ``details``, e.g. the fractions).

    Returns:
        The path written.
    """
    return write_split_file(Path(dst) / "split.json", split, _split_rule(seed, details))


def earlier_patient_split(dst: str | os.PathLike, seed: int, **details) -> dict[str, list[str]] | None:
    """The split an earlier run into ``dst`` recorded with the same seed and ``details`` (see
    :func:`write_patient_split`), for :func:`patient_split`'s ``earlier``; None when there is none."""
    return earlier_split(Path(dst) / "split.json", _split_rule(seed, details))


def add_split_arguments(parser, test_fraction: float = 0.2) -> None:
    """Add ``--val-fraction`` (default 0.1), ``--test-fraction`` and ``--seed`` (patient split) to a parser."""
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of patients for validation (0.1)")
    parser.add_argument("--test-fraction", type=float, default=test_fraction,
                        help=f"fraction of patients for test ({test_fraction})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split (default 0)")


def warn_one_validation_image(path: str | os.PathLike, lists: Mapping[str, list]) -> None:
    """Warn, as ``dira3d prepare generic`` does, when the datalist ``path`` just written holds one 'validation' image
    (the default ``--val-fraction`` 0.1 of a few patients): 2D pretraining with Barlow Twins refuses it."""
    warn_one_validation(path, lists, "Barlow Twins pretraining on it (`dira3d pretrain --config 2d.json --config "
                        "2d_barlow.json`, which validates on that list) needs", item="image", written="PNGs")


def fraction_split_advice(split: Mapping[str, Sequence[str]]) -> str:
    """What the warning about an empty list of a datalist split by ``--val-fraction`` / ``--test-fraction`` (SIIM-ACR,
    Montgomery) says to do: :func:`~dira3d.data.datalist_writer.write_datalist`'s ``split_advice``, naming only options
    those prepares have (not LUNA16's subsets). ``split``: the parts' patients, the count the fractions were cut over."""
    return (f"--val-fraction / --test-fraction are cut over the {sum(map(len, split.values()))} patient(s) prepared "
            "and round to whole patients, each part needing one: prepare more patients, or, with enough, rerun with a "
            "larger fraction for the empty list (the PNGs written are kept)")


def val_fraction_split_advice(split: Mapping[str, Sequence[str]], of: str, test_from: str) -> str:
    """:func:`fraction_split_advice` for CheXpert and ChestX-ray14, whose prepares take ``--val-fraction`` alone: their
    'test' list is the images of the official ``test_from`` found. ``of``: what ``split``'s patients are."""
    return (f"--val-fraction is cut over the {sum(map(len, split.values()))} {of} prepared and rounds to whole "
            "patients, each part needing one: prepare more patients, or, with enough, rerun with another "
            "--val-fraction (the PNGs written are kept); the "
            f"'test' list holds the images of {test_from} found under --src")


def asked_no_validation(val_fraction: float, about: str = "fine-tuning holds out its own patients") -> dict[str, str]:
    """:func:`~dira3d.data.datalist_writer.write_datalist`'s ``asked_empty`` for a prepare split by ``--val-fraction``: 0 asks
    for no 'validation' list (the 80 / 20 % form), so that empty list gets a note, not the warning with a rerun; a
    ``--test-fraction`` 0 makes no 'test' list. ``about``: what the note adds (a datalist with labels: fine-tuning's
    own holdout)."""
    return {"validation": f"--val-fraction 0 ({about})"} if val_fraction == 0 else {}


def write_fraction_datalist(path: str | os.PathLike, lists: dict[str, list[dict]], meta: dict,
                            split: dict[str, list[str]], seed: int, val_fraction: float, test_fraction: float) -> None:
    """Write the datalist ``path`` of a prepare split by ``--val-fraction`` / ``--test-fraction`` (SIIM-ACR, Montgomery)
    with their advice (:func:`fraction_split_advice`, :func:`asked_no_validation`), warn about a 'validation' list of
    one image, and record the split in ``split.json`` beside it (:func:`write_patient_split`)."""
    path = Path(path)
    write_datalist(path, lists, meta, split_advice=fraction_split_advice(split),
                   asked_empty=asked_no_validation(val_fraction))
    warn_one_validation_image(path, lists)
    write_patient_split(path.parent, split, seed, val_fraction=val_fraction, test_fraction=test_fraction)


def fraction_split_parser(prog: str, doc: str, test_fraction: float = 0.2) -> argparse.ArgumentParser:
    """The parser of a 2D prepare split by ``--val-fraction`` / ``--test-fraction``: the common options, ``--size`` and
    :func:`add_split_arguments`; the description is ``doc``'s first paragraph (the module docstring)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_common_arguments(parser)
    add_size_argument(parser)
    add_split_arguments(parser, test_fraction=test_fraction)
    return parser


def run_fraction_prepare(prog: str, prepare: Callable, args: argparse.Namespace, **settings) -> int:
    """:func:`~dira3d.data.runner.run_prepare` with the options of :func:`fraction_split_parser` (and ``settings``)."""
    return run_prepare(prog, prepare, args, size=args.size, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, seed=args.seed, **settings)
