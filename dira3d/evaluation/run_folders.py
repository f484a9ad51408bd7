"""A fine-tuning run's hold on its folders: one run at a time, and no earlier model replaced unasked.

``train.json`` of every task bundle calls :func:`claim_run_folders` in ``initialize`` (before any dataset
is cached) and :func:`release_run_folders` in ``finalize``. MONAI bundles overwrite by default: a second
``python -m monai.bundle run`` with the same ``bundle_root`` replaced the first run's ``models/model.pt``
at its first validation and added its TensorBoard curves to the first run's in ``output_dir``, without a
word, and two runs at once replaced each other's ``model.pt`` in turn. ``dira3d finetune`` goes through the
same calls (its ``--output-dir`` is ``output_dir``, ``models/`` under it is ``ckpt_dir``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from dira3d.utils.atomic import remove_stale_temporaries_of
from dira3d.utils.folder_lock import FolderLock
from dira3d.utils.overrides import as_bool

__all__ = ["MODEL_FILE", "claim_run_folders", "earlier_run_files", "metric_reports", "release_run_folders"]

MODEL_FILE = "model.pt"
_HELD: dict[Path, FolderLock] = {}  # ckpt_dir -> the lock this process took for it


def _events(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("events.out.tfevents.*"))


def _metric_names(metrics_csv: Path) -> list[str]:
    """The metric names of a ``metrics.csv`` that MONAI's ``MetricsSaver`` wrote (one ``name<delimiter>value``
    line each); none when the file is absent or unreadable. Names that are not plain file-name parts are left out."""
    try:
        lines = metrics_csv.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    names = (re.split(r"[,\t; ]", line.strip(), maxsplit=1)[0] for line in lines)
    return [n for n in names if re.fullmatch(r"[A-Za-z0-9_.\-]+", n) and n.strip(".")]


def metric_reports(output_dir: str | os.PathLike, names: Iterable[str] = ()) -> list[Path]:
    """The per-case CSVs an evaluation's ``MetricsSaver`` wrote in ``output_dir``: ``<name>_raw.csv`` and
    ``<name>_summary.csv`` for each metric its ``metrics.csv`` lists, and for ``names`` (e.g. the metrics an
    earlier run's ``metrics.json`` records); and the per-case file of each split an evaluation can score,
    ``test_cases.csv``, ``holdout_cases.csv``, ... (:mod:`dira3d.evaluation.case_metrics`). Other files are not the
    evaluation's and are never listed."""
    from dira3d.evaluation.case_metrics import cases_file
    from dira3d.evaluation.datalists import SPLITS

    output_dir = Path(output_dir)
    wanted = dict.fromkeys([*_metric_names(output_dir / "metrics.csv"), *names])
    files = [output_dir / f"{name}{suffix}" for name in wanted for suffix in ("_raw.csv", "_summary.csv")
             if re.fullmatch(r"[A-Za-z0-9_.\-]+", str(name)) and str(name).strip(".")]
    return [p for p in files + [output_dir / cases_file(split) for split in SPLITS] if p.is_file()]


def earlier_run_files(ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike, metric_names: Iterable[str] = ()) -> list[Path]:
    """What an earlier training run (finished or not) left: ``model.pt`` and ``preprocessing.json`` in
    ``ckpt_dir``, the evaluation's ``metrics.csv`` and per-case CSVs (:func:`metric_reports`, with
    ``metric_names``) and the TensorBoard event files in ``output_dir``."""
    from dira3d.evaluation.preprocessing import PREPROCESSING_FILE

    ckpt_dir, output_dir = Path(ckpt_dir), Path(output_dir)
    names = [ckpt_dir / MODEL_FILE, ckpt_dir / PREPROCESSING_FILE, output_dir / "metrics.csv"]
    return [p for p in names if p.is_file()] + metric_reports(output_dir, metric_names) + _events(output_dir)


def claim_run_folders(ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: object = False) -> None:
    """Lock ``ckpt_dir`` for this run and refuse to replace an earlier run's model or curves unasked.

    Without ``overwrite``: a ``model.pt`` in ``ckpt_dir`` (a finished run, or one that was stopped after
    its first validation), or TensorBoard event files in ``output_dir`` (a run stopped before it), stops
    the run here. With ``overwrite``: the earlier event files, ``metrics.csv`` and the per-case CSVs it names
    (:func:`metric_reports`) are removed now (this run's curves would be drawn over them, and its evaluation
    would leave the earlier run's per-case results beside its own); the earlier ``model.pt`` stays until this run's first
    validation replaces it (:class:`~dira3d.evaluation.handlers.BestModelSaver`, which also replaces
    ``preprocessing.json`` beside it), so a run stopped before that keeps it. In a distributed run every
    rank checks, rank 0 alone locks and removes.

    Raises:
        FileExistsError: an earlier run's files, without ``overwrite`` (named, with the ways out).
        dira3d.utils.folder_lock.FolderInUseError: another process trains into ``ckpt_dir``.
    """
    overwrite = as_bool(overwrite, "overwrite")
    ckpt_dir, output_dir = Path(ckpt_dir), Path(output_dir)
    main = int(os.environ.get("RANK", "0") or 0) == 0
    key = ckpt_dir.resolve()
    if main and key not in _HELD:
        lock = FolderLock(ckpt_dir, what="ckpt_dir",
                          clash="a second training run into it would replace its model.pt in turn")
        _HELD[key] = lock.acquire()
    try:
        model, events = ckpt_dir / MODEL_FILE, _events(output_dir)
        if not overwrite and (model.is_file() or events):
            what = (f"ckpt_dir {ckpt_dir} already holds a model.pt, which this run would replace at its first validation"
                    if model.is_file() else
                    f"output_dir {output_dir} holds the TensorBoard files of an earlier run ({events[0].name}"
                    f"{f' and {len(events) - 1} more' if len(events) > 1 else ''}; it was stopped before its first "
                    "validation), which this run's curves would be drawn over")
            raise FileExistsError(f"{what}; pass --bundle_root (or --ckpt_dir and --output_dir) with another folder, "
                                  "or --overwrite True to replace that run")
        if main:  # a write of model.pt cut short by a kill (SIGKILL, SIGTERM) left its temporary file (dira3d.utils.atomic;
            # one a live writer holds is kept)
            remove_stale_temporaries_of(ckpt_dir / MODEL_FILE, what="training run")
        if overwrite and main:
            for path in metric_reports(output_dir) + [output_dir / "metrics.csv"] + events:
                path.unlink(missing_ok=True)
    except BaseException:
        release_run_folders(ckpt_dir)
        raise


def release_run_folders(ckpt_dir: str | os.PathLike) -> None:
    """Drop the lock :func:`claim_run_folders` took (nothing when this process holds none: other ranks,
    ``evaluate.json``, a second call)."""
    lock = _HELD.pop(Path(ckpt_dir).resolve(), None)
    if lock is not None:
        lock.release()
