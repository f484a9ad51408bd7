"""CheXpert → resized 8-bit PNGs + a multi-label datalist with a chosen uncertain-label policy.

Input (``--src``): the folder holding ``CheXpert-v1.0-small/`` (or that folder itself; the full
resolution ``CheXpert-v1.0/`` works the same), with ``train.csv``, ``valid.csv`` and the JPEGs
they name in their ``Path`` column.

Label values: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank = not mentioned → 0.
Uncertain labels follow ``policy``: ``u-ones`` → 1, ``u-zeros`` → 0, ``lsr`` → a draw from
U(0.55, 0.85) (label-smoothing of U-Ones, Pham et al. 2021; ``numpy.random.default_rng(seed)``,
drawn in file order). Labels are the five evaluation pathologies by default (``FIVE``) or all
fourteen observations (``ALL``). ``frontal_only`` drops lateral views. A row with a bad value or
no ``patientNNNNN``, an image listed twice and an image missing on disk are failed cases of their
own (a bad row draws no ``lsr`` number), so ``--keep-going`` prepares the others.

Output (``--dst``): ``images/<train|valid>/patientNNNNN/studyN/viewN_frontal.png`` and
``chexpert_datalist.json``: ``test`` = the official ``valid.csv`` (radiologist consensus labels),
``training`` / ``validation`` = a seeded patient-level split of ``train.csv``. Entries are
``{"image", "case_id": "patientNNNNN", "label": [floats], "view": "Frontal"|"Lateral"}``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np

from dira3d.data.cxr import convert_image, add_size_argument, check_size, read_csv_rows
from dira3d.data.cxr_splits import (asked_no_validation, earlier_patient_split, split_entries, val_fraction_split_advice,
                                    warn_one_validation_image, write_patient_split)
from dira3d.data.errors import OR_KEEP_GOING, record_or_raise
from dira3d.data.io import DataError
from dira3d.data.runner import Case, CaseResult, add_common_arguments, batch_stopped, run_cases, run_prepare, case_outputs, write_datalist
from dira3d.utils.cli_help import DefaultsHelpFormatter

__all__ = ["ALL", "FIVE", "POLICIES", "LSR_RANGE", "apply_policy", "read_labels", "prepare", "main"]

ALL: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
# the competition's five evaluation pathologies, in the order the CheXpert paper reports them
FIVE: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
POLICIES = ("u-ones", "u-zeros", "lsr")
LSR_RANGE = (0.55, 0.85)
_PATIENT = re.compile(r"patient\d+")


def _value(cell: str, where: str) -> float:
    if cell == "":
        return 0.0  # not mentioned in the report: negative
    try:
        value = float(cell)
    except ValueError:
        value = float("nan")
    if value not in (1.0, 0.0, -1.0):
        raise DataError(None, f"{where}: label value {cell!r} is not 1.0, 0.0, -1.0 or blank")
    return value


def apply_policy(values: np.ndarray, policy: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Replace the uncertain (−1) entries of ``values`` according to ``policy``.

    Args:
        values: array of 1, 0, −1.
        policy: ``"u-ones"``, ``"u-zeros"`` or ``"lsr"``.
        rng: the generator ``lsr`` draws from (required for it), one draw per uncertain entry in
            row-major order.

    Returns:
        A float32 copy with no −1 left.

    Raises:
        ValueError: unknown policy, or ``lsr`` without ``rng``.
    """
    if policy not in POLICIES:
        raise ValueError(f"--policy {policy!r} is not known; choose one of {', '.join(POLICIES)}")
    out = np.array(values, dtype=np.float32)
    uncertain = out == -1.0
    if policy == "u-ones":
        out[uncertain] = 1.0
    elif policy == "u-zeros":
        out[uncertain] = 0.0
    else:
        if rng is None:
            raise ValueError("policy 'lsr' draws random labels: pass rng=numpy.random.default_rng(seed)")
        out[uncertain] = rng.uniform(*LSR_RANGE, size=int(uncertain.sum()))
    return out


