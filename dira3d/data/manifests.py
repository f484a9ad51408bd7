"""Reading back the per-case manifest a ``prepare`` worker writes (LIDC-IDRI, PE-CAD): the list of what
the case produced, which both decides whether a rerun may skip the case
(:func:`~dira3d.data.runner.run_cases`' ``check_outputs``) and feeds the datalist."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dira3d.data.runner import safe_case_path
from dira3d.utils.files import FileContentError, read_json

__all__ = ["read_case_manifest"]


def read_case_manifest(path: str | os.PathLike, key: str, *, root: str | os.PathLike, case_id: Any,
                       required: Sequence[str], files: Sequence[str], fix: str) -> list[dict[str, Any]]:
    """The entries of a case manifest (``{key: [entry, ...], ...}``), checked as a run wrote them.

    Args:
        path: the manifest.
        key: the name of its list of entries (``"nodules"``, ``"candidates"``).
        root: the output folder (``--dst``) the entries' file paths are relative to.
        case_id: the value every entry's ``case_id`` must have (the case's patient).
        required: the keys every entry must have.
        files: the keys naming an output file (relative to ``root``), which must be a non-empty file there.
        fix: what to do, appended to every message.

    Raises:
        FileContentError: the file is empty, cut short or not JSON (:func:`~dira3d.utils.files.read_json`),
            has no such list, or an entry lacks a key, names another case, or a file that is missing,
            empty or outside ``root``.
    """
    path = Path(path)
    entries = read_json(path, "case manifest", fix).get(key)
    if not isinstance(entries, list):
        raise FileContentError(path, f"case manifest {path} has no list of {key}; {fix}")
    for number, entry in enumerate(entries, start=1):
        problem = ""
        if not isinstance(entry, dict) or not set(required) <= set(entry):
            problem = f"is not an object with {', '.join(required)}"
        elif entry["case_id"] != case_id:
            problem = f"names case {entry['case_id']!r}, not {case_id!r}"
        for name in files if not problem else ():
            try:
                file = safe_case_path(root, entry[name]) if isinstance(entry[name], str) else None
            except ValueError:
                file = None
            if file is None:
                problem = f"has {name} {entry[name]!r}, not a path inside {root}"
            elif not file.is_file() or file.stat().st_size == 0:
                problem = f"lists {name} {file}, which is {'empty' if file.is_file() else 'missing'}"
            if problem:
                break
        if problem:
            raise FileContentError(path, f"case manifest {path}: entry {number} of its {key} {problem}; {fix}")
    return entries
