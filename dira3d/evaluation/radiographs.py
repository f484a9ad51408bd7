"""Loading a chest X-ray for the 2D bundles' ``inference.json``: every radiograph file is read as ``dira3d prepare`` reads it.

The 2D bundles were trained on the 8-bit grey PNGs ``dira3d prepare <dataset>`` writes (docs/data_2d.md). Each PNG,
JPEG, TIFF, BMP or DICOM file given for inference goes through :func:`dira3d.data.cxr.read_radiograph`, the function
the preparations read their images with, so the two cannot drift:

- an 8-bit grey image is taken as it is; a 12/16-bit one (PNG, TIFF, DICOM ``BitsStored`` 12 ...) is min-max scaled to
  0..255 as the training images were (the DICOM VOI window is not applied). MONAI's ``PILReader``, which read PNGs
  here before, kept a 16-bit PNG's own values: one above 255 was refused, and one within 0..255 reached the network
  unscaled without a word.
- a ``MONOCHROME1`` DICOM (high values dark) comes back bone bright, as ``MONOCHROME2``.
- a grey image stored as RGB(A), grey + alpha or with a grey palette becomes its one grey channel, with a
  :class:`~dira3d.data.errors.DataWarning` (``PILReader`` gave 2 to 4 channels, refused, or a palette PNG's palette
  indices, which reached the network in place of its grey values); a coloured or transparent image, a 16-bit grey +
  alpha PNG and a colour or multi-frame DICOM are refused with a :class:`~dira3d.data.errors.DataError` naming the
  file, as preparation refuses them.

The array and metadata are those ``PILReader`` gives for the equivalent 8-bit PNG (width first), so the rest of
the bundle (the input checks, resizing, ``Invertd``, the PNG written) treats every format alike. Other files (a NIfTI,
NRRD or MetaImage file, a file that is not an image) go to the configured reader, and the bundle's checks refuse
what is not a 2D grey image of 0..255 (a 3D volume, a scaled image) naming the file.

After those checks, :class:`PrepareRadiographd` resizes the image to the size the training PNGs were stored at
(the bundle's ``prepared_size``, ``dira3d prepare --size``, default 512) with :func:`dira3d.data.cxr.resize_image`,
the preparation's own resizing and 8-bit rounding, before the bundle resizes it to the network's input as training
did: a raw radiograph then reaches the network exactly as its prepared PNG does in training and evaluation.
Resized straight from its native size to 224², the 8-bit rounding at 512² skipped, it differed by up to 8 to 12 grey
levels on synthetic 1200 × 1000 radiographs (tests/test_cxr_prepared_size.py).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import Resized
from monai.utils import ensure_tuple
from PIL import Image

from dira3d.engines.inputs import LoadVolumed
from dira3d.utils.files import looks_like_dicom

__all__ = ["DicomRadiographReader", "LoadRadiographd", "PrepareRadiographd", "RadiographReader", "is_dicom",
           "radiograph_format"]

# the first bytes of the image files read as radiographs (a DICOM is told by looks_like_dicom)
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
               (b"BM", "BMP"))


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a ``.dcm`` / ``.dicom`` / ``.ima`` name or the 'DICM' tag at byte 128."""
    path = Path(path)
    return path.is_file() and looks_like_dicom(path)


def radiograph_format(path: str | os.PathLike) -> str | None:
    """``"DICOM"``, ``"PNG"``, ``"JPEG"``, ``"TIFF"`` or ``"BMP"`` for a file read by :class:`RadiographReader`, told
    by its content (a DICOM also by its name, as :func:`is_dicom`); None for anything else (a volume format, a folder,
    an empty file or one that is not an image), which MONAI's readers load or name as unreadable."""
    path = Path(path)
    if is_dicom(path):
        return "DICOM"
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:  # missing, a folder, unreadable: LoadVolumed's own error names it
        return None
    return next((name for signature, name in _SIGNATURES if head.startswith(signature)), None)


