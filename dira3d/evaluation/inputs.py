"""Checks of the scan or image given to a bundle's ``inference.json``: a user's own file, not a prepared datalist.

Inference takes whatever file it is handed, and most wrong files do not fail: a volume already prepared by
``dira3d prepare`` (intensities in [0, 1]) given to a bundle that windows raw HU maps to about 0.5 everywhere,
a mask given as the image and a 16-bit X-ray are segmented or scored without a word, and a colour PNG, a 4D
NIfTI or a 2D image given to a 3D bundle fail deep in the network with a shape error that names no file.

- :class:`CheckInferenceInputd` (right after ``LoadImaged`` + ``EnsureChannelFirstd``) refuses such an input
  with one :class:`~dira3d.data.errors.DataError` that names the file and says what to do; the checks that
  training shares (NaN/Inf, intensity range, header spacing) are :func:`dira3d.engines.inputs.check_volume`'s.
- the 2D bundles read a radiograph file (PNG, JPEG, TIFF, BMP, DICOM) as ``dira3d prepare`` reads it before these
  checks (:class:`~dira3d.evaluation.radiographs.LoadRadiographd`): a 12/16-bit one arrives min-max scaled to 0..255
  and a grey one stored in colour as one channel, so their ``"8bit"`` range and channel checks meet only the other
  formats (a 2D NIfTI, say), while a mask given as the image is still refused.
- :func:`screen_inputs` runs those checks on every entry of a ``datalist`` of several inputs before the
  evaluator starts, leaves out the bad ones with a warning each and goes on with the others.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform

from dira3d.data.errors import DataError, DataWarning
from dira3d.data.normalize import AIR_HU, mask_values

__all__ = ["TAKES", "check_inference_input", "CheckInferenceInputd", "screen_inputs"]

TAKES = ("ct", "mr", "prepared", "8bit")  # what a bundle's inference takes; see CheckInferenceInputd

_FORMATS = {3: "a 3D volume (NIfTI, NRRD, MetaImage or a DICOM folder)",
            2: "a 2D grey image (a PNG as `dira3d prepare <dataset>` writes it for chest X-rays, docs/data_2d.md)"}
_OTHER_BUNDLES = {3: "for a 2D image (a chest X-ray) use a 2D bundle (docs/2d.md)",
                  2: "for a CT or MRI volume use a 3D bundle (docs/finetuning.md)"}


def _check_takes(takes: str | None) -> None:
    if takes is not None and takes not in TAKES:  # in lits_liver_seg, takes is the modality setting
        raise ValueError(f"modality={takes!r} (takes): use 'ct' (HU window) or 'mr' (percentiles) for a raw scan, as the "
                         "training volumes were prepared (dira3d prepare generic --modality; the datalist's meta.modality); "
                         "'prepared' or '8bit' for the bundles that take those")


def _shown(values: np.ndarray) -> str:
    return ", ".join(f"{float(v):g}" for v in values[:8]) + (", ..." if values.size > 8 else "")


def check_inference_input(img: Any, source: str | os.PathLike, spatial_dims: int = 3, channels: int | None = None,
                          takes: str | None = None, hu_window: Sequence[float] | None = None,
                          value_range: Sequence[float] | None = None, range_advice: str | None = None) -> None:
    """Raise a :class:`DataError` naming ``source`` when a loaded channel-first input is not what the bundle takes.

    Args:
        img: ``(C, *spatial)`` array or tensor as ``LoadImaged`` + ``EnsureChannelFirstd`` give it.
        source: the file it came from (named in the message).
        spatial_dims: 3 (a volume) or 2 (a 2D image).
        channels: the channels the network takes (``in_channels``); None: not checked (BraTS picks its sequences).
        takes: ``"ct"`` a raw CT in HU, windowed by ``hu_window`` (a volume already scaled to [0, 1] is refused);
            ``"mr"`` a raw MRI (percentile scaling takes any intensities); ``"prepared"`` a volume as ``dira3d
            prepare`` writes it; ``"8bit"`` a grey image of 0..255 (one within [0, 1] is refused); None: not checked.
        hu_window: with ``"ct"``, the bundle's HU window; a window within [0, 1] takes a prepared volume as it is.
        value_range: ``(low, high)`` the intensities must lie in (``"prepared"``: [0, 1]; ``"8bit"``: [0, 255]).
        range_advice: what a value-range error says to do.

    Raises:
        DataError: another dimensionality or number of channels (a 4D NIfTI, a colour PNG, an entry listing another
            number of files than the channels taken), a mask or label map
            (2 to 16 distinct integer values), a prepared volume given for a raw CT, an 8-bit bundle's image
            within [0, 1], or what :func:`~dira3d.engines.inputs.check_volume` refuses.
    """
    from dira3d.engines.inputs import check_volume

    _check_takes(takes)
    shape = tuple(img.shape)
    dims = len(shape) - 1
    if dims != spatial_dims:
        what = "volume" if dims == 3 else "image"
        raise DataError(source, f"loaded as a {dims}D {what} of shape {shape[1:]}; this bundle takes {_FORMATS[spatial_dims]}: "
                                f"pass such a file; {_OTHER_BUNDLES[spatial_dims]}")
    if channels is not None and shape[0] != channels and _stacked_files(img):  # not one file: "a 4D file?" misled
        wanted = "one file" if channels == 1 else f"{channels} files, one per channel, or one file of {channels} channels"
        raise DataError(source, f"is the first of {shape[0]} files its entry lists, stacked as {shape[0]} channels, but "
                                f"this bundle takes {channels} channel{'s' if channels > 1 else ''}: list {wanted} in "
                                'each entry ({"image": path})')
    if channels is not None and shape[0] != channels:
        kind = ("a colour (RGB/RGBA) image? save it as a grey (one-channel) PNG, or run `dira3d prepare <dataset>` "
                "(docs/data_2d.md), which turns a grey image stored in colour into one channel"
                if spatial_dims == 2 else
                "a 4D file (several sequences or time points)? pass one 3D volume, e.g. the one sequence the model was "
                "trained on")
        raise DataError(source, f"has {shape[0]} channels (loaded shape {shape}), but the network takes {channels}: {kind}")
    data = torch.as_tensor(img).detach()
    array = data.cpu().numpy()
    values = mask_values(array)
    if values is not None:
        raise DataError(source, f"has only {values.size} distinct values ({_shown(values)}): it looks like a mask or label "
                                "map, not a scan; pass the image itself (a manual label lies next to its scan, e.g. "
                                "case_seg.nii.gz for case.nii.gz)")
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    within_unit = 0.0 <= lo < hi <= 1.0
    if takes == "ct" and within_unit:
        window = [float(h) for h in (hu_window if hu_window is not None else (-1000.0, 1000.0))]
        if window[1] - window[0] > 2.0:
            raise DataError(source, f"has intensities from {lo:g} to {hi:g}: it looks like a volume already prepared by "
                                    "`dira3d prepare` (scaled to [0, 1]), but this bundle takes the raw CT in Hounsfield "
                                    f"units and applies the HU window {window} itself, which would make all of it about "
                                    f"{-window[0] / (window[1] - window[0]):.2g}: pass the original scan, or, for a volume "
                                    "prepared with the model's window, --hu_window \"[0, 1]\" to take it as it is")
    if takes == "mr" and lo < AIR_HU:
        raise DataError(source, f"has voxels down to {lo:g}, below {AIR_HU:g} (air in Hounsfield units): it looks like a CT, "
                                "but this model takes an MRI (modality mr); pass the MRI, or use a model trained on CT")
    if takes == "8bit" and within_unit:
        raise DataError(source, f"has intensities from {lo:g} to {hi:g}, within [0, 1]: it looks scaled already, but this "
                                "bundle takes an 8-bit grey image (0..255) and scales it itself, so it would see a black "
                                "image; pass the 8-bit PNG (`dira3d prepare <dataset>` writes them, docs/data_2d.md)")
    check_volume(img, source, spatial_dims=spatial_dims, value_range=value_range, range_advice=range_advice,
                 slices=False, channels=None)


def _stacked_files(img: Any) -> bool:
    """Whether ``img`` was loaded from a list of files, one channel each: MONAI's readers (and
    :class:`~dira3d.evaluation.readers.SimpleITKReader`) stack them at a new first axis and record that axis as
    ``original_channel_dim`` 0; a single file's channels are recorded as its last axis or as none."""
    meta = getattr(img, "meta", None)
    dim = meta.get("original_channel_dim") if isinstance(meta, Mapping) else None
    try:
        return dim is not None and float(dim) == 0
    except (TypeError, ValueError):  # "no_channel"
        return False


