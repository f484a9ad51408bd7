"""What :func:`~dira3d.data.runner.run_cases` checks and holds before any case runs.

A rerun into ``--dst`` must not mix in another ``--src`` or outputs made with other settings, nor
replace a file that is not a report, nor another dataset's report and datalists (:func:`check_rerun`,
:func:`check_other_dataset`: the dataset is read from ``--dst``'s ``prepared.json``, which every run writes there
(:func:`record_dataset`) so that the folder names its dataset and source wherever ``--report`` goes, or, in a folder
prepared before it, from its ``report.json``); existing outputs count as done only when
they are not empty and the dataset's ``check_outputs`` accepts them (:func:`why_not_done`); and ``--dst``
is locked so that two runs cannot write into it at once (:func:`lock_output_folder`, kept until a ``dira3d
prepare`` command has written its datalists: :func:`locks_held_until_done`, :func:`release_when_done`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from dira3d.data.cases import Case
from dira3d.data.errors import DataError
from dira3d.utils.atomic import atomic_write_text, check_writable
from dira3d.utils.folder_lock import FolderInUseError, FolderLock

__all__ = ["why_not_done", "check_rerun", "check_other_dataset", "is_earlier_output", "locks_held_until_done", "release_when_done",
           "lock_output_folder", "record_dataset", "RECORD_NAME"]

# in --dst: the dataset, --src, settings and --report path of the last run into it (the report may be elsewhere)
RECORD_NAME = "prepared.json"
_RECORD_MARK = "dira3d prepare"  # its "written_by": a prepared.json of the user's is not replaced


def why_not_done(case: Case, check_outputs: Callable[[Case], Any] | None) -> str:
    """Why the existing outputs of ``case`` do not count as done: an empty file, or what
    ``check_outputs`` raised; ``""`` when they do."""
    empty = [str(p) for p in case.outputs if Path(p).stat().st_size == 0]
    if empty:
        return f"{empty[0]} is empty"
    if check_outputs is not None:
        try:
            check_outputs(case)
        except (ValueError, OSError) as err:  # DataError / FileContentError name the file
            return str(err)
    return ""


def _same_setting(old: Any, new: Any) -> bool:
    """Recorded and requested setting agree (JSON forms: tuples are lists, 3 == 3.0)."""
    return json.loads(json.dumps(old)) == json.loads(json.dumps(new))


def check_rerun(out_dir: Path, source: str | os.PathLike | None, datalists: Sequence[str | os.PathLike],
                report: Path, desc: str, overwrite: bool, settings: Mapping[str, Any] | None = None) -> None:
    """Refuse a rerun that would mix in another ``--src``, outputs made with other ``settings`` (their
    cases would be skipped while the datalist claims the new settings), or replace a file that is not a report (nor a
    ``prepared.json`` in ``out_dir`` that is not :func:`record_dataset`'s); the source and settings are read from the
    datalists, this dataset's report in ``out_dir`` and its ``prepared.json``."""
    if report.is_dir():
        raise DataError(report, "is a folder; --report must be a file path")
    if overwrite:
        return
    record_path = out_dir / RECORD_NAME
    record = _record(record_path)
    if record_path.exists() and record is None:
        raise DataError(record_path, "exists and is not the record dira3d prepare keeps in --dst; move it away, choose "
                                     "another --dst, or pass --overwrite to replace it")
    check_other_dataset(out_dir, report, desc)
    new = None if source is None else str(Path(source).resolve())
    recorded = []  # (file, source it records)
    written_with = []  # (file, the settings it records)
    for path in map(Path, datalists if new else ()):
        if path.exists():
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))["meta"]
                recorded.append((path, meta.get("source")))
                written_with.append((path, dict(meta)))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise DataError(path, "exists and is not a datalist written by dira3d prepare; move it away, "
                                      "choose another --dst, or pass --overwrite to replace it") from None
    if report.exists():
        try:
            old = json.loads(report.read_text(encoding="utf-8"))
            is_report = isinstance(old, dict) and {"summary", "cases"} <= set(old)
        except (OSError, ValueError):
            is_report = False
        if not is_report:
            raise DataError(report, "exists and is not a dira3d prepare report; choose another --report path, "
                                    "or pass --overwrite to replace it")
        if new and old.get("desc") == desc and report.parent.resolve() == out_dir.resolve():
            # an earlier run of this dataset into this --dst, which may have stopped before its datalist
            recorded.append((report, old.get("source")))
            if isinstance(old.get("settings"), dict):
                written_with.append((report, old["settings"]))
    if new and record is not None and record.get("desc") == desc:  # an earlier run into --dst, its report elsewhere
        recorded.append((record_path, record.get("source")))
        if isinstance(record.get("settings"), dict):
            written_with.append((record_path, record["settings"]))
    for path, old_source in recorded:
        if old_source is not None and old_source != new:
            raise DataError(path, f"was prepared from --src {old_source}, not {new}; choose another --dst, or pass "
                                  "--overwrite to redo every case from the new source")
    for path, old_settings in written_with:
        changed = [k for k in (settings or {}) if k in old_settings and not _same_setting(old_settings[k], settings[k])]
        if changed:
            what = ", ".join(f"{k} {json.dumps(old_settings[k])} (now {json.dumps(settings[k])})" for k in changed)
            raise DataError(path, f"records volumes prepared with {what}; the cases already written would be "
                                  "skipped and keep the old settings. Choose another --dst, or pass --overwrite to "
                                  "redo every case with the new settings")


