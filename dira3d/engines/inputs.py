"""Checks where pretraining data enter: the datalist at build time, each volume as it is loaded.

Broken files in a dataset of thousands of CTs should stop a run with a message that names the
file and the problem — not with a shape error deep in a convolution hours later:

- :func:`load_datalist` reads a decathlon datalist and checks every entry of the split has an
  ``image`` that exists (all problems are listed at once);
- :class:`CheckVolumed` (after ``LoadImaged`` + ``EnsureChannelFirstd``) rejects volumes with the
  wrong dimensionality, (with ``channels``) another number of channels (an RGB PNG), a single slice,
  NaN/Inf voxels, non-positive spacing in the header or (with ``value_range``) intensities that
  were not prepared (raw HU);
- :class:`CheckSameShaped` rejects an image and its label on different grids (the fine-tuning bundles).

MONAI wraps transform errors in ``RuntimeError("applying transform ...")``; the original
:class:`~dira3d.data.io.DataError` is its ``__cause__`` (printed in the traceback), and
:func:`data_error_in` digs it out for commands that print one clean line.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

from dira3d.data.datalist import (DatalistError, channels_advice, datalist_entries, more_training_advice,
                                  read_datalist_json, split_option)
from dira3d.data.errors import DataError
from dira3d.data.nifti_header import header_pixdim, read_raw_nifti_header
from dira3d.utils.bundle_errors import setting_error_in  # light: dira3d finetune's refusals use it before torch loads
from dira3d.utils.files import looks_like_dicom
from dira3d.utils.log_filter import records_filtered

__all__ = ["load_datalist", "header_spacing", "check_volume", "source_of", "LoadVolumed", "CheckVolumed", "CheckSameShaped",
           "data_error_in", "setting_error_in"]


def load_datalist(path: str | os.PathLike, key: str = "training", image_key: str = "image") -> list[dict[str, Any]]:
    """Entries of split ``key`` with absolute paths, after checking every image exists.

    Read with :func:`dira3d.data.datalist.datalist_entries`: ``image_key`` paths are resolved
    against the datalist's folder as MONAI does; other keys are left as written.

    Raises:
        FileNotFoundError: the datalist itself is missing.
        DataError: unreadable JSON, no such split, an empty split, an entry without ``image_key``,
            or entries whose files are missing (all of them listed, with their case ids).
    """
    content = read_datalist_json(path, required=(key,))
    if isinstance(content[key], list) and not content[key]:
        # the dataset's own prepare option (meta.dataset), else generic's; else what its prepare writes instead
        option = split_option(path, "validation") if key == "validation" else ""
        share = f"prepare a validation share ({option}) or" if option.endswith("`") else f"{option};"
        hint = (
            f"{share} add entries, or pretrain without validation (validation false: "
            "`dira3d pretrain --override validation=false`, no best.pt); "
            "dis_mode visual_words on volumes validates on the training list instead"
            if key == "validation" else "add entries (check the paths given to `dira3d prepare`)"
            + (f", or {more_training_advice(path)}" if key == "training" else "")
        )
        raise DatalistError(path, f"has an empty {key!r} list; {hint}")
    # a DICOM series may be a folder: "path" accepts folders
    return datalist_entries(path, key, content=content, path_keys=(image_key,), detect_paths=False,
                            required=(image_key,), check_files="path")


def header_spacing(path: str | os.PathLike) -> tuple[float, ...] | None:
    """Voxel spacing as written in the file header (NIfTI ``pixdim``, else SimpleITK's reading).

    Readers silently turn a zero NIfTI ``pixdim`` into 1, so the raw header is read here.
    Returns None when the file has no readable header.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            return header_pixdim(read_raw_nifti_header(path))
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return tuple(float(v) for v in reader.GetSpacing())
    except Exception:  # noqa: BLE001 - the loader reports unreadable files with its own message
        return None


_RANGE_ADVICE = ("pretraining expects normalised volumes (raw HU, or an MRI that was not normalised?); prepare "
                 "the scans with `dira3d prepare generic --modality ct|mr` (docs/data.md), or set "
                 "intensity_range to null if your own preprocessing scales them")


def check_volume(img: Any, source: str | os.PathLike, spatial_dims: int = 3, check_finite: bool = True,
                 value_range: tuple[float, float] | None = None, range_advice: str | None = None,
                 slices: bool = True, channels: int | None = None, dims_advice: str | None = None,
                 dicom_advice: str | None = None, datalist: str | os.PathLike | None = None) -> None:
    """Raise a :class:`DataError` naming ``source`` when a loaded channel-first volume is unusable.

    Args:
        img: ``(C, *spatial)`` array or tensor as ``LoadImaged`` + ``EnsureChannelFirstd`` give it.
        source: the file it came from (named in the message).
        spatial_dims: 3; or 2, which also accepts 3D volumes (2D patches come from their slices).
        check_finite: reject NaN / Inf voxels.
        value_range: ``(low, high)`` the intensities must lie in (the pretraining bundle: [0, 1],
            what ``dira3d prepare`` writes); None: not checked.
        range_advice: what the message says after the range (default: the pretraining bundle's advice).
        slices: with ``spatial_dims=2``, also accept 3D volumes (pretraining cuts its 2D patches from their
            slices); False: 2D images only (the 2D fine-tuning bundles, which resize the whole image).
        channels: the number of channels the image must have (the bundles: the network's ``in_channels``);
            None: not checked. Place ``EnsureChannelFirstd`` without ``channel_dim="no_channel"`` before
            it, or an RGB PNG arrives as a 3-slice volume with one channel.
        dims_advice: with ``slices=False``, what the error for a 3D volume says after its shape (default: the
            2D fine-tuning bundles' advice; 2D pretraining's ``2d.json`` gives its own).
        dicom_advice: refuse a ``source`` that is a DICOM file, saying this; None: taken. The 2D training pipelines
            (``LoadImaged(PILReader)``, which falls back to MONAI's ``PydicomReader``) read a DICOM as stored: a
            ``MONOCHROME1`` radiograph inverted, bones dark, within 0..255 and so past ``value_range``.
        datalist: the datalist the volume comes from: the error for a volume of other ``channels`` names what fits
            its ``meta.dataset`` (:func:`dira3d.data.datalist.channels_advice`: ``dira3d prepare brats --modalities``
            for BraTS); None: the general advice.

    Raises:
        DataError: wrong dimensionality, another number of channels (a colour image), a single slice,
            an empty volume, NaN/Inf voxels, intensities outside ``value_range`` (e.g. raw HU or an
            unnormalised MRI), or a non-positive / invalid spacing in the header.
    """
    if dicom_advice and source and looks_like_dicom(source) and Path(str(source)).is_file():
        raise DataError(source, "is a DICOM file, which is read here as it is stored (a MONOCHROME1 radiograph "
                                f"inverted, bones dark; a 12/16-bit one unscaled), not as `dira3d prepare` reads it: {dicom_advice}")
    shape = tuple(img.shape)
    allowed = (3,) if spatial_dims == 3 else (2, 3) if slices else (2,)
    if not slices and spatial_dims == 2 and len(shape) - 1 != 2:
        raise DataError(source, f"loaded as a {len(shape) - 1}D image of shape {shape[1:]}; "
                                + (dims_advice or "this 2D bundle fine-tunes on 2D images (the PNGs `dira3d prepare "
                                                  "<dataset>` writes for chest X-rays, docs/data_2d.md)"))
    if len(shape) - 1 not in allowed:
        raise DataError(source, f"loaded as a {len(shape) - 1}D image of shape {shape[1:]}; "
                                f"{spatial_dims}D pretraining needs {' or '.join(f'{d}D' for d in allowed)} volumes"
                                + ("; for 2D images pretrain with the 2D setting (`dira3d pretrain --config 2d.json`, "
                                   "or spatial_dims 2 and a 2-value patch_size)" if spatial_dims == 3 and len(shape) == 3 else "")
                                + ("; this is a shard of `dira3d visual-words`: pretrain on its output with "
                                   "configs/visual_words.json (`dira3d pretrain --config visual_words.json`, or add it "
                                   "to --config_file)" if str(source).endswith(".npy") and len(shape) - 1 > 3 else ""))
    if channels is not None and shape[0] != channels:
        raise DataError(source, f"has {shape[0]} channels (loaded shape {shape}), not {channels}"
                                + (": a colour (RGB/RGBA) image? run `dira3d prepare <dataset>` (docs/data_2d.md), which "
                                   "turns a grey image stored in colour into one channel and refuses a coloured one, or "
                                   "fix the datalist" if len(shape) == 3 and shape[0] in (2, 3, 4)
                                   else f"; {channels_advice(datalist, shape[0], channels)}" if len(shape) == 4
                                   else "; prepare the scans with `dira3d prepare` (docs/data.md) or fix the datalist"))
    if min(shape[1:]) < 2 and not (spatial_dims == 2 and len(shape) == 4 and min(shape[1:3]) >= 2):
        raise DataError(source, f"has shape {shape[1:]}: a single slice is not a {spatial_dims}D volume")
    if check_finite:
        data = torch.as_tensor(img)
        if data.is_floating_point() and not bool(torch.isfinite(data).all()):
            bad = int((~torch.isfinite(data)).sum())
            raise DataError(source, f"contains {bad} NaN/Inf voxels; repair or exclude this scan")
    if value_range is not None:
        data = torch.as_tensor(img)
        low, high = (float(v) for v in value_range)
        lo, hi = float(data.min()), float(data.max())
        slack = 1e-3 * (high - low)
        if lo < low - slack or hi > high + slack:
            raise DataError(source, f"has intensities from {lo:g} to {hi:g}, outside [{low:g}, {high:g}]: "
                                    + (range_advice or _RANGE_ADVICE))
    spacing = header_spacing(source) if source and Path(str(source)).is_file() else None
    if spacing is not None and (min(spacing) <= 0 or not all(map(math.isfinite, spacing))):
        raise DataError(source, f"has non-positive or invalid voxel spacing {spacing} in its header; fix the header")


def source_of(data: Mapping[Hashable, Any], key: Hashable) -> str:
    """The file an item's ``key`` was loaded from (MONAI metadata), for messages; else a placeholder."""
    meta = getattr(data[key], "meta", None) or data.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple, np.ndarray)):
        name = name[0] if len(name) else None
    return str(name) if name else f"<{key} of case {data.get('case_id', '?')}>"


