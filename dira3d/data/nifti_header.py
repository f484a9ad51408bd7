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

__all__ = ["read_raw_nifti_header", "header_pixdim"]


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
