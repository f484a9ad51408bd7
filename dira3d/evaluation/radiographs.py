"""Loading a chest X-ray for the 2D bundles' ``inference.json``: a DICOM is read as ``dira3d prepare`` reads it.

The 2D bundles were trained on the 8-bit PNGs ``dira3d prepare <dataset>`` writes (docs/data_2d.md). A PNG is
loaded as it is (MONAI's ``PILReader``); a DICOM goes through :func:`dira3d.data.cxr.read_radiograph`, the same
function the preparations use for their DICOMs, so the two cannot drift:

- ``MONOCHROME1`` (high values dark, common in hospital radiographs) comes back bone bright, as ``MONOCHROME2``;
  MONAI's ``PydicomReader``, which read DICOMs here before, kept it inverted and the network saw a negative.
- 12/16-bit data (``BitsStored`` 12 ...) is min-max scaled to 0..255 as the training images were; the VOI window
  (WindowCenter/Width) is not applied. Before, such a DICOM was refused by the 0..255 range check.
- a colour or multi-frame DICOM is refused with a :class:`~dira3d.data.errors.DataError` naming the file.

The array and metadata are those ``PILReader`` gives for the equivalent 8-bit PNG (width first), so the rest of
the bundle (resizing, ``Invertd``, the PNG written) treats both alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import PILReader
from monai.utils import ensure_tuple
from PIL import Image

from dira3d.engines.inputs import LoadVolumed
from dira3d.utils.files import looks_like_dicom

__all__ = ["DicomRadiographReader", "LoadRadiographd", "is_dicom"]


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a ``.dcm`` / ``.dicom`` / ``.ima`` name or the 'DICM' tag at byte 128."""
    path = Path(path)
    return path.is_file() and looks_like_dicom(path)


class DicomRadiographReader(PILReader):
    """A MONAI ``ImageReader`` for single-frame grey DICOM radiographs, read by :func:`dira3d.data.cxr.read_radiograph`.

    ``read`` returns each file as an 8-bit grey PIL image, so ``get_data`` (``PILReader``'s) gives exactly what a
    PNG of the same pixels gives.
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return all(is_dicom(name) for name in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> Image.Image | list[Image.Image]:
        from dira3d.data.cxr import read_radiograph  # SimpleITK only when a DICOM comes

        images = [Image.fromarray(np.ascontiguousarray(read_radiograph(name)), mode="L") for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]


class LoadRadiographd(LoadVolumed):
    """``LoadVolumed`` for the 2D bundles: DICOM files through :class:`DicomRadiographReader`, other files
    (PNG, JPEG) with ``reader`` (default ``PILReader``) as before. Its errors name the file."""

    def __init__(self, keys: KeysCollection, reader: str | object | None = "PILReader", image_only: bool = True,
                 **kwargs) -> None:
        super().__init__(keys, reader=reader, image_only=image_only, **kwargs)

    def __call__(self, data, reader=None):  # noqa: D102 - as LoadImaged
        files = [data[k] for k in self.key_iterator(dict(data)) if isinstance(data[k], (str, os.PathLike))]
        if reader is None and files and all(is_dicom(f) for f in files):
            reader = DicomRadiographReader()  # used alone: no fallback to a reader that would keep MONOCHROME1
        return super().__call__(data, reader)
