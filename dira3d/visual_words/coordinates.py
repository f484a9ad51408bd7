"""Where to crop a visual word: random centres under TransVW's sampling rules.

A coordinate is the **centre** voxel ``(x, y, z)`` of the patch; the patch spans
``centre - patch // 2`` to ``centre - patch // 2 + patch`` (exclusive) on each axis. Rules:

- the patch stays ``border`` voxels away from every face of the volume (reference: 100 voxels
  in-plane, 30 slices, for 64×64×32 patches);
- the centre is at least ``min_distance`` voxels (Euclidean) from every earlier class centre:
  crops are taken at the same voxel coordinate from all neighbours, so nearby centres would make
  two classes out of the same anatomy;
- the patch is "mostly lung": at most ``max_dense_fraction`` of its voxels are at or above
  ``dense_threshold`` (−150 HU → 0.425 on the [−1000, 1000] window).
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
        max_tries: random centres tried per reference before giving up on it.
    """

    patch_size: tuple[int, int, int] = (64, 64, 32)
    border: tuple[int, int, int] = (100, 100, 30)
    min_distance: float = 5.0
    dense_threshold: float = 0.425
    max_dense_fraction: float = 0.15
    max_tries: int = 200

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch size {self.patch_size} must be three positive sizes (x, y, z)")
        if len(self.border) != 3 or min(self.border) < 0:
            raise ValueError(f"border {self.border} must be three non-negative sizes (x, y, z)")
        if not 0.0 <= self.max_dense_fraction <= 1.0:
            raise ValueError(f"max dense fraction {self.max_dense_fraction} must be in [0, 1]")
        if self.max_tries < 1:
            raise ValueError(f"max tries {self.max_tries} must be >= 1")


def dense_fraction(cube: np.ndarray, threshold: float) -> float:
    """Fraction of voxels at or above ``threshold``."""
    return float(np.count_nonzero(np.asarray(cube) >= threshold)) / max(1, np.asarray(cube).size)


def is_mostly_lung(cube: np.ndarray, threshold: float = 0.425, max_fraction: float = 0.15) -> bool:
    """TransVW's lung filter: at most ``max_fraction`` of the cube is at/above ``threshold``."""
    return dense_fraction(cube, threshold) <= max_fraction


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
                    "the reference's faces"
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
    too_close = too_dense = 0
    for _ in range(rules.max_tries):
        centre = np.array([rng.randint(lo, hi + 1) for lo, hi in ranges])
        if len(prev) and np.sqrt(((prev - centre) ** 2).sum(axis=1)).min() < rules.min_distance:
            too_close += 1
            continue
        if not is_mostly_lung(image[patch_slices(centre, rules.patch_size)], rules.dense_threshold, rules.max_dense_fraction):
            too_dense += 1
            continue
        return tuple(int(c) for c in centre)  # type: ignore[return-value]
    raise CoordinateSamplingError(
        f"{name}: no valid patch centre in {rules.max_tries} tries ({too_dense} had more than "
        f"{rules.max_dense_fraction:.0%} of voxels >= {rules.dense_threshold:.3f}, {too_close} were closer than "
        f"{rules.min_distance} voxels to an earlier class)"
    )