_ITK_ONLY_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # formats MONAI's LoadImage reads only through itk


class LoadVolumed(LoadImaged):
    """``monai.transforms.LoadImaged`` whose failures are :class:`DataError` s naming the file.

    MONAI's reader errors (truncated gzip, unknown format) do not always say which file failed;
    with thousands of scans that is the first thing a user needs. NRRD and MetaImage files, which
    MONAI reads only with the ``itk`` package (not a dependency), are read with
    :class:`~dira3d.evaluation.readers.SimpleITKReader`; other formats with MONAI's own choice (nibabel
    for NIfTI). Arguments as ``LoadImaged``.
    """

    def __call__(self, data, reader=None):  # noqa: D102 - as LoadImaged
        # every file named, also those of a key given as a list (the sequences of a case, stacked as channels)
        files = [str(f) for k in self.key_iterator(dict(data))
                 for f in (data[k] if isinstance(data[k], (list, tuple)) else [data[k]]) if isinstance(f, (str, os.PathLike))]
        # checked before LoadImage, which tries each of its readers on a missing file and logs an INFO line for each
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise DataError(missing[0], "does not exist; check the path")
        if reader is None and files and all(f.lower().endswith(_ITK_ONLY_SUFFIXES) for f in files):
            from dira3d.evaluation.readers import SimpleITKReader  # SimpleITK only when such a file comes

            reader = SimpleITKReader()
        own = None if reader is not None else self._given_reader(files)
        try:
            with _reader_attempts_held(type(self._loader).__name__):
                if own is not None:
                    try:
                        return super().__call__(data, own)
                    except DataError:  # its checks refused the file: no other reader may read it anyway
                        raise
                    except Exception:  # noqa: BLE001 - it could not read it: MONAI's readers, as before
                        pass
                return super().__call__(data, reader)
        except DataError:  # a reader's own error already names the file and says what to do
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            if len(files) > 1:  # an image and its mask: name the one that fails, not the intact one too
                files = self._unloadable(files, reader) or files
            source = files[0] if len(files) == 1 else (", ".join(files) or None)
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise DataError(missing[0], "does not exist; check the path") from err
            empty = [f for f in files if os.path.isfile(f) and os.path.getsize(f) == 0]
            if empty:
                raise DataError(empty[0], "is empty (0 bytes): a copy or download that did not finish? copy it again") from err
            own = self._own_reader_error(data, reader)
            if own is not None:  # e.g. "is truncated or corrupt ...; download or copy the file again"
                raise own from err
            if "cannot find a suitable reader" in str(err):  # MONAI's advice to install readers misleads here
                raise DataError(source, "cannot be read as an image by any reader: not an image, or a file cut short? "
                                        "pass an image file (NIfTI, NRRD, MetaImage, DICOM, PNG)") from err
            reason = " ".join(str(err).split())  # one line: nibabel's "got 32592 bytes from \n - could the file be ..."
            raise DataError(source, f"cannot be loaded ({type(err).__name__}: {reason}); "
                                    "the file is truncated, corrupt or not an image — repair or exclude it") from err

    def _given_reader(self, files: list[str]):
        """dira3d's reader given to this transform (``inference.json``'s ``SimpleITKReader``) when it takes ``files``,
        tried alone first, its refusal (a ``DataError``) final; else None. MONAI's ``LoadImage`` tries a given reader
        first but, when it refuses a file, goes on to its own readers: a DICOM series with a missing slice, refused by ``read_image``, was read by
        pydicom with the gap spread over the other slices (a wrong spacing) and its mask written on that grid."""
        for candidate in self._loader.readers[::-1] if files else ():
            if type(candidate).__module__.startswith("dira3d.") and candidate.verify_suffix(files):
                return candidate
        return None

    def _unloadable(self, files: list[str], reader=None) -> list[str]:
        """The ``files`` that fail to load alone, once loading them together failed (the reader attempts' log
        lines dropped): a truncated volume was named together with its intact mask, both called damaged."""
        bad = []
        for file in files:
            try:
                with _reader_attempts_held(type(self._loader).__name__):
                    self._loader(file, reader)
            except Exception:  # noqa: BLE001 - this file is one that fails
                bad.append(file)
        return bad

    def _own_reader_error(self, data, reader=None) -> DataError | None:
        """The :class:`DataError` of the first of dira3d's readers MONAI tried on a file no reader could load, or None.

        Given a reader, MONAI's ``LoadImage`` tries it first and then each of its own: a truncated NIfTI fails
        :class:`~dira3d.evaluation.readers.SimpleITKReader` with dira3d's advice, which MONAI drops (it keeps
        tracebacks as text) before nibabel fails on the same file with a rawer message. The file is read again with
        that reader, here only, once every reader has failed, to give its error instead."""
        readers = [reader] if reader is not None else list(self._loader.readers[::-1])
        for candidate in readers:
            if not type(candidate).__module__.startswith("dira3d."):
                continue
            for key in self.key_iterator(dict(data)):
                try:
                    candidate.read(data[key])
                except DataError as own:
                    return own
                except Exception:  # noqa: BLE001 - no clearer message from this reader
                    continue
        return None


