"""The volume pipeline the dataset modules share: reorient to RAS → normalise → optionally resample.

:func:`normalise_image` turns a scan as read into its prepared form (CT windowed to HU [lo, hi] → [0, 1],
MR scaled by percentiles of its non-zero voxels), :func:`prepare_mask` a mask into a ``uint8`` volume on
the same grid. ``dira3d prepare generic`` and the dataset modules (LiTS, BraTS, LUNA16, PE-CAD) call
them; both stay importable from :mod:`dira3d.data.generic`, where they were first. :func:`add_ct_arguments` adds
the ``--window`` / ``--spacing`` options of the CT dataset prepares (LiTS, LUNA16, PE-CAD).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from dira3d.data.errors import DataError
from dira3d.data.geometry import resample
from dira3d.data.io import to_ras
from dira3d.data.modality import MODALITIES
from dira3d.data.nifti_header import header_pixdim, read_raw_nifti_header
from dira3d.data.normalize import mr_range, scale_mr, window_hu

__all__ = ["normalise_image", "prepare_mask", "spacing_spread", "add_ct_arguments"]


def normalise_image(image: sitk.Image, modality: str = "ct", window: Sequence[float] = (-1000.0, 1000.0),
                    percentiles: Sequence[float] = (0.5, 99.5), spacing: Sequence[float] | None = None,
                    path: str | os.PathLike | None = None) -> sitk.Image:
    """The prepared form of a scan: RAS, float32 in [0, 1], optionally resampled.

    Args:
        image: as read by :func:`dira3d.data.io.read_image`.
        modality: ``"ct"`` (HU window) or ``"mr"`` (percentiles of the non-zero voxels).
        window: CT window ``(lo, hi)`` in HU.
        percentiles: MR ``(lower, upper)`` percentiles.
        spacing: new spacing in mm ``(x, y, z)`` (or one number); ``None`` keeps the native grid.
        path: named in error messages.

    Raises:
        DataError: unknown modality or a volume that cannot be normalised (e.g. constant MR).
    """
    if modality not in MODALITIES:
        raise DataError(path, f"unknown modality {modality!r}; use one of {MODALITIES}")
    image = to_ras(image)
    # the scaling is voxel by voxel (MR: once the percentiles of all non-zero voxels are known), so it runs on
    # SimpleITK's (z, y, x) buffer without a copy and is written a slab of slices at a time into the new image: a whole
    # scaled volume as numpy, then copied into an image, was two float32 copies of the scan (docs/reliability.md)
    array = sitk.GetArrayViewFromImage(image)
    try:
        if modality == "ct":
            window_hu(array[:0], *window)  # checks the window now: lo < hi
            scale = functools.partial(window_hu, lo=window[0], hi=window[1])
        else:
            offset, width = mr_range(array, None, *percentiles)
            scale = functools.partial(scale_mr, offset=offset, width=width)
    except ValueError as err:
        raise DataError(path, str(err)) from err
    out = _scaled_copy(image, array, scale)
    del array, image
    # normalise first, then interpolate: 0 (air / MR background) fills outside the old grid
    return resample(out, spacing, "linear", 0.0) if spacing is not None else out


_SLAB_BYTES = 4 << 20  # float32 slices scaled and pasted at a time (one at a time took 4 times longer)


def _scaled_copy(image: sitk.Image, array: np.ndarray, scale: Callable[[np.ndarray], np.ndarray]) -> sitk.Image:
    """A float32 image on ``image``'s grid holding ``scale`` of ``array`` (its voxels), filled a slab of slices at a
    time: ``scale`` must work voxel by voxel."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:  # not a plain 3D scan: all at once
        out = sitk.GetImageFromArray(scale(array))
    else:
        out = sitk.Image(image.GetSize(), sitk.sitkFloat32)
        step = max(1, _SLAB_BYTES // max(1, 4 * array[0].size))
        for z in range(0, array.shape[0], step):  # pasted into out's buffer, in place
            out[:, :, z : z + step] = sitk.GetImageFromArray(scale(array[z : z + step]))
    out.CopyInformation(image)
    return out


def prepare_mask(mask: sitk.Image, image: sitk.Image, spacing: Sequence[float] | None = None) -> sitk.Image:
    """A ``uint8`` mask reoriented to RAS (and resampled with nearest neighbour) like its image."""
    mask = to_ras(sitk.Cast(mask, sitk.sitkUInt8))
    return resample(mask, spacing, "nearest", 0) if spacing is not None else mask


SPACING_SPREAD = 1.5  # largest / smallest voxel size on one axis above which native spacings are called mixed


def spacing_spread(volumes: Sequence[tuple[str, str | os.PathLike]], ratio: float = SPACING_SPREAD) -> str:
    """A warning when prepared volumes kept at their native spacing (no ``--spacing``) differ by more than
    ``ratio`` in voxel size on an axis: a patch of N voxels then covers very different physical sizes in
    pretraining, and a model fine-tuned on some of them sees the others at another scale. ``""`` when they agree.

    Args:
        volumes: ``(case_id, NIfTI path)`` of the volumes written (their headers are read, not their voxels).
    """
    sizes = []
    for case_id, path in volumes:
        try:
            sizes.append((case_id, header_pixdim(read_raw_nifti_header(path))[:3]))
        except Exception:  # noqa: BLE001 - a volume that cannot be read is reported by whoever reads it next
            continue
    sizes = [(c, v) for c, v in sizes if len(v) == 3 and min(v) > 0]
    if len(sizes) < 2:
        return ""
    for axis, name in enumerate("xyz"):
        low, high = min(sizes, key=lambda cv: cv[1][axis]), max(sizes, key=lambda cv: cv[1][axis])
        if high[1][axis] > ratio * low[1][axis]:
            median = [sorted(v[a] for _, v in sizes)[len(sizes) // 2] for a in range(3)]
            suggestion = " ".join(f"{m:.3g}" for m in median)
            return (f"the volumes kept their native spacing, which differs by more than {ratio:g}x on axis {name}: "
                    f"{low[1][axis]:.3g} mm ({low[0]}) to {high[1][axis]:.3g} mm ({high[0]}), so a patch covers very "
                    f"different physical sizes; to resample every scan to one grid rerun with --spacing (e.g. --spacing "
                    f"{suggestion}, the median) into a new --dst, or with --overwrite")
    return ""


def add_ct_arguments(parser, spacing_help: str) -> None:
    """Add a CT dataset prepare's ``--window LO HI`` (HU window, default -1000 1000) and ``--spacing X Y Z``
    (default None: the native grid) to a parser; ``spacing_help`` is the dataset's help for ``--spacing``."""
    parser.add_argument("--window", type=float, nargs=2, default=(-1000.0, 1000.0), metavar=("LO", "HI"),
                        help="HU window mapped to [0, 1] (default -1000 1000)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help=spacing_help)
