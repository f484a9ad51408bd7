"""dira3d's own warnings print as one ``WARNING: <message>`` line, not Python's ``file:line: Category:`` form.

Python prints a warning as ``/…/site-packages/dira3d/evaluation/inputs.py:194: DataWarning: left out: …`` followed
by the source line that raised it (``  warnings.warn(f"left out: {message}", …)``): two lines, one of them code, in
front of a message written for the user (a scan left out, a split without foreground, a bundle upgraded since a
table's rows). :func:`install_warning_format` (called when ``dira3d`` is imported) wraps ``warnings.formatwarning``
so that a :class:`~dira3d.data.errors.DataWarning`, or a ``UserWarning`` that dira3d's code raised, prints as
``WARNING: <message>``. Every other warning (PyTorch's, MONAI's, a deprecation) keeps Python's format; filters,
``pytest.warns`` and ``warnings.catch_warnings(record=True)`` are untouched (they do not format).
"""

from __future__ import annotations

import warnings
from pathlib import Path

__all__ = ["install_warning_format", "is_dira3d_warning"]

_PACKAGE = Path(__file__).resolve().parents[1]  # .../dira3d


def is_dira3d_warning(category: type[Warning], filename: str) -> bool:
    """Whether a warning is one of dira3d's messages for the user: a ``DataWarning``, or a ``UserWarning`` whose
    reported location (``filename``) is in the dira3d package."""
    from dira3d.data.errors import DataWarning

    if issubclass(category, DataWarning):
        return True
    if not issubclass(category, UserWarning) or not filename:
        return False
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


def install_warning_format() -> None:
    """Wrap ``warnings.formatwarning`` (once): dira3d's warnings as ``WARNING: <message>``, others as before."""
    previous = warnings.formatwarning
    if getattr(previous, "_dira3d", False):
        return

    def formatwarning(message, category, filename, lineno, line=None):
        if is_dira3d_warning(category, filename):
            return f"WARNING: {message}\n"
        return previous(message, category, filename, lineno, line)

    formatwarning._dira3d = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning
