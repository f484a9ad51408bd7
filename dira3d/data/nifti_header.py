"""The NIfTI header exactly as written, for the checks that readers would hide.

ITK and ``nib.load`` turn a zero or negative ``pixdim`` into a valid spacing, so data preparation
(:func:`dira3d.data.io.read_image`) and the pretraining loader
(:func:`dira3d.engines.inputs.header_spacing`) read the raw header here. Imports neither torch nor
SimpleITK (the engine uses it on machines without them); nibabel is imported on use.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

# the start of the ``descrip`` mark of every prediction a task bundle's inference writes (dira3d.evaluation.outputs)
PREDICTION_MARK_PREFIX = "dira3d prediction sha256:"

__all__ = ["read_raw_nifti_header", "header_pixdim", "PREDICTION_MARK_PREFIX", "is_marked_prediction"]


def read_raw_nifti_header(path: str | os.PathLike) -> Any:
    """The ``nibabel.Nifti1Header`` of a ``.nii`` / ``.nii.gz`` file, unchecked and unrepaired.

    Raises:
        whatever ``open`` / ``gzip`` / nibabel raise for a file that is not a readable NIfTI.
    """
    import nibabel as nib

    opener = gzip.open if Path(path).name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        return nib.Nifti1Header.from_fileobj(handle, check=False)


def header_pixdim(header: Any) -> tuple[float, ...]:
    """The voxel spacing of the (up to three) spatial axes as ``pixdim`` records it."""
    ndim = int(header["dim"][0])
    return tuple(float(v) for v in header["pixdim"][1 : 1 + min(max(ndim, 1), 3)])


def is_marked_prediction(path: str | os.PathLike) -> bool:
    """Whether the NIfTI file at ``path`` carries the mark of a prediction written by a task bundle's inference
    (edited since or not); reads the header only. False for any other file, or one that cannot be read."""
    if not Path(path).name.lower().endswith((".nii", ".nii.gz")):
        return False
    try:
        descrip = read_raw_nifti_header(path)["descrip"]
    except Exception:  # noqa: BLE001 - not a readable NIfTI: the reader names it later if it is a scan
        return False
    text = bytes(descrip.item() if hasattr(descrip, "item") else descrip).split(b"\x00", 1)[0]
    return text.decode("ascii", "replace").strip().startswith(PREDICTION_MARK_PREFIX)
