"""Transforms used by the fine-tuning bundles.

:class:`SelectModalities` / :class:`SelectModalitiesd` pick MR sequences from a BraTS image. The
prepared BraTS image is either a 4-channel volume (t1, t1ce, t2, flair, channel first after
``EnsureChannelFirstd``) or a single FLAIR volume; the bundle's ``modalities`` setting chooses
which sequences the network sees. :class:`NormalizeMRd` applies the data preparation's MR
normalisation (``dira3d.data.normalize.normalize_mr``) per channel, for inference on raw scans.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["BRATS_MODALITIES", "SelectModalities", "SelectModalitiesd", "NormalizeMRd", "modality_channels"]

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")


def modality_channels(modalities: str | Sequence[str]) -> list[str]:
    """Normalise the ``modalities`` setting: ``"all"``, ``"flair"``, ``"t1,t2"`` or a list of names.

    Raises:
        ValueError: an unknown sequence name.
    """
    if isinstance(modalities, str):
        names = list(BRATS_MODALITIES) if modalities.strip().lower() == "all" else [m.strip().lower() for m in modalities.split(",")]
    else:
        names = [str(m).lower() for m in modalities]
    unknown = [m for m in names if m not in BRATS_MODALITIES]
    if unknown or not names:
        raise ValueError(f"modalities={modalities!r}: unknown sequence(s) {unknown}; use 'all' or names from {BRATS_MODALITIES}")
    return names


class SelectModalities(Transform):
    """Keep the requested MR sequences of a channel-first image.

    Args:
        modalities: ``"all"``, ``"flair"``, a comma-separated string or a list of names from
            ``("t1", "t1ce", "t2", "flair")``.

    Raises:
        ValueError: (on call) the image has neither 4 channels nor a single channel, or has a single
            channel while more than one sequence is requested.
    """

    def __init__(self, modalities: str | Sequence[str] = "all") -> None:
        self.names = modality_channels(modalities)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        channels = img.shape[0]
        if channels == len(BRATS_MODALITIES):
            index = [BRATS_MODALITIES.index(n) for n in self.names]
            return img[index]
        if channels == 1 and len(self.names) == 1:
            return img  # a single-sequence volume (FLAIR-only preparation) is taken as it is
        raise ValueError(
            f"image has {channels} channel(s) but modalities={self.names}; BraTS images must hold "
            f"{len(BRATS_MODALITIES)} channels {BRATS_MODALITIES} or one sequence (set modalities to 'flair')"
        )


class SelectModalitiesd(MapTransform):
    """Dictionary form of :class:`SelectModalities`."""

    def __init__(self, keys: KeysCollection, modalities: str | Sequence[str] = "all", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.selector = SelectModalities(modalities)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.selector(d[key])
        return d


class NormalizeMRd(MapTransform):
    """Scale each channel of an MR image to [0, 1] by percentiles of its non-zero voxels.

    The same normalisation as data preparation (``dira3d.data.normalize.normalize_mr``), so a raw
    scan given to ``inference.json`` looks like the prepared training volumes.

    Args:
        keys: keys of the images to normalise.
        lower, upper: percentiles (0–100) mapped to 0 and 1.
    """

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        from dira3d.data.normalize import normalize_mr  # sibling module

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            channels = [torch.as_tensor(normalize_mr(c.detach().cpu().numpy(), lower=self.lower, upper=self.upper)) for c in img]
            out = torch.stack(channels).to(img.device)
            # keep the MetaTensor (affine, applied operations) so Invertd can undo the spatial steps
            d[key] = img.clone().copy_(out) if hasattr(img, "meta") else out
        return d