def read_labels(csv_path: str | Path, labels: Sequence[str] = FIVE, frontal_only: bool = False,
                problems: dict[str, str] | None = None) -> list[dict]:
    """Rows of a CheXpert CSV as ``{"path", "patient", "view", "values": raw 1/0/−1 floats, "row"}``.

    Args:
        problems: when given, a row with a bad label value or a path without ``patientNNNNN`` is
            not raised: it is recorded here as ``{path: message}`` (``path`` as in the row; the
            message names the file, row, column and allowed values; see
            :func:`~dira3d.data.errors.record_or_raise`) and returned with all-zero ``values``, so
            it draws no ``lsr`` number and the draws of the other rows are the same as without it.

    Raises:
        DataError: missing columns; without ``problems``, also bad values or a path without ``patientNNNNN``.
    """
    rows = []
    required = ("Path", "Frontal/Lateral", *labels)
    for number, row in enumerate(read_csv_rows(csv_path, required), start=2):
        if frontal_only and row["Frontal/Lateral"] != "Frontal":
            continue
        where = f"{csv_path} row {number}"
        patient = _PATIENT.search(row["Path"])
        try:
            if patient is None:
                raise DataError(csv_path, f"row {number}: path {row['Path']!r} names no patientNNNNN folder")
            values = [_value(row[name], f"{where}, column {name!r}") for name in labels]
        except DataError as err:
            record_or_raise(problems, row["Path"], err, "; fix or remove the row")
            values = [0.0] * len(labels)
        rows.append({"path": row["Path"], "patient": patient.group(0) if patient else "",
                     "view": row["Frontal/Lateral"], "values": values, "row": number})
    return rows


def _resolve(csv_path: Path, relative: str) -> tuple[Path, str]:
    """The image file of a ``Path`` cell, and its path below the dataset folder (``train/...jpg``)."""
    parts = PurePosixPath(relative).parts
    inner = PurePosixPath(*parts[1:]) if len(parts) > 1 else PurePosixPath(relative)
    if ".." in parts or PurePosixPath(relative).is_absolute():
        raise DataError(csv_path, f"Path {relative!r} is absolute or contains '..'; use the CSV as downloaded")
    # the CSV paths start with the dataset folder name, which users sometimes rename
    for candidate in (csv_path.parent.parent / relative, csv_path.parent / inner):
        if candidate.is_file():
            return candidate, inner.as_posix()
    return csv_path.parent / inner, inner.as_posix()


def _find_csvs(src: Path) -> tuple[Path, Path]:
    for folder in [src, *sorted(p for p in src.iterdir() if p.is_dir())] if src.is_dir() else []:
        if (folder / "train.csv").is_file() and (folder / "valid.csv").is_file():
            return folder / "train.csv", folder / "valid.csv"
    raise DataError(src, "holds no train.csv + valid.csv (in it or in CheXpert-v1.0-small/); point --src at the "
                         "unzipped CheXpert download")


def _process(case: Case, size: int) -> dict:
    return convert_image(case.params["path"], case.outputs[0], size)


