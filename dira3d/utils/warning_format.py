"""dira3d's own warnings print as one ``WARNING: <message>`` line, not Python's ``file:line: Category:`` form.

Python prints a warning as ``/…/site-packages/dira3d/evaluation/inputs.py:194: DataWarning: left out: …`` followed
by the source line that raised it (``  warnings.warn(f"left out: {message}", …)``): two lines, one of them code, in
front of a message written for the user (a scan left out, a split without foreground, a bundle upgraded since a
table's rows). :func:`install_warning_format` (called when ``dira3d`` is imported) wraps ``warnings.formatwarning``
so that a :class:`Dira3dWarning` (dira3d's category for its warnings to the user; ``DataWarning`` is one), or a
``UserWarning`` attributed to dira3d's code, prints as ``WARNING: <message>``: the category decides, so the format
does not depend on the frame ``stacklevel`` attributes a warning to (a bundle's config expression, a user's script). Every other warning (PyTorch's, MONAI's, a deprecation) keeps Python's format; filters,
``pytest.warns`` and ``warnings.catch_warnings(record=True)`` are untouched (they do not format).
"""

from __future__ import annotations

import warnings
from pathlib import Path

__all__ = ["Dira3dWarning", "install_warning_format", "is_dira3d_warning", "prefix_warnings"]

_PACKAGE = Path(__file__).resolve().parents[1]  # .../dira3d
_prefix = ""  # prefix_warnings: "[rank r/W]" in a rank of a batch under torchrun


class Dira3dWarning(UserWarning):
    """A warning of dira3d to its user (a setting or an input that works but deserves a look): printed as one
    ``WARNING: <message>`` line; filter it as a ``UserWarning``."""


def is_dira3d_warning(category: type[Warning], filename: str) -> bool:
    """Whether a warning is one of dira3d's messages for the user: a :class:`Dira3dWarning` (``DataWarning``
    included), or a ``UserWarning`` whose reported location (``filename``) is in the dira3d package."""
    if issubclass(category, Dira3dWarning):
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
            return f"WARNING: {_prefix}{message}\n"
        return previous(message, category, filename, lineno, line)

    formatwarning._dira3d = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning


def prefix_warnings(prefix: str) -> None:
    """Start dira3d's ``WARNING:`` lines with ``prefix`` from now on (``""``: none), as
    :func:`dira3d.evaluation.batch_ranks.prefix_rank_logs` does with ``[rank r/W]`` for the log lines: under
    ``torchrun`` each rank warned ``1 of 3 inputs left out`` of its share of a batch of 6, and the lines could not be
    told apart, nor from the batch's own count."""
    global _prefix
    _prefix = f"{prefix} " if prefix else ""