@contextmanager
def _reader_attempts_held(logger_name: str) -> Iterator[None]:
    """Hold the INFO line ``<Reader>: unable to load <file>`` that MONAI's ``LoadImage`` (logger ``logger_name``) logs
    for each reader that fails on a file before it tries the next (six for a file of random bytes): dropped when the
    load fails, as :class:`LoadVolumed` then raises its one :class:`DataError` naming the file instead; logged as they
    were when a later reader loads the file. Every other record passes as before."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and "unable to load" in record.getMessage():
            held.append(record)
            return False
        return True

    with records_filtered(logger_name, hold) as log:
        yield
    for record in held:  # reached only when the file was loaded: nothing replaces these lines
        log.handle(record)


class CheckVolumed(MapTransform):
    """Check loaded volumes (see :func:`check_volume`); place it right after ``EnsureChannelFirstd``.

    Args:
        keys: image keys to check.
        spatial_dims: 3, or 2 (2D patches from 2D images or from slices of 3D volumes).
        check_finite: reject NaN / Inf voxels.
        value_range: ``(low, high)`` the intensities must lie in; None: not checked.
        range_advice: what a value-range error says to do (default: the pretraining bundle's advice).
        slices: with ``spatial_dims=2``, also accept 3D volumes (``train.json`` with ``spatial_dims`` 2, which
            cuts its patches from their slices); False: 2D images only (``2d.json`` and the 2D fine-tuning
            bundles, which resize the whole image).
        channels: the number of channels an image must have (e.g. ``@in_channels``); None: not checked.
        dims_advice: what the error for a 3D volume says to do when ``slices`` is False (see :func:`check_volume`).
        dicom_advice: refuse a DICOM file, saying this (see :func:`check_volume`); None: taken.
        datalist: the datalist the volumes come from, for the advice on other ``channels`` (see :func:`check_volume`).
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, check_finite: bool = True,
                 allow_missing_keys: bool = False, value_range: tuple[float, float] | None = None,
                 range_advice: str | None = None, slices: bool = True, channels: int | None = None,
                 dims_advice: str | None = None, dicom_advice: str | None = None,
                 datalist: str | os.PathLike | None = None) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims, self.check_finite, self.slices = int(spatial_dims), bool(check_finite), bool(slices)
        self.channels = None if channels is None else int(channels)
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self.range_advice, self.dims_advice, self.dicom_advice = range_advice, dims_advice, dicom_advice
        self.datalist = datalist

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_volume(d[key], source_of(d, key), self.spatial_dims, self.check_finite, self.value_range,
                         self.range_advice, self.slices, self.channels, self.dims_advice, self.dicom_advice,
                         self.datalist)
        return d


