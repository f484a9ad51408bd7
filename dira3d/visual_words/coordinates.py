"""Where to crop a visual word: random centres under TransVW's sampling rules.

A coordinate is the **centre** voxel ``(x, y, z)`` of the patch; the patch spans
``centre - patch // 2`` to ``centre - patch // 2 + patch`` (exclusive) on each axis. Rules:

- the patch stays ``border`` voxels away from every face of the volume (reference: 100 voxels
  in-plane, 30 slices, for 64×64×32 patches);
- the centre is at least ``min_distance`` voxels (Euclidean) from every earlier class centre:
  crops are taken at the same voxel coordinate from all neighbours, so nearby centres would make
  two classes out of the same anatomy;
- the patch is "mostly lung": at most ``max_dense_fraction`` of its voxels are at or above
  ``dense_threshold`` (−150 HU → 0.425 on the [−1000, 1000] window);
- (an addition to TransVW, off unless ``max_outside_fraction`` < 1) at most ``max_outside_fraction`` of the
  patch lies outside the body: air (below ``air_threshold``, −500 HU → 0.25) connected to the edge of its axial
  slice. Air around the patient passes the lung rule as well as lung does (nothing in it is dense).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CoordinateSamplingError",
    "VolumeTooSmallError",
    "CoordinateRules",
    "hu_to_unit",
    "dense_fraction",
    "is_mostly_lung",
    "outside_body",
    "centre_range",
    "patch_slices",
    "sample_coordinate",
]


class CoordinateSamplingError(ValueError):
    """No coordinate in a volume satisfies the rules within the allowed tries."""


class VolumeTooSmallError(CoordinateSamplingError):
    """A volume cannot hold the patch plus its borders."""


def hu_to_unit(hu: float, window: tuple[float, float] = (-1000.0, 1000.0)) -> float:
    """Map a HU value to the [0, 1] scale of a volume windowed to ``window`` (−150 → 0.425)."""
    lo, hi = window
    if hi <= lo:
        raise ValueError(f"HU window {window} must have lo < hi")
    return (float(hu) - lo) / (hi - lo)


@dataclass(frozen=True)
class CoordinateRules:
    """The sampling rules (reference values by default).

    Args:
        patch_size: (x, y, z) of a visual-word patch.
        border: minimum distance of the patch from the volume faces, per axis.
        min_distance: minimum Euclidean distance (voxels) between class centres.
        dense_threshold: intensity (on the [0, 1] scale) counted as dense tissue.
        max_dense_fraction: largest allowed fraction of dense voxels in the patch.
        max_outside_fraction: largest allowed fraction of the patch outside the body (1.0: not checked).
        air_threshold: intensity below which a voxel is air, for the body outline (:func:`outside_body`).
        max_tries: random centres tried per reference before giving up on it.
    """

    patch_size: tuple[int, int, int] = (64, 64, 32)
    border: tuple[int, int, int] = (100, 100, 30)
    min_distance: float = 5.0
    dense_threshold: float = 0.425
    max_dense_fraction: float = 0.15
    max_tries: int = 200
    max_outside_fraction: float = 1.0
    air_threshold: float = 0.25

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch size {self.patch_size} must be three positive sizes (x, y, z)")
        if len(self.border) != 3 or min(self.border) < 0:
            raise ValueError(f"border {self.border} must be three non-negative sizes (x, y, z)")
        if not 0.0 <= self.max_dense_fraction <= 1.0:
            raise ValueError(f"max dense fraction {self.max_dense_fraction} must be in [0, 1]")
        if not 0.0 <= self.max_outside_fraction <= 1.0:
            raise ValueError(f"max outside fraction {self.max_outside_fraction} must be in [0, 1] (--max-outside-fraction)")
        if self.max_tries < 1:
            raise ValueError(f"max tries {self.max_tries} must be >= 1")


def dense_fraction(cube: np.ndarray, threshold: float) -> float:
    """Fraction of voxels at or above ``threshold``."""
    return float(np.count_nonzero(np.asarray(cube) >= threshold)) / max(1, np.asarray(cube).size)


def is_mostly_lung(cube: np.ndarray, threshold: float = 0.425, max_fraction: float = 0.15) -> bool:
    """TransVW's lung filter: at most ``max_fraction`` of the cube is at/above ``threshold``."""
    return dense_fraction(cube, threshold) <= max_fraction


def outside_body(image: np.ndarray, air_threshold: float = 0.25) -> np.ndarray:
    """``(X, Y, Z)`` mask of the air outside the body: per axial slice, the voxels below ``air_threshold``
    connected to the slice's edge (the lungs and bowel gas, enclosed by the body, are inside)."""
    from scipy.ndimage import binary_fill_holes

    tissue = np.asarray(image) >= air_threshold
    return ~np.stack([binary_fill_holes(tissue[..., k]) for k in range(tissue.shape[-1])], axis=-1)


