"""The EXIF orientation of a radiograph file: turn the pixels the way a viewer shows them.

A JPEG (or TIFF, PNG) exported by a phone, a film scanner or some PACS viewers may store its pixels sideways and say so
in the EXIF ``Orientation`` tag (274), which image viewers, Pillow's ``ImageOps.exif_transpose`` and browsers follow.
SimpleITK ignores the tag, so such a radiograph was prepared (and given to the bundles) lying on its side or mirrored,
without a word, while the user saw it upright. :func:`as_displayed` applies the tag with Pillow's own transposes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from dira3d.data.errors import DataWarning

__all__ = ["EXIF_ORIENTATION", "exif_orientation", "as_displayed"]

EXIF_ORIENTATION = 274  # 0x0112
# the EXIF values 2..8 as Pillow's transposes (the table ImageOps.exif_transpose uses)
_TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}
_WHAT = {2: "mirrored left-right", 3: "turned 180 degrees", 4: "mirrored top-bottom", 5: "transposed",
         6: "turned 90 degrees clockwise", 7: "transposed across the other diagonal",
         8: "turned 90 degrees counter-clockwise"}  # what a viewer does to the stored pixels


def exif_orientation(path: str | os.PathLike) -> int:
    """The file's EXIF ``Orientation`` (1 to 8); 1 (as stored) without one, or for a file Pillow cannot open (DICOM)."""
    try:
        with warnings.catch_warnings():  # only the header is read: a large radiograph is no decompression bomb here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                value = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError):  # not an image Pillow reads,
        return 1  # a broken EXIF block, or one Pillow refuses to open for its size (read as stored)
    return value if isinstance(value, int) and value in _TRANSPOSES else 1


def as_displayed(array: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """``array`` ``(rows, cols)`` as read from ``path``, turned as its EXIF orientation says (with a
    :class:`DataWarning` naming the file); unchanged without one."""
    orientation = exif_orientation(path)
    if orientation == 1:
        return array
    rows, cols = array.shape
    index = Image.fromarray(np.arange(rows * cols, dtype=np.int32).reshape(rows, cols))  # mode "I"
    turned = np.asarray(index.transpose(_TRANSPOSES[orientation]))
    warnings.warn(f"{Path(path)}: its EXIF orientation tag ({orientation}) has viewers show its pixels "
                  f"{_WHAT[orientation]}; read as they show it", DataWarning, stacklevel=2)
    return np.ascontiguousarray(array.reshape(-1)[turned])
