"""A MONAI ``ImageReader`` backed by SimpleITK, for whole-scan inference.

MONAI's own ``ITKReader`` needs the ``itk`` package, which dira3d does not depend on; this reader
gives ``LoadImage(d)`` the same result (``(x, y, z)`` array, RAS affine) from SimpleITK, so a bundle's
``inference.json`` opens NIfTI, NRRD, MetaImage files and DICOM series folders alike. 3D volumes go
through :func:`dira3d.data.io.read_image` (its checks and clear errors); a 4D NIfTI (e.g. BraTS's
four sequences) is returned channel-last.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = ["SimpleITKReader", "sitk_affine_ras"]

_SUFFIXES = ("nii", "nii.gz", "nrrd", "nhdr", "mha", "mhd", "dcm")


def sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """4×4 voxel → world affine of the first three axes of ``image``, in RAS (MONAI/nibabel) convention.

    ITK's world frame is LPS: x_lps = D · diag(spacing) · i + origin. Negating the first two rows
    gives RAS, which is what MONAI's ``ITKReader(affine_lps_to_ras=True)`` returns.
    """
    dims = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dims, dims)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


class SimpleITKReader(ImageReader):
    """Read NIfTI / NRRD / MetaImage files and DICOM series folders with SimpleITK.

    Args:
        dtype: array type returned (``float32`` by default).
    """

    def __init__(self, dtype: type = np.float32) -> None:
        super().__init__()
        self.dtype = dtype

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        for name in ensure_tuple(filename):
            path = Path(name)
            if not (path.is_dir() or str(path).lower().endswith(tuple("." + s for s in _SUFFIXES))):
                return False
        return True

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> sitk.Image | list[sitk.Image]:
        from dira3d.data.io import read_image  # sibling module: its checks give the clear per-file errors

        from dira3d.data.io import check_mask_matches

        images = []
        for name in ensure_tuple(data):
            path = Path(name)
            if path.is_file():
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
                if reader.GetDimension() == 4 and reader.GetSize()[-1] > 1:
                    images.append(sitk.ReadImage(str(path)))  # multi-sequence volume, channel last
                    continue
            images.append(read_image(path))
            if len(images) > 1 and images[0].GetDimension() == 3:
                # the files of one image (a case's sequences, stacked as channels) keep the first one's grid: one on
                # another grid was refused as "truncated, corrupt or not an image" (another size) or, of another
                # spacing, origin or direction, stacked onto the first's grid without a word
                check_mask_matches(images[0], images[-1], ensure_tuple(data)[0], path, allow_empty=True,
                                   kind="sequence")
        return images if len(images) > 1 else images[0]

    def get_data(self, img: sitk.Image | list[sitk.Image]) -> tuple[np.ndarray, dict]:
        arrays, meta = [], {}
        # not ensure_tuple: a SimpleITK image is itself a sequence (of voxels)
        for image in img if isinstance(img, (list, tuple)) else [img]:
            # GetArrayFromImage is (z, y, x) or (t, z, y, x): reverse to the project's (x, y, z[, t])
            array = sitk.GetArrayFromImage(image)
            array = np.ascontiguousarray(array.transpose(tuple(range(array.ndim))[::-1])).astype(self.dtype)
            header = {
                MetaKeys.ORIGINAL_AFFINE: sitk_affine_ras(image),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[:3]),
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if array.ndim == 3 else -1,
                "spacing": np.asarray(image.GetSpacing()[:3]),
            }
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            meta = meta or header
            arrays.append(array)
        data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=0)
        if len(arrays) > 1:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return data, meta