class RadiographReader(PILReader):
    """A MONAI ``ImageReader`` for 2D radiograph files (PNG, JPEG, TIFF, BMP, single-frame DICOM) read by
    :func:`dira3d.data.cxr.read_radiograph`, as ``dira3d prepare`` reads them.

    ``read`` returns each file as an 8-bit grey PIL image, so ``get_data`` (``PILReader``'s) gives exactly what the
    8-bit PNG preparation writes of it gives.
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return all(radiograph_format(name) is not None for name in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> Image.Image | list[Image.Image]:
        from dira3d.data.cxr import read_radiograph  # SimpleITK only when a radiograph comes

        images = [Image.fromarray(np.ascontiguousarray(read_radiograph(name)), mode="L") for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]


DicomRadiographReader = RadiographReader  # its name before it read every radiograph format (bundles 0.1.15 and earlier)


class LoadRadiographd(LoadVolumed):
    """``LoadVolumed`` for the 2D bundles: radiograph files (:func:`radiograph_format`) through
    :class:`RadiographReader` alone, other files with ``reader`` (default ``PILReader``) and MONAI's fallbacks.

    The reader is chosen per key: in a dict with a radiograph and a file of another format (a PNG image and a NIfTI
    mask), the radiograph is still read as ``dira3d prepare`` reads it and the other file by the configured reader.
    (The reader was chosen for the whole dict, RadiographReader only when every file was a radiograph, so such an
    image was read by ``PILReader``: a 16-bit PNG unscaled.) A reader passed to the call reads every key. Its errors
    name the file."""

    def __init__(self, keys: KeysCollection, reader: str | object | None = "PILReader", image_only: bool = True,
                 **kwargs) -> None:
        super().__init__(keys, reader=reader, image_only=image_only, **kwargs)

    def __call__(self, data, reader=None):  # noqa: D102 - as LoadImaged
        if reader is not None:
            return super().__call__(data, reader)
        d = dict(data)
        present = list(self.key_iterator(d))
        radiographs = {k for k in present if isinstance(d[k], (str, os.PathLike)) and radiograph_format(d[k]) is not None}
        if radiographs:  # used alone on them: no fallback to a reader that would read them another way
            d = super(LoadRadiographd, self._for_keys(radiographs)).__call__(d, RadiographReader())
        others = [k for k in present if k not in radiographs]
        return super(LoadRadiographd, self._for_keys(others)).__call__(d) if others else d

    def _for_keys(self, keys) -> LoadRadiographd:
        """A shallow copy of this transform acting on ``keys`` only (with their meta keys); the loader is shared."""
        part = copy.copy(self)
        index = [i for i, key in enumerate(self.keys) if key in keys]
        part.keys = tuple(self.keys[i] for i in index)
        part.meta_keys = tuple(self.meta_keys[i] for i in index)
        part.meta_key_postfix = tuple(self.meta_key_postfix[i] for i in index)
        return part


class PrepareRadiographd(Resized):
    """Resize a loaded 2D image to ``size × size`` as ``dira3d prepare`` stores a radiograph
    (:func:`dira3d.data.cxr.resize_image`: area averaging when shrinking, bilinear when enlarging, rounded to 8 bits).

    Place it after :class:`~dira3d.evaluation.inputs.CheckInferenceInputd` (the checks see the file as it is) and
    before the bundle's ``Resized`` to the network's input: a raw radiograph then reaches the network as the PNG
    ``dira3d prepare --size size`` writes of it does in training. An image already ``size × size`` and 8-bit (a
    prepared PNG) is unchanged. The values are taken as the 8-bit grey levels they are (a radiograph file is read
    as 0..255 by :class:`RadiographReader`); those of another format are rounded to whole levels and clipped to 0..255
    first, as the bundle's ``ScaleIntensityRanged`` (``clip``) would clip them. The resizing is recorded as MONAI's
    ``Resized`` records it, so ``Invertd`` brings a predicted mask back to the file's own size.

    Args:
        keys: the image key(s).
        size: the side the training PNGs were stored at (``dira3d prepare --size``, default 512); 0 or None: no
            resizing here (the image goes from its own size to the bundle's input size, as before).
    """

    def __init__(self, keys: KeysCollection, size: int | None, allow_missing_keys: bool = False) -> None:
        self.size = 0 if size is None else int(size)
        if self.size != 0 and self.size < 8:
            raise ValueError(f"prepared_size {size!r} is not a storage size; set it to the --size the training PNGs were "
                             "prepared with (`dira3d prepare <dataset> --size`, default 512), or 0 to resize the image "
                             "straight to the network's input")
        super().__init__(keys, spatial_size=(self.size, self.size), allow_missing_keys=allow_missing_keys)

    def __call__(self, data, lazy: bool | None = None):  # noqa: D102 - see the class
        from dira3d.data.cxr import image_resize_mode, resize_image

        d = dict(data)
        if not self.size:
            return d
        for key in self.key_iterator(d):
            # dira3d.data.cxr works on (rows, cols) as the file stores them; MONAI holds a 2D image width first
            levels = np.clip(np.rint(torch.as_tensor(d[key]).detach().cpu().numpy()), 0, 255).astype(np.uint8)
            prepared = np.stack([resize_image(channel.T, self.size).T for channel in levels])
            # MONAI's Resize records the step (spatial size, affine, the interpolation for Invertd); its pixels are
            # replaced by the preparation's (a copy: an unchanged size gives a view of the input)
            out = self.resizer(d[key], lazy=False, **image_resize_mode(levels.shape[:0:-1], self.size)).clone()
            out.copy_(torch.as_tensor(prepared))
            d[key] = out
        return d

    def inverse(self, data):  # noqa: D102 - as Resized
        return dict(data) if not self.size else super().inverse(data)
