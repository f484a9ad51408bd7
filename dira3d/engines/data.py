"""Pretraining patches from a datalist of volumes: two patches per volume, pseudo-labels per image.

Two patch-pair policies (``pair``):

- ``"instances"``: two crops at independent random positions of one volume → ``image`` and
  ``image2``. With :func:`with_image_labels` every volume is its own pseudo-class (patent claim 11,
  "every image a class"), which is what ``dis_mode="visual_words"`` trains on when no TransVW
  visual-word manifest is at hand; the instance modes use the two crops as two views' sources.
- ``"views"``: one crop → ``image`` only; the trainer draws both views T(·) from it.

For ``spatial_dims=2`` a random axial slice (last axis) of a 3D volume is cropped to an
``(H, W)`` patch, so one prepared 3D datalist serves both settings.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, SpatialPad

from dira3d.data.errors import DataError
from dira3d.utils.warning_format import Dira3dWarning

__all__ = ["PAIR_POLICIES", "RandPatchPair", "RandPatchPaird", "with_image_labels"]

PAIR_POLICIES = ("instances", "views")


class RandPatchPair(Randomizable):
    """Crop one or two random patches of ``patch_size`` from a channel-first volume.

    Args:
        patch_size: ``(x, y, z)`` for 3D or ``(h, w)`` for 2D patches.
        spatial_dims: 3, or 2 to crop 2D patches from a random slice of a 3D volume (or from a 2D image).
        pair: ``"instances"`` (two crops) or ``"views"`` (one crop).

    Raises:
        DataError: ``patch_size`` does not have ``spatial_dims`` entries, a ``spatial_dims`` other than 2 or 3, or an
            unknown ``pair`` (a ``ValueError``; one ``error:`` line under ``python -m monai.bundle run``).
    """

    def __init__(self, patch_size: Sequence[int], spatial_dims: int = 3, pair: str = "instances") -> None:
        if spatial_dims not in (2, 3):
            raise DataError(None, f"spatial_dims={spatial_dims!r} is not supported; use 2 or 3")
        sizes = list(patch_size) if isinstance(patch_size, (Sequence, np.ndarray)) and not isinstance(patch_size, str) else None
        if (sizes is None or len(sizes) != spatial_dims  # patch_size=32 failed with a bare "has no len()" TypeError
                or not all(isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 1 and float(n).is_integer()
                           for n in sizes)):
            raise DataError(None, f"patch_size={patch_size if sizes is None else sizes!r} must have {spatial_dims} "
                            f"positive sizes for spatial_dims={spatial_dims}, a list of whole numbers, e.g. "
                            f"patch_size={[64, 64, 32][:spatial_dims] if spatial_dims == 3 else [224, 224]}")
        if pair not in PAIR_POLICIES:
            raise DataError(None, f"pair={pair!r} is not supported; choose one of {', '.join(PAIR_POLICIES)}")
        self.patch_size, self.spatial_dims, self.pair = tuple(int(p) for p in patch_size), spatial_dims, pair
        self._starts: list[tuple[int, ...]] = []

    def _roi(self, volume_dims: int) -> tuple[int, ...]:
        if volume_dims == self.spatial_dims:
            return self.patch_size
        if volume_dims == 3 and self.spatial_dims == 2:
            return self.patch_size + (1,)  # one slice
        raise ValueError(f"a {volume_dims}D image cannot give {self.spatial_dims}D patches; check spatial_dims")

    def randomize(self, shape: Sequence[int]) -> None:
        """Draw the corner(s) for a (padded) volume of spatial ``shape``."""
        roi = self._roi(len(shape))
        count = 2 if self.pair == "instances" else 1
        self._starts = [tuple(int(self.R.randint(0, s - p + 1)) for s, p in zip(shape, roi)) for _ in range(count)]

    def __call__(self, img: Any, randomize: bool = True) -> list[torch.Tensor]:
        """Return ``[patch1, patch2]`` (instances) or ``[patch1]`` (views), each ``(C, *patch_size)``."""
        # plain tensors: patches are training inputs, their crop history is not needed downstream,
        # and MetaTensor slicing and collation cost more than the copy itself
        source = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
        img = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        roi = self._roi(img.dim() - 1)
        if any(s < r for s, r in zip(img.shape[1:], roi)):  # only small volumes: a pad copies the whole volume
            _warn_padding(tuple(img.shape[1:]), roi, source)
            img = SpatialPad(spatial_size=roi)(img)  # padded with 0 (air / background)
        if randomize:
            self.randomize(img.shape[1:])
        patches = []
        for start in self._starts:
            index = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, roi))
            patch = img[index]
            if len(roi) != self.spatial_dims:
                patch = patch[..., 0]
            patches.append(patch.clone(memory_format=torch.contiguous_format))  # a copy, never a view of the cache
        return patches


_PADDED_SHAPES: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()


def _warn_padding(shape: tuple[int, ...], roi: tuple[int, ...], source: str | None = None) -> None:
    """Say once per volume shape (and process) that its patches are partly zero padding: a thick-slice
    scan (e.g. an MRI of 25 slices for 32-slice patches) would otherwise train on a band of zeros silently.
    ``source``: the file of the volume (named, so that the user can find it; others of its shape are not)."""
    if (shape, roi) in _PADDED_SHAPES:
        return
    _PADDED_SHAPES.add((shape, roi))
    short = ", ".join(f"axis {'xyz'[i] if len(shape) == 3 else i} {s} < {r}" for i, (s, r) in enumerate(zip(shape, roi)) if s < r)
    warnings.warn(
        f"a volume of shape {list(shape)}{f' ({source}; others of this shape are not named)' if source else ''} is "
        f"smaller than the patch {list(roi)} ({short}): its patches are padded with zeros; resample it to thinner "
        "slices (`dira3d prepare ... --spacing`) or choose a smaller patch_size",
        Dira3dWarning, stacklevel=3)


class RandPatchPaird(Randomizable, MapTransform):
    """Dictionary twin of :class:`RandPatchPair`: ``d[key]`` → ``d[key]`` (+ ``d[second_key]``).

    Args:
        keys: the image key (one key).
        patch_size / spatial_dims / pair: as in :class:`RandPatchPair`.
        second_key: where the second instance goes (``pair="instances"``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: Sequence[int],
        spatial_dims: int = 3,
        pair: str = "instances",
        second_key: str = "image2",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"RandPatchPaird crops one image key, got keys={list(self.keys)}")
        self.cropper = RandPatchPair(patch_size, spatial_dims, pair)
        self.second_key = second_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandPatchPaird:
        super().set_random_state(seed, state)
        self.cropper.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        self.cropper.randomize(data)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            patches = self.cropper(d[key])
            d[key] = patches[0]
            if len(patches) > 1:
                d[self.second_key] = patches[1]
        return d


def with_image_labels(items: Sequence[Mapping[str, Any]], key: str = "label",
                      image_key: str = "image") -> list[dict[str, Any]]:
    """Entries of ``image_key`` alone, entry *i* given the class ``i`` ("every image a class").

    Pretraining reads nothing else of an entry, and the other keys of a prepared task datalist need not collate into
    a batch: ``reader_nodule_ids`` of ``dira3d prepare lidc`` (one id per reader, its length varying) failed MONAI's
    collate ("each element in list of batch should be of equal size"), a key some entries lack (``malignancy``,
    ``diameter_mm``) too; a ``label`` mask path is replaced by the class.

    Raises:
        ValueError: an empty datalist.
    """
    if not items:
        raise ValueError("the pretraining datalist has no entries; check its 'training' list and paths")
    return [{image_key: item[image_key], key: index} for index, item in enumerate(items)]
