"""A case of data preparation and what happened to it.

:class:`Case` (an id, the files it writes, its worker's parameters, a problem found while listing
the work), :class:`CaseResult` (one of :data:`STATUSES`, with the reason, the worker's info and its
warnings), the output paths of a case (:func:`safe_case_path`, :func:`case_outputs`, which refuse ids
that would write outside ``--dst``) and :func:`batch_stopped`. :mod:`dira3d.data.runner` runs the
cases and re-exports all of these.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STATUSES", "Case", "CaseResult", "safe_case_path", "case_outputs", "batch_stopped"]

STATUSES = ("written", "skipped", "failed", "dry-run", "cancelled")


@dataclass
class Case:
    """One unit of work: ``outputs`` are the files it writes (absolute paths).

    ``error``: a problem found while listing the work (see
    :func:`~dira3d.data.errors.record_or_raise`); the case is reported as failed with it.
    """

    case_id: str
    outputs: list[Path]
    params: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class CaseResult:
    """What happened to a case. ``info`` holds what ``process_fn`` returned (e.g. counts)."""

    case_id: str
    status: str
    outputs: list[str] = field(default_factory=list)
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("written", "skipped")


def safe_case_path(out_dir: str | os.PathLike, case_id: str, suffix: str = "") -> Path:
    """``out_dir / (case_id + suffix)``, refusing ids that would escape ``out_dir``.

    Raises:
        ValueError: empty or absolute id, a ``..`` component, or a path resolving outside ``out_dir``.
    """
    if not case_id or os.path.isabs(case_id) or Path(case_id).is_absolute() or "\x00" in case_id:
        raise ValueError(f"case id {case_id!r} is empty or absolute; case ids must be relative names")
    if ".." in Path(case_id).parts or "\\" in case_id:
        raise ValueError(f"case id {case_id!r} contains '..' or a backslash and could write outside {out_dir}; rename the case")
    root = Path(out_dir).resolve()
    path = root / f"{case_id}{suffix}"
    if root not in path.resolve().parents:
        raise ValueError(f"case id {case_id!r} resolves outside the output folder {root}; rename the case")
    return Path(out_dir) / f"{case_id}{suffix}"


def case_outputs(case_id: str, places: Sequence[tuple[str | os.PathLike, str]], source: str | os.PathLike | None = None,
                 ) -> tuple[list[Path], str]:
    """:func:`safe_case_path` of ``case_id`` in every ``(folder, suffix)`` of ``places``, for a case whose id
    comes from the data (a CSV cell, a DICOM tag, a file name).

    An id that :func:`safe_case_path` refuses (``..``, absolute, a backslash) is a problem of that case
    alone: the outputs are ``[]`` and the message (naming ``source``, where the id was read) goes to the
    case's ``error``, so the batch goes on with the other cases (``--keep-going``) instead of stopping
    before any of them.

    Returns:
        ``(outputs, error)``: the output paths and ``""``, or ``[]`` and why the id is refused.
    """
    try:
        return [safe_case_path(folder, case_id, suffix) for folder, suffix in places], ""
    except ValueError as err:
        where = f"{source}: " if source is not None else ""
        return [], (f"{where}{err}; this case is left out (fix the id where it is read; the other cases are "
                    "prepared)")


def batch_stopped(results: Iterable[CaseResult], keep_going: bool) -> bool:
    """Whether the batch stopped at a failure, so that no datalist may be written.

    True when a case was cancelled, and also when a case failed without ``keep_going`` although
    nothing was left to cancel (the last case, or the last ones running in the pool, failed).
    """
    results = list(results)
    return any(r.status == "cancelled" for r in results) or (
        not keep_going and any(r.status == "failed" for r in results))