def centre_range(shape: Sequence[int], rules: CoordinateRules, name: str = "volume",
                 fit: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Inclusive ``(lo, hi)`` range of valid centres per axis.

    Args:
        shape: the volume's spatial size.
        rules: the sampling rules (patch size and borders).
        name: how the volume is named in errors.
        fit: the size of the smallest volume the patch is also cut from (the class's neighbours,
            cut at the same voxel): the whole patch must lie inside it too (no border there).

    Raises:
        VolumeTooSmallError: the volume cannot hold patch + borders; the message names it.
        CoordinateSamplingError: the volume could, but no centre also keeps the patch inside ``fit``.
    """
    ranges = []
    for axis, (size, p, b) in enumerate(zip(shape, rules.patch_size, rules.border)):
        lo, hi = b + p // 2, size - b - p + p // 2
        if hi < lo:
            raise VolumeTooSmallError(
                f"{name} has size {tuple(int(s) for s in shape)} but patch {rules.patch_size} with borders "
                f"{rules.border} needs at least {2 * b + p} voxels on axis {'xyz'[axis]}; use smaller borders "
                "(--border) or patches (--patch-size), or leave this volume out"
            )
        if fit is not None:
            hi = min(hi, int(fit[axis]) - p + p // 2)
            if hi < lo:
                raise CoordinateSamplingError(
                    f"{name}: a neighbour of size {tuple(int(s) for s in fit)} (the smallest extent on each axis) "
                    f"leaves no centre on axis {'xyz'[axis]} that keeps the patch inside it and {b} voxels from "
                    "the reference's faces; "
                    + (f"use --border with {'xyz'[axis]} {int(fit[axis]) - p} or less" if int(fit[axis]) >= p else
                       f"use --patch-size with {'xyz'[axis]} {int(fit[axis])} or less (or leave the smaller volumes out)")
                )
        ranges.append((lo, hi))
    return ranges


def patch_slices(centre: Sequence[int], patch_size: Sequence[int]) -> tuple[slice, slice, slice]:
    """Spatial slices of the patch centred at ``centre``."""
    return tuple(slice(int(c) - p // 2, int(c) - p // 2 + p) for c, p in zip(centre, patch_size))  # type: ignore[return-value]


def sample_coordinate(
    volume: np.ndarray,
    rules: CoordinateRules,
    rng: np.random.RandomState,
    previous: Sequence[Sequence[int]] = (),
    name: str = "volume",
    fit: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """Draw a patch centre in ``volume`` that satisfies ``rules``.

    Args:
        volume: ``(C, X, Y, Z)`` or ``(X, Y, Z)`` intensities in [0, 1] (the first channel is tested).
        rules: the sampling rules.
        rng: the random state (e.g. a MONAI ``Randomizable.R``).
        previous: earlier class centres.
        name: how the volume is named in errors.
        fit: spatial size the patch must also fit in, from index 0 (see :func:`centre_range`).

    Returns:
        The centre ``(x, y, z)``.

    Raises:
        VolumeTooSmallError: the volume cannot hold patch + borders.
        CoordinateSamplingError: ``max_tries`` draws all broke a rule (the message counts why), or
            no centre keeps the patch inside ``fit``.
    """
    image = np.asarray(volume)
    image = image[0] if image.ndim == 4 else image
    if image.ndim != 3:
        raise ValueError(f"{name}: expected a (C, X, Y, Z) or (X, Y, Z) volume, got shape {np.asarray(volume).shape}")
    ranges = centre_range(image.shape, rules, name, fit)
    prev = np.asarray(previous, dtype=float).reshape(-1, 3)
    too_close = too_dense = outside = 0
    least_dense = least_outside = 1.0  # of the patches tried: the setting that would have taken one
    air = outside_body(image, rules.air_threshold) if rules.max_outside_fraction < 1.0 else None
    for _ in range(rules.max_tries):
        centre = np.array([rng.randint(lo, hi + 1) for lo, hi in ranges])
        if len(prev) and np.sqrt(((prev - centre) ** 2).sum(axis=1)).min() < rules.min_distance:
            too_close += 1
            continue
        dense = dense_fraction(image[patch_slices(centre, rules.patch_size)], rules.dense_threshold)
        if dense > rules.max_dense_fraction:
            too_dense, least_dense = too_dense + 1, min(least_dense, dense)
            continue
        share = float(air[patch_slices(centre, rules.patch_size)].mean()) if air is not None else 0.0
        if share > rules.max_outside_fraction:
            outside, least_outside = outside + 1, min(least_outside, share)
            continue
        return tuple(int(c) for c in centre)  # type: ignore[return-value]
    raise CoordinateSamplingError(
        f"{name}: no valid patch centre in {rules.max_tries} tries ({too_dense} had more than "
        f"{rules.max_dense_fraction:.0%} of voxels >= {rules.dense_threshold:.3f}, {too_close} were closer than "
        f"{rules.min_distance} voxels to an earlier class"
        + (f", {outside} lay more than {rules.max_outside_fraction:.0%} outside the body" if air is not None else "")
        + ")" + _advice(too_dense, least_dense, outside, least_outside, too_close, rules)
    )


def _advice(too_dense: int, least_dense: float, outside: int, least_outside: float, too_close: int,
            rules: CoordinateRules) -> str:
    """The setting to change, and to what, for the rule that refused most of the tries."""
    most = max(too_dense, outside, too_close)
    if most == 0:
        return ""
    if most == too_dense:
        return (f"; --max-dense-fraction {np.ceil(least_dense * 100) / 100:g} would take the least dense patch "
                "tried (or --lung-filter off for scans that are not chest CT)")
    if most == outside:
        return (f"; --max-outside-fraction {np.ceil(least_outside * 100) / 100:g} would take the patch least outside "
                "the body (or --body-filter off), or use smaller --border / --patch-size")
    return f"; use a --min-distance below {rules.min_distance:g} or fewer --classes"

