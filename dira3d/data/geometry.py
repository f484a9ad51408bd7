"""World <-> voxel geometry, resampling and cube cropping.

World coordinates are ITK physical points in millimetres (LPS, as in DICOM and the LUNA16
CSVs). A voxel index is ``(x, y, z)`` = (column, row, slice), continuous when it comes from a
world point. Every conversion uses the image's origin, spacing *and* direction, so oblique or
flipped scans map correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from dira3d.data.io import image_to_xyz

__all__ = ["INTERPOLATORS", "world_to_voxel", "voxel_to_world", "resample", "crop_cube"]

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
    "label_gaussian": sitk.sitkLabelGaussian,
}

_EDGE_TOLERANCE = 1e-6  # in new voxels: a centre this close to the old box's edge counts as on it


def world_to_voxel(image: sitk.Image, xyz_mm: Sequence[float] | np.ndarray) -> np.ndarray:
    """Continuous voxel index ``(x, y, z)`` of world point(s) in mm.

    Args:
        image: gives origin, spacing and direction.
        xyz_mm: one point ``(3,)`` or several ``(N, 3)``.

    Returns:
        float64 array of the same shape as ``xyz_mm``.
    """
    points = np.asarray(xyz_mm, dtype=np.float64)
    flat = points.reshape(-1, image.GetDimension())
    out = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in flat])
    return out.reshape(points.shape)


def voxel_to_world(image: sitk.Image, index: Sequence[float] | np.ndarray) -> np.ndarray:
    """World point(s) in mm of continuous voxel index(es) ``(x, y, z)``; inverse of :func:`world_to_voxel`."""
    idx = np.asarray(index, dtype=np.float64)
    flat = idx.reshape(-1, image.GetDimension())
    out = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p))) for p in flat])
    return out.reshape(idx.shape)


def resample(image: sitk.Image, spacing: float | Sequence[float], interpolator: str = "linear",
             default_value: float = 0.0) -> sitk.Image:
    """Resample to a new voxel spacing, keeping the direction and the physical field of view.

    The new grid starts at the old box's corner (voxel edges, not centres, are kept), so
    structures keep their world position: a mask resampled with ``"nearest"`` stays aligned
    with its image resampled with ``"linear"``. Along each axis the new size is the largest
    number of new voxels whose centres all lie inside the old box, ``floor(extent / spacing + 1/2)``
    (the rounded field of view, a half rounded down): a last plane centred on the box's edge or
    beyond it would be all ``default_value``. An axis thinner than half a new voxel keeps one
    voxel, centred on the old box.

    Args:
        spacing: new spacing in mm, one number (isotropic) or one per axis (x, y, z).
        interpolator: ``"linear"`` (images), ``"nearest"`` (masks), ``"bspline"``, ``"label_gaussian"``.
        default_value: value outside the old grid (e.g. −1000 HU for CT).

    Raises:
        ValueError: unknown interpolator or non-positive spacing.
    """
    dims = image.GetDimension()
    new_spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (dims,)).copy()
    if np.any(new_spacing <= 0):
        raise ValueError(f"resampling spacing must be positive, got {tuple(new_spacing)}")
    if interpolator not in INTERPOLATORS:
        raise ValueError(f"unknown interpolator {interpolator!r}; choose one of {sorted(INTERPOLATORS)}")
    old_spacing = np.asarray(image.GetSpacing())
    extent = np.asarray(image.GetSize()) * old_spacing
    # last centre (n - 1/2) new voxels from the corner must lie inside the box (1e-6 voxel of float slack)
    fitting = np.floor(extent / new_spacing + 0.5 - _EDGE_TOLERANCE).astype(int)
    new_size = np.maximum(fitting, 1)
    direction = np.asarray(image.GetDirection()).reshape(dims, dims)
    # first new voxel centre = old box corner + half a new voxel (along the image axes), or the box's
    # centre along an axis too thin for one whole voxel centre
    corner = np.asarray(image.GetOrigin()) - direction @ (old_spacing / 2)
    new_origin = corner + direction @ np.where(fitting >= 1, new_spacing / 2, extent / 2)
    return sitk.Resample(image, [int(s) for s in new_size], sitk.Transform(), INTERPOLATORS[interpolator],
                         tuple(new_origin), tuple(new_spacing), image.GetDirection(), float(default_value),
                         image.GetPixelID())


def crop_cube(array_or_image: np.ndarray | sitk.Image, center_index: Sequence[float], size: Sequence[int],
              pad_value: float = 0.0) -> np.ndarray:
    """Crop a box of ``size`` voxels centred on ``center_index``, padding outside the volume.

    The centre voxel ``round(center_index)`` lands at index ``size // 2`` of the cube (for an
    even size, the cube spans ``c - size/2 … c + size/2 - 1``).

    Args:
        array_or_image: an ``(x, y, z)`` array or a SimpleITK image (converted to ``(x, y, z)``).
        center_index: continuous voxel index ``(x, y, z)``.
        size: cube size ``(x, y, z)`` in voxels.
        pad_value: fill value for the part of the cube outside the volume.

    Returns:
        Array of shape ``size`` in ``(x, y, z)`` order, the dtype of the input.
    """
    array = image_to_xyz(array_or_image) if isinstance(array_or_image, sitk.Image) else np.asarray(array_or_image)
    size = np.asarray(size, dtype=int)
    if size.shape != (array.ndim,) or np.any(size < 1):
        raise ValueError(f"cube size {tuple(size)} must have one positive entry per axis of the {array.ndim}D array")
    start = np.round(np.asarray(center_index, dtype=np.float64)).astype(int) - size // 2
    cube = np.full(tuple(size), pad_value, dtype=array.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, array.shape)
    if np.any(src_hi <= src_lo):
        return cube  # entirely outside the volume
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    cube[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return cube
