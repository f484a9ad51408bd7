"""MONAI wrappers: array transforms on one ``(C, *spatial)`` item and their dictionary twins.

Randomness comes only from ``self.R`` (MONAI's ``Randomizable``): ``randomize()`` draws a seed
from it and seeds a CPU ``torch.Generator``, so ``set_random_state`` makes the output reproducible.

Items are checked like the batched functions expect them: a floating-point image in ``value_range``
([0, 1] by default; an integer image such as raw int16 HU or 8-bit PNG pixels, or a float image
outside the range, raises a ``ValueError`` naming the key, instead of being distorted into silent
garbage). The outputs are plain float ``torch.Tensor`` s whatever the input type (numpy array,
``MetaTensor``): no metadata is carried over, since the random flips of a composition or of the
views would make the input's affine wrong for them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import convert_to_tensor
from monai.utils.enums import TransformBackends

from .compositions import Distortion, build_distortion
from .views import ViewAugment

__all__ = ["RandDistortion", "RandDistortiond", "RandViews", "RandViewsd", "RandViewd"]


_SCALE_HINT = ("scale it to [0, 1] first, e.g. ScaleIntensityRanged(keys, a_min=-1000, a_max=1000, b_min=0.0, "
               "b_max=1.0, clip=True) for CT in HU, or ScaleIntensityd for 8-bit images")


def _check_range(value_range: tuple[float, float] | None) -> tuple[float, float] | None:
    if value_range is None:
        return None
    low, high = (float(v) for v in value_range)
    if not low < high:
        raise ValueError(f"value_range={tuple(value_range)!r} must be (low, high) with low < high, or None (not checked)")
    return low, high


def _as_item(img: Any, key: str = "image", value_range: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    t = convert_to_tensor(img, track_meta=False)
    if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4):
        raise ValueError(f"{key!r} must be a channel-first (C, *spatial) 2D or 3D item, got shape "
                         f"{tuple(getattr(t, 'shape', ()))}; add EnsureChannelFirstd before this transform.")
    if not t.is_floating_point():
        raise ValueError(f"{key!r} has dtype {t.dtype}: the distortions and views work on floating-point images in "
                         f"[0, 1] (raw int16 HU or 8-bit pixels would be distorted into garbage); {_SCALE_HINT}.")
    if not t.numel():  # a crop outside the volume, a patch larger than it: PyTorch's errors named no key
        raise ValueError(f"{key!r} is empty (shape {tuple(t.shape)}): nothing to distort or crop views from; check "
                         "the crop before this transform (its patch size against the volume's size, a crop outside it).")
    if value_range is not None:
        low, high = value_range
        lo, hi = float(t.min()), float(t.max())
        slack = 1e-3 * (high - low)
        if lo < low - slack or hi > high + slack:
            raise ValueError(f"{key!r} has intensities from {lo:g} to {hi:g}, outside value_range [{low:g}, {high:g}]; "
                             f"{_SCALE_HINT} (value_range=None skips this check).")
    return t


class _SeededTransform(Randomizable, Transform):
    backend = [TransformBackends.TORCH]

    def __init__(self) -> None:
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed)


class RandDistortion(_SeededTransform):
    """Distort one item: ``distorted, target = RandDistortion("models_genesis")(img)``.

    Args:
        composition: a name for ``build_distortion`` or a ``Distortion`` instance.
        value_range: ``(low, high)`` the item's intensities must lie in (the distortions expect
            [0, 1]); None: not checked. Integer images are always refused.
        **overrides: constructor settings when ``composition`` is a name, ``static_shapes``
            included (items are distorted on the CPU here, where the default subset path is the
            cheaper one).

    Returns:
        ``(distorted, target)``: plain float tensors (no metadata, see the module docstring).

    Raises:
        ValueError: an item that is not channel-first 2D / 3D, not floating-point, or outside ``value_range``.
    """

    def __init__(self, composition: str | Distortion = "models_genesis",
                 value_range: tuple[float, float] | None = (0.0, 1.0), **overrides: Any) -> None:
        super().__init__()
        self.composition = build_distortion(composition, **overrides) if isinstance(composition, str) else composition
        self.value_range = _check_range(value_range)

    def __call__(self, img: Any, randomize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if randomize:
            self.randomize()
        x = _as_item(img, value_range=self.value_range)[None]
        distorted, target = self.composition(x, self.generator())
        return distorted[0], target[0]


class RandDistortiond(Randomizable, MapTransform):
    """Dictionary twin of ``RandDistortion``: writes ``<key>_distorted`` and ``<key>_target``.

    Args:
        keys: keys of the items to distort.
        composition: a name for ``build_distortion`` or a ``Distortion`` instance.
        distorted_suffix: suffix of the output key of the distorted input.
        target_suffix: suffix of the output key of the restoration target.
        allow_missing_keys: don't raise if a key is missing.
        value_range: ``(low, high)`` the items' intensities must lie in; None: not checked.
        **overrides: constructor settings when ``composition`` is a name, ``static_shapes``
            included (items are distorted on the CPU here, where the default subset path is the
            cheaper one).

    The new keys hold plain float tensors (no ``MetaTensor`` metadata, see the module docstring);
    the input key is left as it was.
    """

    backend = RandDistortion.backend

    def __init__(self, keys: KeysCollection, composition: str | Distortion = "models_genesis",
                 distorted_suffix: str = "_distorted", target_suffix: str = "_target",
                 allow_missing_keys: bool = False, value_range: tuple[float, float] | None = (0.0, 1.0),
                 **overrides: Any) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.distort = RandDistortion(composition, value_range=value_range, **overrides)
        self.distorted_suffix, self.target_suffix = distorted_suffix, target_suffix

    def set_random_state(self, seed: int | None = None, state: Any = None) -> RandDistortiond:
        super().set_random_state(seed, state)
        self.distort.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self.distort.randomize()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize()  # a fresh draw per key: several patches in one item get different distortions
            distorted, target = self.distort(_as_item(d[key], str(key), self.distort.value_range), randomize=False)
            d[f"{key}{self.distorted_suffix}"] = distorted
            d[f"{key}{self.target_suffix}"] = target
        return d


class RandViews(_SeededTransform):
    """Two independent views of one item: ``v1, v2 = RandViews(spatial_dims=3)(img)``.

    Args:
        spatial_dims: 2 or 3 (picks the defaults of ``ViewAugment``).
        value_range: ``(low, high)`` the item's intensities must lie in (the views clip to
            [0, 1]); None: not checked. Integer images are always refused.
        **overrides: fields of ``ViewSettings``, and ``static_shapes`` (see ``ViewAugment``).

    Raises:
        ValueError: an item that is not channel-first 2D / 3D, not floating-point, or outside ``value_range``.
    """

    def __init__(self, spatial_dims: int = 3, value_range: tuple[float, float] | None = (0.0, 1.0),
                 **overrides: Any) -> None:
        super().__init__()
        self.augment = ViewAugment(spatial_dims, **overrides)
        self.value_range = _check_range(value_range)

    def __call__(self, img: Any, randomize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if randomize:
            self.randomize()
        v1, v2 = self.augment(_as_item(img, value_range=self.value_range)[None], self.generator())
        return v1[0], v2[0]


class RandViewsd(Randomizable, MapTransform):
    """Dictionary twin of ``RandViews``: writes ``<key>_view1`` and ``<key>_view2``.

    Args:
        keys: keys of the items.
        spatial_dims: 2 or 3.
        view_suffixes: suffixes of the two output keys.
        allow_missing_keys: don't raise if a key is missing.
        value_range: ``(low, high)`` the items' intensities must lie in; None: not checked.
        **overrides: fields of ``ViewSettings``, and ``static_shapes`` (see ``ViewAugment``).

    The new keys hold plain float tensors (no ``MetaTensor`` metadata, see the module docstring).
    """

    backend = RandViews.backend

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3,
                 view_suffixes: tuple[str, str] = ("_view1", "_view2"), allow_missing_keys: bool = False,
                 value_range: tuple[float, float] | None = (0.0, 1.0), **overrides: Any) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.views = RandViews(spatial_dims, value_range=value_range, **overrides)
        self.view_suffixes = tuple(view_suffixes)

    def set_random_state(self, seed: int | None = None, state: Any = None) -> RandViewsd:
        super().set_random_state(seed, state)
        self.views.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self.views.randomize()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize()
            v1, v2 = self.views(_as_item(d[key], str(key), self.views.value_range), randomize=False)
            d[f"{key}{self.view_suffixes[0]}"] = v1
            d[f"{key}{self.view_suffixes[1]}"] = v2
        return d


RandViewd = RandViewsd  # the name used in docs/architecture.md
