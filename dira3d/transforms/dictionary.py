"""MONAI wrappers: array transforms on one ``(C, *spatial)`` item and their dictionary twins.

Randomness comes only from ``self.R`` (MONAI's ``Randomizable``): ``randomize()`` draws a seed
from it and seeds a CPU ``torch.Generator``, so ``set_random_state`` makes the output reproducible.
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


def _as_item(img: Any, key: str = "image") -> torch.Tensor:
    t = convert_to_tensor(img, track_meta=False)
    if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4):
        raise ValueError(f"{key!r} must be a channel-first (C, *spatial) 2D or 3D item, got shape "
                         f"{tuple(getattr(t, 'shape', ()))}; add EnsureChannelFirstd before this transform.")
    return t.float() if not t.is_floating_point() else t


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
        **overrides: constructor settings when ``composition`` is a name, ``static_shapes``
            included (items are distorted on the CPU here, where the default subset path is the
            cheaper one).
    """

    def __init__(self, composition: str | Distortion = "models_genesis", **overrides: Any) -> None:
        super().__init__()
        self.composition = build_distortion(composition, **overrides) if isinstance(composition, str) else composition

    def __call__(self, img: Any, randomize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if randomize:
            self.randomize()
        x = _as_item(img)[None]
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
        **overrides: constructor settings when ``composition`` is a name, ``static_shapes``
            included (items are distorted on the CPU here, where the default subset path is the
            cheaper one).
    """

    backend = RandDistortion.backend

    def __init__(self, keys: KeysCollection, composition: str | Distortion = "models_genesis",
                 distorted_suffix: str = "_distorted", target_suffix: str = "_target",
                 allow_missing_keys: bool = False, **overrides: Any) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.distort = RandDistortion(composition, **overrides)
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
            distorted, target = self.distort(_as_item(d[key], str(key)), randomize=False)
            d[f"{key}{self.distorted_suffix}"] = distorted
            d[f"{key}{self.target_suffix}"] = target
        return d


class RandViews(_SeededTransform):
    """Two independent views of one item: ``v1, v2 = RandViews(spatial_dims=3)(img)``.

    Args:
        spatial_dims: 2 or 3 (picks the defaults of ``ViewAugment``).
        **overrides: fields of ``ViewSettings``, and ``static_shapes`` (see ``ViewAugment``).
    """

    def __init__(self, spatial_dims: int = 3, **overrides: Any) -> None:
        super().__init__()
        self.augment = ViewAugment(spatial_dims, **overrides)

    def __call__(self, img: Any, randomize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if randomize:
            self.randomize()
        v1, v2 = self.augment(_as_item(img)[None], self.generator())
        return v1[0], v2[0]


class RandViewsd(Randomizable, MapTransform):
    """Dictionary twin of ``RandViews``: writes ``<key>_view1`` and ``<key>_view2``.

    Args:
        keys: keys of the items.
        spatial_dims: 2 or 3.
        view_suffixes: suffixes of the two output keys.
        allow_missing_keys: don't raise if a key is missing.
        **overrides: fields of ``ViewSettings``, and ``static_shapes`` (see ``ViewAugment``).
    """

    backend = RandViews.backend

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3,
                 view_suffixes: tuple[str, str] = ("_view1", "_view2"), allow_missing_keys: bool = False,
                 **overrides: Any) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.views = RandViews(spatial_dims, **overrides)
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
            v1, v2 = self.views(_as_item(d[key], str(key)), randomize=False)
            d[f"{key}{self.view_suffixes[0]}"] = v1
            d[f"{key}{self.view_suffixes[1]}"] = v2
        return d


RandViewd = RandViewsd  # the name used in docs/architecture.md