def prepare(src: str | Path, dst: str | Path, *, policy: str = "u-ones", labels: Sequence[str] = FIVE,
            frontal_only: bool = False, size: int = 512, val_fraction: float = 0.1, seed: int = 0,
            workers: int = 1, overwrite: bool = False, dry_run: bool = False, keep_going: bool = False,
            report_path: str | Path | None = None, progress: bool = True) -> list[CaseResult]:
    """Prepare CheXpert under ``dst`` (see the module docstring for the outputs).

    Args:
        policy: uncertain-label policy (``POLICIES``).
        labels: label columns, in order (default the five evaluation pathologies).
        frontal_only: keep frontal views only.
        size: output side in pixels (0 keeps the native size).
        val_fraction: fraction of the train.csv patients held out for validation.
        seed: seed of the patient-level split and of the ``lsr`` draws.

    Raises:
        DataError: missing or malformed CSVs. ValueError: bad settings.
    """
    src, dst = Path(src), Path(dst)
    size = check_size(size)
    apply_policy(np.zeros(1), policy, np.random.default_rng(0))  # validates the policy name up front
    unknown = [name for name in labels if name not in ALL]
    if unknown or not labels:
        raise ValueError(f"--labels {list(labels)}: {unknown or 'none given'}; choose among {list(ALL)}")
    train_csv, valid_csv = _find_csvs(src)
    rng = np.random.default_rng(seed)
    records: dict[str, dict] = {}  # case id → its first row
    problems: dict[str, str] = {}  # Path cell of a case's first row → why the case fails
    for split_name, csv_path in (("train", train_csv), ("test", valid_csv)):
        # a bad row is the failed case of its image (zero values: it draws no lsr number)
        rows = read_labels(csv_path, labels, frontal_only, problems)
        values = apply_policy(np.array([r["values"] for r in rows], np.float32).reshape(len(rows), len(labels)),
                              policy, rng)
        for row, label in zip(rows, values):
            try:
                path, inner = _resolve(csv_path, row["path"])
            except DataError as err:  # '..' or absolute: that row's image fails, the others go on
                record_or_raise(problems, row["path"], err, f" (row {row['row']})")
                path, inner = None, row["path"]
            case_id = str(PurePosixPath(inner).with_suffix(""))
            if case_id in records:
                first = records[case_id]
                record_or_raise(problems, first["path"], DataError(csv_path, f"rows {first['row']} and {row['row']} "
                                                                             f"both list image {row['path']}; use the "
                                                                             "CSV as downloaded"))
                continue
            missing = path is None or not path.is_file()
            if missing and path is not None:
                record_or_raise(problems, row["path"], DataError(
                    csv_path, f"row {row['row']}: image {row['path']} does not exist ({path}; partial download?); "
                              "unzip the whole download" + OR_KEEP_GOING * (not keep_going)))
            records[case_id] = {"split": split_name, "patient": row["patient"], "view": row["view"],
                                "label": [float(v) for v in label], "row": row["row"], "missing": missing,
                                "path": row["path"], "file": path, "csv": csv_path}
    cases = []
    for case_id, record in records.items():
        outputs, bad_id = case_outputs(case_id, [(dst / "images", ".png")], f"{record['csv']} row {record['row']}")
        # an id refused here is a Path cell _resolve refused already: its message is enough
        cases.append(Case(case_id, outputs, {"path": record["file"]}, error=problems.get(record["path"], "") or bad_id))
    if not cases:
        raise DataError(train_csv, "lists no image (after --frontal-only); nothing to prepare")
    results = run_cases(cases, partial(_process, size=size), out_dir=dst, workers=workers, overwrite=overwrite,
                        dry_run=dry_run, keep_going=keep_going, report_path=report_path, desc="chexpert",
                        progress=progress, source=src, datalists=[dst / "chexpert_datalist.json"],
                        settings={"size": size})
    if dry_run or batch_stopped(results, keep_going):
        return results

    done = {case.case_id: case for case, result in zip(cases, results) if result.ok}
    entries = {"train": [], "test": []}  # the CSV's own parts: train.csv (split below), valid.csv (test)
    for case_id, case in done.items():
        record = records[case_id]
        entries[record["split"]].append((record["patient"], {"image": case.outputs[0], "case_id": record["patient"],
                                                             "label": record["label"], "view": record["view"]}))
    split, lists = split_entries(entries["train"], val_fraction, seed=seed,  # a rerun keeps its patients' parts
                                 earlier=earlier_patient_split(dst, seed, val_fraction=val_fraction, of="train.csv patients"))
    lists["test"] = [entry for _, entry in entries["test"]]
    meta = {"dataset": "chexpert", "labels": list(labels), "policy": policy, "lsr_range": list(LSR_RANGE),
            "frontal_only": frontal_only, "size": size, "image_format": "png uint8 grey",
            "split": {"test": "official valid.csv", "training/validation": "patient-level split of train.csv",
                      "val_fraction": val_fraction, "seed": seed},
            "images_missing_on_disk": sum(r["missing"] for r in records.values()), "source": str(src.resolve())}
    write_datalist(dst / "chexpert_datalist.json", lists, meta,
                   split_advice=val_fraction_split_advice(split, of="train.csv patients", test_from="valid.csv"),
                   asked_empty=asked_no_validation(val_fraction))
    warn_one_validation_image(dst / "chexpert_datalist.json", lists)
    write_patient_split(dst, split, seed, val_fraction=val_fraction, of="train.csv patients")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dira3d prepare chexpert", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_common_arguments(parser)
    add_size_argument(parser)
    parser.add_argument("--policy", choices=POLICIES, default="u-ones",
                        help="uncertain (-1) labels: u-ones → 1, u-zeros → 0, lsr → U(0.55, 0.85) (default u-ones)")
    parser.add_argument("--labels", choices=("five", "all"), default="five",
                        help="the five evaluation pathologies (default) or all 14 observations")
    parser.add_argument("--frontal-only", action="store_true", help="drop lateral views")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of the train.csv patients held out for validation (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the lsr draws (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_prepare("dira3d prepare chexpert", prepare, args, policy=args.policy,
                       labels=FIVE if args.labels == "five" else ALL, frontal_only=args.frontal_only, size=args.size,
                       val_fraction=args.val_fraction, seed=args.seed)