def _record(path: Path) -> dict | None:
    """The record :func:`record_dataset` wrote at ``path``; None when there is none (or it is something else)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and old.get("written_by") == _RECORD_MARK else None


def record_dataset(out_dir: Path, desc: str, source: str | os.PathLike | None, settings: Mapping[str, Any] | None,
                   report: Path) -> None:
    """Write ``out_dir/prepared.json``: the dataset (``desc``), ``--src``, settings and ``--report`` path of this run,
    before its cases, so that ``out_dir`` names them even when the report goes elsewhere or the run stops early
    (unchanged content is not rewritten)."""
    record = {"written_by": _RECORD_MARK, "desc": desc, "source": None if source is None else str(Path(source).resolve()),
              "settings": None if settings is None else json.loads(json.dumps(settings)),
              "report": str(report.resolve())}
    if _record(out_dir / RECORD_NAME) != record:
        atomic_write_text(out_dir / RECORD_NAME, json.dumps(record, indent=1) + "\n")


def _dataset_in(out_dir: Path) -> tuple[str | None, str]:
    """The dataset ``out_dir`` holds and the file that names it: its ``prepared.json`` (the last run into it), else
    (a folder prepared before that record) its ``report.json``."""
    record = _record(out_dir / RECORD_NAME)
    if record is not None:
        return (record.get("desc") if isinstance(record.get("desc"), str) and record.get("desc") else None), RECORD_NAME
    return _dataset_of(out_dir / "report.json"), "report.json"


def _dataset_of(report: Path) -> str | None:
    """The ``desc`` (dataset) a ``dira3d prepare`` report at ``report`` records; None when there is none."""
    try:
        old = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None
    except (OSError, ValueError):  # not a report: check_rerun names it (--report), or it is not replaced (--dst)
        return None
    if not (isinstance(old, dict) and {"summary", "cases"} <= set(old)):
        return None
    return old.get("desc") if isinstance(old.get("desc"), str) and old.get("desc") else None


def check_other_dataset(out_dir: Path, report: Path, desc: str) -> None:
    """Refuse (without ``--overwrite``) a run into an ``out_dir`` of another dataset (its ``prepared.json``, or in a
    folder prepared before that record its ``report.json``, names it), or a ``report`` path holding another dataset's
    report: the run would replace that report, its ``split.json`` and any datalist of the same name (its volumes would
    stay, listed by none of them)."""
    this = f"a {desc} preparation" if desc else "this preparation"
    other, named_by = _dataset_in(out_dir)
    if other is not None and other != desc:
        raise DataError(out_dir, f"holds the {other} dataset (its {named_by} says desc {other!r}); {this} into it "
                                 "would replace its report and any split.json or datalist of the same name. "
                                 "Choose another --dst, or pass --overwrite to replace them (its prepared images or "
                                 "volumes are not deleted: they stay in the folder)")
    other = _dataset_of(report)
    if other is not None and other != desc:
        raise DataError(report, f"is the report of a {other} preparation; {this} would replace it. Choose another "
                                "--report path, or pass --overwrite to replace it")


def is_earlier_output(folder: Path, desc: str, datalist: str) -> bool:
    """Whether ``folder`` is the ``--dst`` of an earlier run of the preparation ``desc``: it holds that preparation's
    ``datalist`` file, or a ``prepared.json`` or ``report.json`` of it (a run that stopped before its datalist). A preparation that
    searches ``--src`` for images leaves such a folder out: its PNGs are resized copies of the images, not more of
    them (a ``--dst`` inside ``--src``, then a run with another ``--size`` or ``--dst``)."""
    if (folder / datalist).is_file():
        return True
    record = _record(folder / RECORD_NAME)
    if record is not None and record.get("desc") == desc:
        return True
    report = folder / "report.json"
    try:
        old = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None
    except (OSError, ValueError):  # not a report: the folder is judged by its datalist alone
        return False
    return isinstance(old, dict) and old.get("desc") == desc


# inside run_prepare: the locks run_cases takes are kept until the whole preparation ends
_held_until_done: ContextVar[list[FolderLock] | None] = ContextVar("_held_until_done", default=None)


@contextlib.contextmanager
def locks_held_until_done() -> Iterator[None]:
    """Keep the ``--dst`` locks that :func:`run_cases` takes inside this block until it ends, so that
    the datalists a ``prepare`` function writes after its cases are written under the lock too."""
    held: list[FolderLock] = []
    token = _held_until_done.set(held)
    try:
        yield
    finally:
        _held_until_done.reset(token)
        for lock in held:
            lock.release()


def release_when_done(lock: FolderLock) -> None:
    """Release ``lock`` (taken by :func:`~dira3d.data.runner.run_cases`) now, or, inside
    :func:`locks_held_until_done`, when that block ends."""
    held = _held_until_done.get()
    if held is not None:
        held.append(lock)  # dira3d prepare: released once the datalists are written
    else:
        lock.release()


def lock_output_folder(out_dir: Path, report_path: Path) -> FolderLock:
    """Check that ``out_dir`` (and the report's folder) can be written, then lock ``out_dir``: two runs into
    one ``--dst`` would both pass the checks of an earlier run and mix their cases (e.g. two --window values)
    under one datalist.

    Raises:
        DataError: a folder cannot be written, or another process prepares into ``out_dir``.
    """
    for folder, what in ((out_dir, "output folder (--dst)"), (report_path.parent, "report folder (--report)")):
        try:  # before any case runs: a read-only --dst is one clear error, not a failure per case
            check_writable(folder, what=what)
        except OSError as err:
            raise DataError(None, str(err)) from err
    try:
        return FolderLock(out_dir, what="output folder (--dst)",
                          clash="a second run into it would mix its cases, datalists and report with this one's").acquire()
    except FolderInUseError as err:
        raise DataError(None, str(err)) from None
