"""Restorative distortions, compositions, views T(.) and MONAI wrappers (see docs/architecture.md).

Everything works on ``(B, C, *spatial)`` batches in [0, 1], 2D or 3D, on the input's device, with an
explicit ``torch.Generator`` (on the CPU or on the input's device).

The MONAI dictionary wrappers (``RandDistortiond``, ``RandViewsd``, ...) are imported on first use,
so that the pure-torch distortions load without importing MONAI (seconds saved per process).
"""

from typing import Any

from .compositions import (
    DISTORTIONS,
    DiRA2DDistortion,
    Distortion,
    ModelsGenesisDistortion,
    NoDistortion,
    TransVWDistortion,
    build_distortion,
)
from .distortions2d import cutout, outer_cutout, patch_swap
from .intensity import nonlinear_intensity
from .painting import inpaint, outpaint
from .shuffle import local_pixel_shuffle
from .spatial import elastic_inplane, random_flip
from .views import ViewAugment, ViewSettings, gaussian_blur, random_views

__all__ = [
    "DISTORTIONS",
    "DiRA2DDistortion",
    "Distortion",
    "ModelsGenesisDistortion",
    "NoDistortion",
    "RandDistortion",
    "RandDistortiond",
    "RandViewd",
    "RandViews",
    "RandViewsd",
    "TransVWDistortion",
    "ViewAugment",
    "ViewSettings",
    "build_distortion",
    "cutout",
    "elastic_inplane",
    "gaussian_blur",
    "inpaint",
    "local_pixel_shuffle",
    "nonlinear_intensity",
    "outer_cutout",
    "outpaint",
    "patch_swap",
    "random_flip",
    "random_views",
]

_MONAI_WRAPPERS = {"RandDistortion", "RandDistortiond", "RandViews", "RandViewsd", "RandViewd"}


def __getattr__(name: str) -> Any:
    if name in _MONAI_WRAPPERS:
        from . import dictionary

        return getattr(dictionary, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
