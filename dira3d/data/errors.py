"""The one exception of data preparation and loading, and the one way a function that lists a
dataset's work records a problem of one case (no imaging library needed to import it)."""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path

from dira3d.utils.warning_format import Dira3dWarning

__all__ = ["OR_KEEP_GOING", "DataError", "DataWarning", "join_errors", "record_or_raise"]

# the end of a missing-image message when the batch stops at it (without --keep-going); with --keep-going the
# others are prepared already, and the report said to add the option that was given
OR_KEEP_GOING = ", or add --keep-going to prepare the images that are there"


class DataError(ValueError):
    """A file or folder that cannot be used as it is; ``path`` names it."""

    def __init__(self, path: str | os.PathLike | None, message: str) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class DataWarning(Dira3dWarning):
    """A problem that does not stop a case (e.g. a second DICOM series left out); the batch runner
    lists it under the case's ``warnings`` in ``report.json``."""


def join_errors(*messages: str | None) -> str:
    """One :attr:`~dira3d.data.runner.Case.error` from several problems of a case: the non-empty
    ``messages``, ``"; "``-joined."""
    return "; ".join(m for m in messages if m)


def record_or_raise(problems: dict | None, key: Hashable, error: DataError, advice: str = "") -> None:
    """Raise ``error``, or record it in ``problems`` as a problem of ``key`` and let the caller go on.

    Every function that lists a dataset's work (files, CSV rows) reports a problem of one case
    through this: its ``problems`` parameter is ``None`` (strict: the first problem raises) or a
    dict that collects ``{key: message}``, from which ``prepare`` sets each :class:`Case`'s
    ``error`` (``problems.get(case_id, "")``), so the case fails and the others go on.

    Args:
        problems: ``None``, or the dict of the problems found so far (changed in place); a key's
            messages are ``"; "``-joined in the order found.
        key: what the problem fails: the id under which the lister returns the case (a seriesuid,
            a patient, an image name), or a left-out CSV row (``"<file name> data row N"``).
        error: the problem.
        advice: appended to the recorded message only (e.g. ``"; fix or remove the row"``).

    Raises:
        DataError: ``error``, when ``problems`` is None.
    """
    if problems is None:
        raise error
    problems[key] = join_errors(problems.get(key), f"{error}{advice}")
