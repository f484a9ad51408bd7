"""MONAI transforms that cut visual-word patches at given centres.

They compose with the usual loading chain, e.g.::

    Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", "RAS"),
             VisualWordCropd("image", centres_key="vw_centres", patch_size=(64, 64, 32))])

Multi-resolution (TransVW): besides the patch itself, two more crops per centre with a random
in-plane square of 50–79 voxels (for a 64-voxel patch; scaled with the patch size), shifted by
−10…9 voxels (scaled likewise), over the same slices, resized back to the patch size.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Resize, Transform

from dira3d.visual_words.coordinates import patch_slices

__all__ = ["VisualWordCrop", "VisualWordCropd"]

# TransVW's multi-resolution ranges, for the reference 64-voxel in-plane patch
_REF_SIDE, _SIDE_RANGE, _SHIFT_RANGE = 64, (50, 79), (-10, 9)


class VisualWordCrop(Randomizable, Transform):
    """Crop ``(C, X, Y, Z)`` patches centred at given voxels (array form).

    Args:
        patch_size: (x, y, z) of a patch.
        multi_resolution: add two randomly scaled and shifted in-plane crops per centre.
        extra_resolutions: how many scaled crops to add when ``multi_resolution`` is on.

    Raises:
        ValueError: a patch or scaled crop does not fit in the volume (the message names the centre).
    """

    backend = [torch.Tensor, np.ndarray]

    def __init__(self, patch_size: Sequence[int], multi_resolution: bool = False, extra_resolutions: int = 2) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.multi_resolution = multi_resolution
        self.extra_resolutions = extra_resolutions if multi_resolution else 0
        px = self.patch_size[0]
        self.side_range = tuple(max(1, round(s * px / _REF_SIDE)) for s in _SIDE_RANGE)
        self.shift_range = tuple(round(s * px / _REF_SIDE) for s in _SHIFT_RANGE)
        self._resize = Resize(spatial_size=self.patch_size, mode="trilinear", align_corners=False)
        self._boxes: list[tuple[int, int, int]] = []

    @property
    def resolutions(self) -> int:
        """Crops per centre (1, or 3 with multi-resolution)."""
        return 1 + self.extra_resolutions

    def randomize(self, data: object = None) -> None:
        """Draw ``(side, shift_x, shift_y)`` for each extra resolution of one centre."""
        self._boxes = [
            (
                int(self.R.randint(self.side_range[0], self.side_range[1] + 1)),
                int(self.R.randint(self.shift_range[0], self.shift_range[1] + 1)),
                int(self.R.randint(self.shift_range[0], self.shift_range[1] + 1)),
            )
            for _ in range(self.extra_resolutions)
        ]

    def _crop(self, img: torch.Tensor, centre: Sequence[int]) -> torch.Tensor:
        shape = img.shape[1:]
        sl = patch_slices(centre, self.patch_size)
        if any(s.start < 0 or s.stop > n for s, n in zip(sl, shape)):
            raise ValueError(
                f"visual-word patch {self.patch_size} at centre {tuple(int(c) for c in centre)} does not fit in a "
                f"volume of size {tuple(shape)}; sample centres with dira3d.visual_words.sample_coordinate"
            )
        crops = [img[(slice(None), *sl)]]
        px, py = self.patch_size[:2]
        for side, dx, dy in self._boxes:
            sides = (side, max(1, round(side * py / px)))
            region = [sl[2]]
            for axis in (1, 0):  # y then x, prepended so the list ends up (x, y, z)
                s, n = sides[axis], shape[axis]
                if s > n:
                    raise ValueError(f"multi-resolution crop of {s} voxels does not fit a volume of size {tuple(shape)}")
                start = int(centre[axis]) + (dx, dy)[axis] - s // 2
                start = min(max(start, 0), n - s)  # keep the enlarged square inside the volume
                region.insert(0, slice(start, start + s))
            crops.append(self._resize(img[(slice(None), *region)]))
        # plain tensors out: Resize returns MetaTensors, whose metadata means nothing for a patch stack
        return torch.stack([(c.as_tensor() if isinstance(c, MetaTensor) else torch.as_tensor(c)).float() for c in crops])

    def __call__(
        self, img: torch.Tensor | np.ndarray, centres: Sequence[Sequence[int]], seeds: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Crop every centre.

        Args:
            img: ``(C, X, Y, Z)`` volume.
            centres: ``(M, 3)`` patch centres.
            seeds: optional per-centre seeds for the multi-resolution draws, so a crop does not
                depend on which other centres share the call; without them ``self.R`` is used.

        Returns:
            ``(M, R, C, X, Y, Z)`` float32 tensor, ``R`` = :attr:`resolutions`.
        """
        img_t = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        img_t = img_t.float()
        if img_t.ndim != 4:
            raise ValueError(f"VisualWordCrop expects a channel-first (C, X, Y, Z) volume, got shape {tuple(img_t.shape)}")
        if seeds is not None and len(seeds) != len(centres):
            raise ValueError(f"got {len(seeds)} seeds for {len(centres)} centres; give one seed per centre")
        out = []
        for i, centre in enumerate(centres):
            if seeds is not None:
                self.set_random_state(seed=int(seeds[i]))
            self.randomize()
            out.append(self._crop(img_t, centre))
        c = img_t.shape[0]
        return torch.stack(out) if out else torch.zeros((0, self.resolutions, c, *self.patch_size))


class VisualWordCropd(Randomizable, MapTransform):
    """Dictionary form of :class:`VisualWordCrop`.

    Reads centres from ``data[centres_key]`` (and per-centre seeds from ``data[seeds_key]`` when
    given) and writes ``(M, R, C, X, Y, Z)`` patches to ``data[f"{key}{output_postfix}"]``.

    Args:
        keys: image keys.
        centres_key: key of the ``(M, 3)`` centres.
        patch_size: (x, y, z).
        multi_resolution: add two scaled crops per centre.
        seeds_key: optional key of per-centre seeds.
        output_postfix: appended to each image key for the output.
        allow_missing_keys: don't raise if a key is absent.
    """

    backend = VisualWordCrop.backend

    def __init__(
        self,
        keys: KeysCollection,
        centres_key: str = "vw_centres",
        patch_size: Sequence[int] = (64, 64, 32),
        multi_resolution: bool = False,
        seeds_key: str | None = None,
        output_postfix: str = "_patches",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.cropper = VisualWordCrop(patch_size, multi_resolution)
        self.centres_key, self.seeds_key, self.output_postfix = centres_key, seeds_key, output_postfix

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> VisualWordCropd:
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, data: object = None) -> None:
        self.cropper.randomize(data)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if self.centres_key not in d:
            raise KeyError(f"VisualWordCropd: the data has no {self.centres_key!r} entry with patch centres")
        centres = np.asarray(d[self.centres_key], dtype=int).reshape(-1, 3)
        seeds = d.get(self.seeds_key) if self.seeds_key else None
        for key in self.key_iterator(d):
            d[f"{key}{self.output_postfix}"] = self.cropper(d[key], centres, seeds)  # type: ignore[arg-type]
        return d
