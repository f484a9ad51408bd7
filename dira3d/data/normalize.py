"""Intensity normalisation to [0, 1]: a HU window for CT, percentiles for MR.

A HU threshold on a normalised CT is ``(hu - lo) / (hi - lo)`` (−150 HU → 0.425 with the
default window [−1000, 1000]).
"""

from __future__ import annotations

import numpy as np

__all__ = ["window_hu", "normalize_mr", "mr_range", "scale_mr", "AIR_HU", "MASK_VALUES", "mask_values"]

AIR_HU = -500.0  # every CT in HU has air (or the scanner's padding, -1024 / -3024) below this; an MRI has none
# (strictly below: a scan whose lowest voxel is exactly AIR_HU has no air)


def _to_unit(array: np.ndarray, offset: np.float32, width: np.float32) -> np.ndarray:
    """``(array - offset) / width`` clipped to [0, 1], computed in float32 into one new array (no temporaries)."""
    out = np.subtract(array, offset, dtype=np.float32)
    np.divide(out, width, out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def window_hu(array: np.ndarray, lo: float = -1000.0, hi: float = 1000.0) -> np.ndarray:
    """Clip CT intensities to the HU window ``[lo, hi]`` and scale them linearly to [0, 1].

    Voxel by voxel: a slice of the volume gives that slice of the volume's result, to the bit.

    Returns:
        float32 array of the same shape.

    Raises:
        ValueError: ``lo >= hi``.
    """
    if not lo < hi:
        raise ValueError(f"HU window must satisfy lo < hi, got [{lo}, {hi}]; check the --window setting")
    return _to_unit(np.asarray(array), np.float32(lo), np.float32(hi - lo))


def _foreground(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The float32 values of the voxels :func:`normalize_mr` takes percentiles from, gathered slice by slice (the
    non-zero ones after the cast to float32, or those of ``mask``): a float32 copy of a whole int16 scan plus a
    boolean mask would be 2.5 times the scan, this is at most 2 times its foreground."""
    if array.ndim < 2:
        data = array.astype(np.float32)  # a copy: the percentiles may reorder it
        return data[data != 0] if mask is None else data[np.asarray(mask, dtype=bool)]
    mask = None if mask is None else np.asarray(mask, dtype=bool)

    def pick(i: int) -> tuple[np.ndarray, np.ndarray]:
        piece = array[i].astype(np.float32, copy=False)
        return piece, (piece != 0 if mask is None else mask[i])

    values = np.empty(sum(int(np.count_nonzero(pick(i)[1])) for i in range(len(array))), dtype=np.float32)
    filled = 0
    for i in range(len(array)):
        piece, select = pick(i)
        chosen = piece[select]
        values[filled : filled + chosen.size] = chosen
        filled += chosen.size
    return values


def mr_range(array: np.ndarray, mask: np.ndarray | None = None, lower: float = 0.5,
             upper: float = 99.5) -> tuple[np.float32, np.float32]:
    """``(offset, width)`` of :func:`normalize_mr`: its ``lower`` percentile and the distance to its ``upper`` one, as
    float32 (arguments and errors as there). :func:`scale_mr` with them gives any slice of ``normalize_mr``'s result."""
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"MR percentiles must satisfy 0 <= lower < upper <= 100, got ({lower}, {upper})")
    values = _foreground(np.asarray(array), mask)
    if values.size == 0:
        raise ValueError("MR volume has no foreground voxels to take percentiles from (all zero or empty mask)")
    p_lo, p_hi = np.percentile(values, [lower, upper], overwrite_input=True)  # values is this function's own copy
    if not p_hi > p_lo:
        raise ValueError(f"MR volume is constant in its foreground (percentiles {p_lo} and {p_hi}); cannot normalise it")
    return np.float32(p_lo), np.float32(p_hi - p_lo)


def scale_mr(array: np.ndarray, offset: np.float32, width: np.float32) -> np.ndarray:
    """``(array - offset) / width`` clipped to [0, 1] in float32: :func:`normalize_mr` with :func:`mr_range`'s values."""
    return _to_unit(np.asarray(array), offset, width)


def normalize_mr(array: np.ndarray, mask: np.ndarray | None = None, lower: float = 0.5,
                 upper: float = 99.5) -> np.ndarray:
    """Scale an MR volume to [0, 1] by the ``lower``/``upper`` percentiles of its foreground.

    Args:
        array: the volume.
        mask: voxels the percentiles are taken from; by default the non-zero voxels (MR
            background is zero after skull stripping or outside the field of view).
        lower, upper: percentiles (0–100) mapped to 0 and 1; values beyond are clipped.

    Returns:
        float32 array of the same shape.

    Raises:
        ValueError: bad percentiles, an empty foreground, or a constant foreground.
    """
    return scale_mr(array, *mr_range(array, mask, lower, upper))


MASK_VALUES = 16  # an image of integer values with this few distinct ones is a label map, not a scan


def mask_values(array: np.ndarray) -> np.ndarray | None:
    """The distinct values of ``array`` when it looks like a mask or label map (2 to :data:`MASK_VALUES`
    distinct values, all of them non-negative integers, whatever the array's type: readers give masks as
    floats too); None for a scan, and for a constant image (no mask: the intensity checks judge it). Label
    values are 0..N (or 0/255): a few negative values are a thresholded or coarsely quantised CT in HU."""
    array = np.asarray(array)
    coarse = array[tuple(slice(None, None, 4) for _ in array.shape)]  # a coarse look settles almost every scan
    if np.unique(coarse).size > MASK_VALUES:
        return None
    values = np.unique(array)
    if not 2 <= values.size <= MASK_VALUES:
        return None
    if values[0] < 0 or (not np.issubdtype(values.dtype, np.integer) and not np.array_equal(values, np.round(values))):
        return None
    return values