class CheckInferenceInputd(MapTransform):
    """Check the input of ``inference.json`` (see :func:`check_inference_input`); place it right after
    ``EnsureChannelFirstd``. Arguments as :func:`check_inference_input`."""

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, channels: int | None = None, takes: str | None = None,
                 hu_window: Sequence[float] | None = None, value_range: Sequence[float] | None = None,
                 range_advice: str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.takes = None if takes is None else str(takes).lower()
        _check_takes(self.takes)
        self.spatial_dims = int(spatial_dims)
        self.channels = None if channels is None else int(channels)
        self.hu_window = None if hu_window is None else [float(h) for h in hu_window]
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self.range_advice = range_advice

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from dira3d.engines.inputs import source_of

        d = dict(data)
        for key in self.key_iterator(d):
            check_inference_input(d[key], source_of(d, key), self.spatial_dims, self.channels, self.takes, self.hu_window,
                                  self.value_range, self.range_advice)
        return d


def screen_inputs(datalist: Sequence[Mapping[str, Any]], preprocessing: Compose,
                  left_out: dict[int, str] | None = None, several: bool | None = None) -> list[Mapping[str, Any]]:
    """The entries of an inference ``datalist`` that load and pass the input checks of ``preprocessing``.

    A batch goes on with the good inputs: each input refused (a :class:`DataError` or a missing file, raised by
    the transforms of ``preprocessing`` up to its last :class:`CheckInferenceInputd`) is left out with a
    :class:`DataWarning` naming the file and the problem, and a last warning counts them. A single input is
    returned as it is (its error then stops the run, as the only answer).

    Each input is read again when the model runs: the checks need its voxels (a mask's few values, the intensity
    range, NaN/Inf), not only its header, and keeping each checked volume until its turn would hold the whole batch
    in memory.

    Args:
        datalist: the entries (``{"image": ...}``).
        preprocessing: the bundle's ``preprocessing``.
        left_out: when given, receives ``{index in datalist: reason}`` for each input left out (filled before
            the error of a batch where none can be used), for :class:`~dira3d.evaluation.batch.InferenceBatch`'s report.
        several: whether ``datalist`` is (part of) a batch, whose inputs are each checked, even one (a rank's share of
            a batch under ``torchrun``); None: when it holds two or more.

    Raises:
        DataError: every input is refused (each one listed).
    """
    from dira3d.engines.inputs import data_error_in

    entries = list(datalist)
    transforms = list(getattr(preprocessing, "transforms", ()))
    last = max((i for i, t in enumerate(transforms) if isinstance(t, CheckInferenceInputd)), default=None)
    if not (len(entries) > 1 if several is None else several) or last is None:
        return entries
    head = Compose(transforms[: last + 1])
    good, bad = [], []
    for index, entry in enumerate(entries):
        try:
            head(dict(entry))
        except Exception as err:  # noqa: BLE001 - only bad data is left out; anything else is raised again
            found = data_error_in(err)
            if found is None:
                raise
            # one line, for the warning, the batch's log and its report: a reader's message may hold a newline
            # (nibabel's "got 32592 bytes from \n - could the file be damaged?")
            reason = " ".join(str(found).split())
            bad.append(reason)
            if left_out is not None:
                left_out[index] = reason
        else:
            good.append(entry)
    if not good:
        raise DataError(None, f"none of the {len(entries)} inputs can be used:\n  " + "\n  ".join(bad))
    for message in bad:
        warnings.warn(f"left out: {message}", DataWarning, stacklevel=2)
    if bad:
        warnings.warn(f"{len(bad)} of {len(entries)} inputs left out (each named above); inference goes on with the other "
                      f"{len(good)}", DataWarning, stacklevel=2)
    return good
