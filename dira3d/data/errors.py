"""The one exception of data preparation and loading (no imaging library needed to import it)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DataError", "DataWarning"]


class DataError(ValueError):
    """A file or folder that cannot be used as it is; ``path`` names it."""

    def __init__(self, path: str | os.PathLike | None, message: str) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class DataWarning(UserWarning):
    """A problem that does not stop a case (e.g. a second DICOM series left out); the batch runner
    lists it under the case's ``warnings`` in ``report.json``."""
