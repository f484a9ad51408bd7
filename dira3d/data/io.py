"""Reading and writing volumes: one checked entry point for every source format.

``read_image`` opens MetaImage (``.mhd``/``.mha``), NIfTI, NRRD (``.nrrd``/``.nhdr``) files and
DICOM series folders through SimpleITK, and turns every way a download can be broken (truncated
raw data, a header naming a missing file, a 2D image, NaNs, a DICOM series with a missing slice)
into a :class:`DataError` that names the file and says what is wrong.

Orientation: prepared volumes are written in RAS+ as nibabel and MONAI name it (``to_ras``).
SimpleITK 2.x's ``DICOMOrient`` uses the same "axis points towards" letters as nibabel, so
``DICOMOrient(image, "RAS")`` gives ``nib.aff2axcodes(affine) == ("R", "A", "S")`` once written.

Array order: ``sitk.GetArrayFromImage`` returns ``(z, y, x)``; the project's order is
``(x, y, z)`` (what MONAI's ``LoadImage`` returns), so use :func:`image_to_xyz` /
:func:`xyz_to_image` instead of the raw SimpleITK calls.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dira3d.data.errors import DataError, DataWarning  # noqa: F401  (re-exported: dira3d.data.io.DataError)
from dira3d.data.nifti_header import header_pixdim, read_raw_nifti_header
from dira3d.utils.atomic import atomic_path
from dira3d.utils.files import looks_like_dicom  # noqa: F401  (re-exported: no SimpleITK needed there)

__all__ = [
    "meta_header",
    "DataError",
    "DataWarning",
    "IMAGE_SUFFIXES",
    "image_suffix",
    "looks_like_dicom",
    "read_image",
    "read_mask",
    "write_nifti",
    "to_ras",
    "check_mask_matches",
    "image_to_xyz",
    "xyz_to_image",
]

# Longest first, so ".nii.gz" wins over ".gz".
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr")

_MET_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def image_suffix(path: str | os.PathLike) -> str:
    """The image suffix of ``path`` (``".nii.gz"``, ``".mhd"``, ...) or ``""`` if none is known."""
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def _itk_reason(err: Exception) -> str:
    """The informative part of an ITK exception (its 'ITK ERROR' / 'Reason' lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keep = [ln for ln in lines if ln.startswith(("ITK ERROR", "Reason", "Description"))]
    return " ".join(keep or lines[-1:])[:400]


def meta_header(path: Path) -> dict[str, str]:
    """The ``key = value`` fields of a MetaImage header (``.mhd``), up to ``ElementDataFile``.

    Raises:
        OSError: the file cannot be read."""
    header: dict[str, str] = {}
    with open(path, "rb") as handle:
        for raw in handle:
            line = raw.decode("latin-1").strip()
            key, sep, value = line.partition("=")
            if not sep:
                continue
            header[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":  # last header field; binary data may follow
                break
    return header


def _check_metaimage(path: Path) -> None:
    """Catch the MetaImage faults ITK reports as 'No such file': missing or short raw data."""
    header = meta_header(path)
    data_file = header.get("ElementDataFile")
    if data_file is None:
        raise DataError(path, "MetaImage header has no ElementDataFile line; the header is incomplete")
    if data_file == "LOCAL" or data_file.startswith("LIST") or "%" in data_file:
        return  # data inline or spread over several files: leave those checks to ITK
    raw = path.parent / data_file
    if not raw.is_file():
        raise DataError(path, f"header points at raw data file {raw.name!r}, which does not exist "
                              f"next to it; download or extract {raw.name} into {path.parent}")
    if header.get("CompressedData", "False").lower() == "true":
        return
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        element = _MET_BYTES[header["ElementType"]]
    except (KeyError, ValueError):
        return  # an unusual header; ITK gives its own error if it really is broken
    channels = int(header.get("ElementNumberOfChannels", "1"))
    expected = math.prod(dims) * element * channels + max(int(header.get("HeaderSize", "0")), 0)
    actual = raw.stat().st_size
    if actual < expected:
        raise DataError(raw, f"raw data is truncated: {actual} bytes, the header {path.name} needs "
                             f"{expected} ({'x'.join(map(str, dims))} voxels of {header['ElementType']}); "
                             "download the file again")


def _check_nhdr(path: Path) -> None:
    text = path.read_bytes()[:65536].decode("latin-1")
    match = re.search(r"^data ?file:\s*(\S+)\s*$", text, flags=re.MULTILINE)
    if match and not match.group(1).startswith("LIST") and "%" not in match.group(1):
        data = path.parent / match.group(1)
        if not data.is_file():
            raise DataError(path, f"NRRD header points at data file {data.name!r}, which does not exist; "
                                  f"put {data.name} next to the header")


def _check_nifti(path: Path, check_finite: bool) -> None:
    """Catch what ITK's NIfTI reader hides: it zero-fills a truncated file (``.nii`` or ``.nii.gz``),
    reads NaN/Inf voxels as 0 and turns a zero or negative ``pixdim`` into a valid spacing."""
    import nibabel as nib

    try:  # the raw header: nib.load would 'repair' a bad pixdim as ITK does
        header = read_raw_nifti_header(path)
    except Exception:  # noqa: BLE001 - not a NIfTI nibabel can parse: ITK's read names the problem
        return
    # NIfTI-1 only (a NIfTI-2 header is laid out differently); with an sform the affine does not
    # come from pixdim, so a zero pixdim is harmless there
    if int(header["sizeof_hdr"]) == 348 and int(header["sform_code"]) == 0:
        pixdim = header_pixdim(header)
        if min(pixdim) <= 0 or not all(map(math.isfinite, pixdim)):
            raise DataError(path, f"has non-positive or invalid voxel spacing {pixdim} in its NIfTI header "
                                  "(pixdim); fix the header")
    try:
        image = nib.load(str(path))
    except Exception:  # noqa: BLE001 - ITK's read names the problem
        return
    try:
        data = image.dataobj.get_unscaled()
    except Exception as err:  # noqa: BLE001 - short data, broken gzip stream, ...
        reason = " ".join(str(err).split())[:300]
        raise DataError(path, f"is truncated or corrupt ({type(err).__name__}: {reason}); "
                              "download or copy the file again") from err
    if check_finite and np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            raise DataError(path, f"contains {int(finite.size - finite.sum())} NaN/Inf voxels; repair or exclude this scan")


def _dicom_slice_positions(files: list[str]) -> np.ndarray:
    """Position of each slice along the slice normal (mm), from the DICOM headers."""
    reader = sitk.ImageFileReader()
    positions = []
    normal = None
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not (reader.HasMetaDataKey("0020|0032") and reader.HasMetaDataKey("0020|0037")):
            return np.array([])
        if normal is None:
            cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
            normal = np.cross(cosines[:3], cosines[3:6])
        position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        positions.append(float(position @ normal))
    return np.sort(np.asarray(positions))


def _left_out(folder: Path, series: list) -> str:
    """'N file(s) …: names' for the files GDCM put in no series (unreadable or truncated DICOM);
    files that are obviously not DICOM (hidden, or an extension such as .txt without the DICM tag) are ignored."""
    used = {Path(f).name for files in series for f in files}
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in used and not p.name.startswith(".")
                   and p.name.upper() != "DICOMDIR" and (looks_like_dicom(p) or not re.search(r"[A-Za-z]", p.suffix)))
    if not names:
        return ""
    return (f"{len(names)} file(s) in the folder could not be read as DICOM and are not part of the series "
            f"(truncated or corrupt?): {', '.join(names[:5])}{', …' if len(names) > 5 else ''}")


def _read_dicom_series(folder: Path, tolerance: float = 0.1) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        left_out = _left_out(folder, [])
        raise DataError(folder, f"no DICOM series found in this folder{'; ' + left_out if left_out else ''}; "
                                "point at the folder holding the .dcm files")
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    # Several series (scout, dose report, a second reconstruction): read the one with most files; of
    # equally large ones the first by series UID, so the choice does not depend on GDCM's listing order.
    largest = min(range(len(series)), key=lambda i: (-len(series[i]), series_ids[i]))
    files = list(series[largest])
    if len(series) > 1:
        dropped = ", ".join(f"{sid} ({len(f)} file(s))" for i, (sid, f) in enumerate(zip(series_ids, series))
                            if i != largest)
        ties = sum(len(f) == len(files) for f in series)
        how = (f"{ties} series have {len(files)} files each (e.g. two reconstructions or phases of one scan); "
               f"read the first by series UID, {series_ids[largest]}" if ties > 1 else
               f"read the largest, {series_ids[largest]} ({len(files)} files)")
        warnings.warn(f"{folder}: holds {len(series)} DICOM series; {how}, and left out {dropped}"
                      + ("; to choose another, put each series in its own folder" if ties > 1 else ""),
                      DataWarning, stacklevel=2)
    left_out = _left_out(folder, series)
    also = f"; {left_out}" if left_out else ""
    if len(files) < 2:
        raise DataError(folder, f"the DICOM series has a single slice{also}; a 3D volume needs at least 2 (a "
                                "radiograph? 2D X-rays are prepared by `dira3d prepare radiographs`, docs/data_2d.md)")
    positions = _dicom_slice_positions(files)
    if positions.size:
        gaps = np.diff(positions)
        step = float(np.median(gaps))
        if step <= 0 or np.any(gaps <= tolerance * step):
            raise DataError(folder, "the DICOM series has two slices at the same position "
                                    "(duplicate or mixed series); keep one series per folder")
        bad = np.flatnonzero(np.abs(gaps - step) > tolerance * step)
        if bad.size:
            i = int(bad[0])
            missing = positions[i] + step
            raise DataError(folder, f"the DICOM series has non-uniform slice spacing: a gap of {gaps[i]:.2f} mm "
                                    f"between slices at {positions[i]:.2f} and {positions[i + 1]:.2f} mm "
                                    f"(spacing {step:.2f} mm), so the slice at {missing:.2f} mm is missing"
                                    f"{also}; restore the missing file(s) or exclude this series")
    if left_out:  # e.g. a truncated first or last slice: no gap, but the volume is shorter
        warnings.warn(f"{folder}: {left_out}; the volume was read without them", DataWarning, stacklevel=2)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise DataError(folder, f"the DICOM series cannot be read: {_itk_reason(err)}") from err


def read_image(path: str | os.PathLike, expect_dims: int = 3, check_finite: bool = True) -> sitk.Image:
    """Read one volume (file or DICOM series folder) and check that it is usable.

    Args:
        path: an image file (``.mhd``, ``.mha``, ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``) or a
            folder holding a DICOM series (the largest series in it is read; of equally large ones the
            first by series UID).
        expect_dims: the number of spatial dimensions required (a 4D file with one time point
            counts as 3D).
        check_finite: reject NaN / Inf voxels (floating-point images only).

    Returns:
        The image, as stored (no reorientation; see :func:`to_ras`).

    Raises:
        DataError: missing path, unreadable or truncated file, header pointing at a missing data
            file, wrong dimensionality, a single slice, multi-channel pixels, non-positive spacing,
            NaN/Inf voxels, a DICOM series with a missing slice or non-uniform spacing (naming the
            files in the folder that are not part of the series: unreadable or truncated DICOM).

    Warns:
        DataWarning: a DICOM folder with several series (the ones left out, with their file
            counts) or with files that could not be read into the series.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "does not exist; check the path")
    if path.is_dir():
        image = _read_dicom_series(path)
    else:
        suffix = image_suffix(path)
        if suffix == ".mhd":
            _check_metaimage(path)
        elif suffix == ".nhdr":
            _check_nhdr(path)
        elif suffix in (".nii", ".nii.gz"):
            _check_nifti(path, check_finite)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise DataError(path, f"cannot be read (truncated or corrupt file?): {_itk_reason(err)}") from err
    if image.GetDimension() == expect_dims + 1 and image.GetSize()[-1] == 1:
        image = image[(slice(None),) * expect_dims + (0,)]  # a 3D volume stored as 4D with one time point
    if image.GetDimension() != expect_dims:
        raise DataError(path, f"is a {image.GetDimension()}D image of size {image.GetSize()}; "
                              f"a {expect_dims}D volume is expected")
    if min(image.GetSize()) < 2:
        raise DataError(path, f"has size {image.GetSize()}: a single slice is a 2D image, a {expect_dims}D volume is expected")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                              "(colour or vector image); a single-channel scan is expected")
    if min(image.GetSpacing()) <= 0 or not all(map(math.isfinite, image.GetSpacing())):
        raise DataError(path, f"has non-positive or invalid voxel spacing {image.GetSpacing()}; fix the header")
    if check_finite and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise DataError(path, f"contains {bad} NaN/Inf voxels; repair or exclude this scan")
    return image


def read_mask(path: str | os.PathLike, max_label: int = 255) -> sitk.Image:
    """Read a label image as ``uint8``.

    Raises:
        DataError: as :func:`read_image`, plus non-integer or out-of-range label values.
    """
    image = read_image(path)
    array = sitk.GetArrayViewFromImage(image)
    if array.min() < 0 or array.max() > max_label or not np.array_equal(array, np.round(array)):
        raise DataError(path, f"is not a label image: values must be integers in 0..{max_label} "
                              f"(found {float(array.min())}..{float(array.max())})")
    return sitk.Cast(image, sitk.sitkUInt8)


def to_ras(image: sitk.Image) -> sitk.Image:
    """Permute/flip the axes so that the written NIfTI reads as RAS+ (nibabel/MONAI letters).

    Physical positions are unchanged, so world coordinates (e.g. LUNA16 candidates) still map
    onto the same anatomy with :func:`dira3d.data.geometry.world_to_voxel`.
    """
    return sitk.DICOMOrient(image, "RAS")


def write_nifti(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path`` (``.nii`` / ``.nii.gz``) atomically: temp file + ``os.replace``."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in (".nii", ".nii.gz"):
        raise ValueError(f"{path}: write_nifti needs a .nii or .nii.gz path")
    with atomic_path(path, suffix=suffix) as tmp:  # ITK picks the format by suffix
        sitk.WriteImage(image, str(tmp), useCompression=suffix == ".nii.gz")
        _check_complete(tmp, path, sitk.GetArrayViewFromImage(image).nbytes)
    return path


def _check_complete(tmp: Path, path: Path, data_bytes: int) -> None:
    """Refuse a NIfTI that ITK wrote only in part: on a full disk its NIfTI writer prints
    ``** ERROR: NWAD: wrote only 0 of N bytes`` and returns without raising, so the short file would be
    renamed into place and skipped as complete by every rerun.

    Raises:
        OSError: the file does not hold its header and ``data_bytes`` bytes of voxels (names ``path``).
    """
    size = tmp.stat().st_size
    try:
        expected = int(read_raw_nifti_header(tmp)["vox_offset"]) + data_bytes
        if path.name.lower().endswith(".gz"):  # the gzip trailer holds the stream's length (mod 2**32)
            with open(tmp, "rb") as handle:
                handle.seek(-4, os.SEEK_END)
                written = int.from_bytes(handle.read(4), "little")
            if written != expected % 2**32:  # e.g. several gzip members: count the bytes themselves
                import gzip
                import shutil

                counter = _ByteCounter()
                with gzip.open(tmp, "rb") as stream:
                    shutil.copyfileobj(stream, counter, 1 << 20)
                written = counter.count
            complete = written % 2**32 == expected % 2**32
        else:
            complete = size >= expected
    except Exception:  # noqa: BLE001 - no readable header, a gzip stream cut short: not complete
        complete = False
    if not complete:
        raise OSError(f"{path} could not be written completely ({size} bytes on disk; the disk is probably full); "
                      f"free space in {path.parent} and rerun the same command (finished files are kept)")


class _ByteCounter:
    """A write-only sink that counts what it is given."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)


def check_mask_matches(image: sitk.Image, mask: sitk.Image, image_path: str | os.PathLike,
                       mask_path: str | os.PathLike, allow_empty: bool = False,
                       tolerance: float = 1e-3, kind: str = "mask") -> None:
    """Check that ``mask`` lies on the voxel grid of ``image`` and is not empty.

    Args:
        kind: what ``mask`` is, for the message ("mask", or "sequence" for another MRI sequence
            of the same patient).
        tolerance: relative tolerance on spacing, on origin (in units of spacing) and absolute
            tolerance on direction cosines; headers written by different tools differ by rounding.

    Raises:
        DataError: different size, spacing, origin or direction (names both files), or an empty
            mask unless ``allow_empty``.
    """
    problems = []
    if image.GetSize() != mask.GetSize():
        problems.append(f"size {mask.GetSize()} vs image {image.GetSize()}")
    spacing = np.asarray(image.GetSpacing())
    if not np.allclose(mask.GetSpacing(), spacing, rtol=tolerance, atol=0):
        problems.append(f"spacing {mask.GetSpacing()} vs image {image.GetSpacing()}")
    if np.any(np.abs(np.subtract(mask.GetOrigin(), image.GetOrigin())) > tolerance * spacing.max() + 1e-4):
        problems.append(f"origin {mask.GetOrigin()} vs image {image.GetOrigin()}")
    if not np.allclose(mask.GetDirection(), image.GetDirection(), atol=max(tolerance, 1e-4)):
        problems.append(f"direction {mask.GetDirection()} vs image {image.GetDirection()}")
    if problems:
        advice = (f"; the {kind} must share the image's voxel grid" if kind != "sequence" else
                  "; the sequences of a case must be co-registered on one voxel grid (nothing is resampled): "
                  "register or resample this one onto the grid of the first, or leave it out")
        raise DataError(mask_path, f"{kind} does not match image {image_path}: " + "; ".join(problems) + advice)
    if not allow_empty and not sitk.GetArrayViewFromImage(mask).any():
        raise DataError(mask_path, f"mask for image {image_path} is empty (all zero); exclude this case or fix the mask")


def image_to_xyz(image: sitk.Image) -> np.ndarray:
    """Voxel array in the project's ``(x, y, z)`` order (a copy)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def xyz_to_image(array: np.ndarray, reference: sitk.Image | None = None) -> sitk.Image:
    """Image from an ``(x, y, z)`` array, copying origin/spacing/direction from ``reference``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    if reference is not None:
        image.CopyInformation(reference)
    return image
