"""Transforms used by the fine-tuning bundles.

:class:`SelectModalities` / :class:`SelectModalitiesd` pick MR sequences from a BraTS image. The
prepared BraTS image holds the sequences ``dira3d prepare brats --modalities`` wrote, in that order
(default t1, t1ce, t2, flair; channel first after ``EnsureChannelFirstd``), and the datalist's
``meta.channels`` names them (:func:`datalist_channels`); the bundle's ``modalities`` setting chooses
which sequences the network sees, ``image_channels`` says which the image holds. :class:`NormalizeMRd` applies the data preparation's MR
normalisation (``dira3d.data.normalize.normalize_mr``) per channel, for inference on raw scans;
:class:`NormalizeScand` applies either preparation (``modality`` ``ct``: the HU window; ``mr``: percentiles), as
``dira3d prepare generic --modality`` did for the volumes a model was fine-tuned on.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from dira3d.data.errors import DataError
from dira3d.engines.inputs import source_of

__all__ = ["BRATS_MODALITIES", "SelectModalities", "SelectModalitiesd", "NormalizeMRd", "NormalizeScand",
           "datalist_channels", "modality_channels"]

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


def datalist_channels(datalist: str | None) -> list[str] | None:
    """The sequences a prepared BraTS datalist's images hold, in channel order (``meta.channels``,
    written by ``dira3d prepare brats``); None when the file or the key is absent (then the images are
    taken to hold t1, t1ce, t2, flair, or the one requested sequence)."""
    from dira3d.data.datalist import datalist_meta

    channels = datalist_meta(datalist).get("channels")
    return [str(c) for c in channels] if isinstance(channels, list) and channels else None


class SelectModalities(Transform):
    """Keep the requested MR sequences of a channel-first image.

    Args:
        modalities: ``"all"``, ``"flair"``, a comma-separated string or a list of names from
            ``("t1", "t1ce", "t2", "flair")``.
        image_channels: the sequences the image holds, in channel order (a prepared datalist's
            ``meta.channels``, see :func:`datalist_channels`). None: a 4-channel image holds
            t1, t1ce, t2, flair, and a 1-channel image the one requested sequence.

    Raises:
        ValueError: a requested sequence the image does not hold, or (on call) an image whose
            channel count does not fit.
    """

    def __init__(self, modalities: str | Sequence[str] = "all", image_channels: Sequence[str] | None = None) -> None:
        self.names = modality_channels(modalities)
        self.image_channels = None if image_channels is None else modality_channels(list(image_channels))
        missing = [n for n in self.names if self.image_channels is not None and n not in self.image_channels]
        if missing:
            raise ValueError(f"modalities={self.names} asks for {missing}, but the images hold {self.image_channels} "
                             "(image_channels: the datalist's meta.channels, from dira3d prepare brats --modalities; at "
                             "inference those of the model's training volumes, from <ckpt_dir>/preprocessing.json); set "
                             "modalities to sequences they hold, or prepare the data again with those sequences")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        channels = img.shape[0]
        if self.image_channels is not None:
            if channels < len(self.names):
                # fewer channels than the network takes (in_channels: one per requested sequence, e.g. three sequence
                # files for a model of four): no image_channels makes them fit; it was told to set image_channels to
                # the first three, which the model refused in turn
                files = "', '".join(f"<id>_{n}.nii.gz" for n in self.names)
                raise ValueError(f"image has {channels} channel(s) but the model takes {len(self.names)}, the sequences "
                                 f"{self.names} in this order (modalities; in_channels {len(self.names)}): at inference "
                                 f"give an image holding all {len(self.names)}, e.g. a case as its {len(self.names)} "
                                 f"sequence files in that order (--image \"['{files}']\"), or use a model fine-tuned on "
                                 "the sequences this image holds (dira3d finetune --set modalities=...); in training, "
                                 "prepare the data again into a new folder")
            if channels != len(self.image_channels):
                # an example of this image's channel count, the requested sequences first (a FLAIR file: ['flair']);
                # it named the four sequences the image was just refused for
                example = (self.names + [m for m in BRATS_MODALITIES if m not in self.names])[:channels]
                raise ValueError(f"image has {channels} channel(s) but image_channels says the images hold "
                                 f"{self.image_channels} (the datalist's meta.channels; at inference those of the model's "
                                 "training volumes): prepare the data again into a new folder, or, at inference, set "
                                 f"image_channels to the {channels} sequence(s) this image holds, in order"
                                 + (f" (e.g. --image_channels \"{example}\")" if len(example) == channels else ""))
            return img[[self.image_channels.index(n) for n in self.names]]
        if channels == len(BRATS_MODALITIES):
            index = [BRATS_MODALITIES.index(n) for n in self.names]
            return img[index]
        if channels == 1 and len(self.names) == 1:
            return img  # a single-sequence volume (FLAIR-only preparation) is taken as it is
        raise ValueError(self._misfit(channels))

    def _misfit(self, channels: int) -> str:
        """Why an image of ``channels`` channels without ``image_channels`` does not fit ``modalities``, and what to
        give: advice sized to the network's channel count (it told a model of four sequences to set modalities to
        'flair')."""
        n, every = len(self.names), len(BRATS_MODALITIES)
        takes = (f"an image of {every} channels {list(BRATS_MODALITIES)}" + (f" or of the one sequence '{self.names[0]}'"
                                                                            if n == 1 else ""))
        said = (f"image has {channels} channel(s) but modalities={self.names} (the model takes {n} channel(s), "
                f"in_channels {n}): without image_channels it takes {takes}")
        if channels < n:
            files = "', '".join(f"<id>_{m}.nii.gz" for m in self.names)
            give = (f"give an image holding the {n} sequences {self.names}, e.g. a case as its {n} sequence files in "
                    f"that order (--image \"['{files}']\")" if n == every else
                    f"give an image holding the {n} sequences {self.names} and name them in image_channels, e.g. a "
                    f"case as its {n} sequence files (--image \"['{files}']\" --image_channels \"{self.names}\")")
            return f"{said}; {give}, or use a model fine-tuned on the sequences this image holds (dira3d finetune --set modalities=...)"
        example = (self.names + [m for m in BRATS_MODALITIES if m not in self.names])[:channels]
        return (f"{said}; set image_channels to the {channels} sequence(s) this image holds, in order"
                + (f" (e.g. --image_channels \"{example}\")" if len(example) == channels else ""))


@contextmanager
def _naming_the_file(data: Mapping[Hashable, Any], key: Hashable) -> Iterator[None]:
    """A ``ValueError`` about the image under ``key`` becomes a :class:`~dira3d.data.errors.DataError` naming the
    file it was loaded from (a raw scan given to ``inference.json``: the bare message named none)."""
    try:
        yield
    except DataError:
        raise
    except ValueError as err:
        raise DataError(source_of(data, key), str(err)) from None


class SelectModalitiesd(MapTransform):
    """Dictionary form of :class:`SelectModalities`."""

    def __init__(self, keys: KeysCollection, modalities: str | Sequence[str] = "all",
                 image_channels: Sequence[str] | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.selector = SelectModalities(modalities, image_channels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            with _naming_the_file(d, key):
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
            with _naming_the_file(d, key):
                channels = [torch.as_tensor(normalize_mr(c.detach().cpu().numpy(), lower=self.lower, upper=self.upper))
                            for c in img]
            out = torch.stack(channels).to(img.device)
            # keep the MetaTensor (affine, applied operations) so Invertd can undo the spatial steps
            d[key] = img.clone().copy_(out) if hasattr(img, "meta") else out
        return d




class NormalizeScand(MapTransform):
    """Scale a raw scan to [0, 1] as ``dira3d prepare generic --modality`` did: ``ct``, the HU window
    ``hu_window`` (clipped); ``mr``, per channel, the ``percentiles`` of the non-zero voxels (:class:`NormalizeMRd`).

    A scan given as ``ct`` without a voxel below -500 HU (an MRI, or a CT stored without its rescale
    intercept) would be windowed into a flat, saturated image and segmented without a word: it is
    warned about, naming the file and the ``modality`` setting.

    Args:
        keys: keys of the images.
        modality: ``"ct"`` or ``"mr"``; what the training volumes were prepared as (the datalist's ``meta.modality``).
        hu_window: CT window ``(lo, hi)`` in HU mapped to [0, 1].
        percentiles: MR ``(lower, upper)`` percentiles mapped to 0 and 1.

    Raises:
        ValueError: an unknown ``modality``.
    """

    MODALITIES = ("ct", "mr")

    def __init__(self, keys: KeysCollection, modality: str = "ct", hu_window: Sequence[float] = (-1000.0, 1000.0),
                 percentiles: Sequence[float] = (0.5, 99.5), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = str(modality).lower()
        if self.modality not in self.MODALITIES:
            raise ValueError(f"modality={modality!r}: use 'ct' (HU window) or 'mr' (percentiles), as the training volumes "
                             "were prepared (dira3d prepare generic --modality; the datalist's meta.modality)")
        self.hu_window = tuple(float(h) for h in hu_window)
        self.mr = NormalizeMRd(keys, *percentiles, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        if self.modality == "mr":
            return self.mr(data)
        import warnings

        from dira3d.data.normalize import AIR_HU as _AIR_HU, window_hu

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            array = img.detach().cpu().numpy()
            lowest = float(array.min()) if array.size else 0.0
            # (a window within [0, 1] takes a volume prepared by `dira3d prepare` as it is: no HU expected)
            if lowest >= _AIR_HU and float(array.max()) > lowest and self.hu_window[1] - self.hu_window[0] > 2.0:
                name = getattr(img, "meta", {}).get("filename_or_obj", key)
                warnings.warn(f"{name}: no voxel below {_AIR_HU:g} HU (lowest {lowest:g}), so this does not look like a CT "
                              f"in Hounsfield units and the HU window {list(self.hu_window)} will flatten it; if the model was "
                              "fine-tuned on MRI, set modality to mr (--modality mr), as its training volumes were "
                              "prepared; a model fine-tuned on CT (modality ct in its preprocessing.json) is not made for "
                              "an MRI: fine-tune one on MRI", stacklevel=2)
            out = torch.as_tensor(window_hu(array, *self.hu_window)).to(img.device)
            # keep the MetaTensor (affine, applied operations) so Invertd can undo the spatial steps
            d[key] = img.clone().float().copy_(out) if hasattr(img, "meta") else out
        return d