class CheckSameShaped(MapTransform):
    """Refuse an item whose ``keys`` (e.g. image and label) have different spatial shapes, naming both files.

    A label on another grid than its image (another case's mask, a mask not resampled with its scan) is
    otherwise cropped or resized along with the image without a word, and trains on misplaced targets.
    Channels are not compared (a 4-channel image, a 1-channel label). Place it right after
    ``EnsureChannelFirstd``.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        shapes = {key: tuple(d[key].shape[1:]) for key in keys}
        if len(set(shapes.values())) > 1:
            first = keys[0]
            other = next(k for k in keys if shapes[k] != shapes[first])
            raise DataError(source_of(d, first),
                            f"has shape {shapes[first]} but its {other} {source_of(d, other)} has shape {shapes[other]}; "
                            f"the {other} must lie on the {first}'s grid, as `dira3d prepare` writes them (docs/data.md): "
                            "fix the datalist entry (another case's file?) or prepare the pair again")
        return d


def data_error_in(err: BaseException, kinds: tuple[type[BaseException], ...] = (DataError, FileNotFoundError)) -> BaseException | None:
    """The first error of one of ``kinds`` behind ``err`` (MONAI wraps transform and config errors),
    or None. The default finds bad data; ``(ValueError, FileNotFoundError)`` also finds bad settings."""
    from dira3d.utils.bundle_errors import error_in_chain

    return error_in_chain(err, kinds)
