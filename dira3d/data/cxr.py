"""Shared pieces of the 2D chest X-ray preparations (ChestX-ray14, CheXpert, SIIM-ACR, Montgomery).

Every 2D dataset is written the same way (docs/data_2d.md):

- images: 8-bit grey PNG, resized to ``size × size`` (default 512; ``size=0`` keeps the native
  size). The aspect ratio is not kept, as in the reference 2D pipelines that resize straight to
  224²; bundles resize further. Images that are not 8-bit (12/16-bit PNG, DICOM) are min-max scaled
  to 0..255 (a DICOM's VOI window, WindowCenter/Width, is not applied); ``MONOCHROME1`` DICOMs are
  read as ``MONOCHROME2`` (bone bright) by SimpleITK. :func:`read_radiograph` is that reading, shared
  by the preparations and by the 2D bundles' inference (:mod:`dira3d.evaluation.radiographs`), as is
  :func:`resize_image` (``PrepareRadiographd``, the bundles' ``prepared_size``), so a PNG, JPEG, TIFF, BMP or
  DICOM given to a bundle reaches the network as its prepared PNG would.
  A grey image stored as RGB(A), grey + alpha or with a grey palette becomes one channel (a
  warning in the report); a coloured or transparent one is a failed case (:func:`one_channel`).
  SimpleITK reads neither grey + alpha nor transparent grey PNGs, so those and palette PNGs are
  read with Pillow (:func:`read_grey`).
- masks: PNG with values 0/1 (not 0/255), so that ``LoadImaged`` gives the label directly.
- arrays in this module are ``(rows, cols)`` = ``(y, x)`` as in the PNG file. MONAI's
  ``LoadImaged`` returns a PNG as ``(x, y)`` (width first), so a box ``[x, y, w, h]`` indexes
  axis 0 of the loaded image with ``x``.

The patient-level split the preparations share and its ``split.json`` are in :mod:`dira3d.data.cxr_splits`.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import Resize
from PIL import Image

from dira3d.data.cxr_orientation import as_displayed
from dira3d.data.errors import DataWarning
from dira3d.data.io import DataError
from dira3d.utils.atomic import atomic_path
from dira3d.utils.files import read_text

__all__ = [
    "DEFAULT_SIZE",
    "read_grey",
    "read_radiograph",
    "dicom_patient_id",
    "one_channel",
    "to_uint8",
    "resize_image",
    "image_resize_mode",
    "resize_mask",
    "write_png",
    "convert_image",
    "scale_box",
    "read_csv_rows",
    "add_size_argument",
    "check_size",
]

DEFAULT_SIZE = 512  # storage size: 2× the 224² training input, so bundles can crop/resize freely


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D grey image (PNG, JPEG or single-file DICOM) through SimpleITK, or Pillow for some PNGs.

    A grey image stored in colour becomes one channel, with a warning; a coloured one is refused
    (:func:`one_channel`). SimpleITK cannot read a grey + alpha PNG or a grey PNG with a transparent
    value ("Unknown PixelType") and reads a palette PNG as RGB(A): those PNGs are read with Pillow
    (:func:`_read_png_with_pillow`), so a grey + alpha image with an opaque alpha or a grey palette
    becomes one channel with a warning too. A ``MONOCHROME1``
    DICOM comes back inverted to ``MONOCHROME2`` (bone bright): SimpleITK's GDCM reader does it,
    so it must not be inverted again (tests/test_data_cxr.py pins this). A file with an EXIF orientation tag (a JPEG
    stored sideways) is turned upright as viewers show it, with a warning
    (:func:`dira3d.data.cxr_orientation.as_displayed`).

    Args:
        path: the image file.

    Returns:
        ``(rows, cols)`` array in the file's own dtype (``uint8`` for 8-bit files).

    Raises:
        DataError: unreadable file, not a 2D image, or a colour image (see :func:`one_channel`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "does not exist; check --src and the file names in the dataset's CSV")
    header = _png_header(path)
    if header is not None and (header[1] in (_PNG_PALETTE, _PNG_GREY_ALPHA)
                               or header[1] == _PNG_GREY and _png_has_transparency(path)):
        array = _read_png_with_pillow(path, *header)
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise DataError(path, f"cannot be read as an image ({str(err).strip().splitlines()[-1][:200]}); "
                                  "re-download it or remove it from the list") from err
        array = sitk.GetArrayFromImage(image)
        if image.GetNumberOfComponentsPerPixel() > 1:
            array = one_channel(array, path)
    if array.ndim == 3 and array.shape[0] == 1:  # single-frame DICOM read as a 1-slice volume
        array = array[0]
    if array.ndim == 3 and header is None:  # SimpleITK reads a multi-frame DICOM as a volume
        raise DataError(path, f"holds {array.shape[0]} frames of {array.shape[1]}x{array.shape[2]} pixels (a multi-frame "
                              "file or a volume), not one radiograph; export the radiograph as a single-frame DICOM or "
                              "PNG, one image per file")
    if array.ndim != 2 or min(array.shape) < 2:
        raise DataError(path, f"is not a 2D image (array shape {array.shape}); give one radiograph per file")
    return as_displayed(array, path)  # a JPEG stored sideways with an EXIF orientation tag: upright, as viewers show it


def read_radiograph(path: str | os.PathLike) -> np.ndarray:
    """A radiograph as the 2D datasets store it: :func:`read_grey`, then :func:`to_uint8`.

    The one reading of a chest X-ray file that preparation (:func:`convert_image`, SIIM-ACR's DICOMs) and the
    2D bundles' inference (:class:`dira3d.evaluation.radiographs.RadiographReader`, for PNG, JPEG, TIFF, BMP and
    DICOM) share, so they cannot drift: a ``MONOCHROME1`` DICOM comes back bone bright (inverted by SimpleITK's
    GDCM reader), an 8-bit image as it is, and a 12/16-bit one (``BitsStored`` 12, say) min-max scaled to 0..255
    (its own lowest value 0, highest 255). A DICOM's VOI window (WindowCenter/Width) or VOI LUT is not applied:
    the training images were scaled min-max, and the model is only right on images scaled the same way.

    Returns:
        ``(rows, cols)`` ``uint8`` array.

    Raises:
        DataError: what :func:`read_grey` refuses (colour, multi-frame, unreadable), or NaN / infinite values.
    """
    array = read_grey(path)
    try:
        return to_uint8(array)
    except ValueError as err:
        raise DataError(path, f"{err}; repair or remove it") from err


def dicom_patient_id(path: str | os.PathLike) -> str:
    """The ``PatientID`` (0010,0020) of a DICOM file, stripped; ``""`` when the tag is absent or blank (anonymised).

    Read from the header only, with SimpleITK's reader, as :func:`read_grey` reads the pixels.

    Raises:
        DataError: the header cannot be read.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataError(path, "is not a readable DICOM file; re-download it") from err
    return reader.GetMetaData("0010|0020").strip() if reader.HasMetaDataKey("0010|0020") else ""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GREY, _PNG_PALETTE, _PNG_GREY_ALPHA = 0, 3, 4  # PNG colour types (IHDR)


def _png_header(path: Path) -> tuple[int, int] | None:
    """``(bit depth, colour type)`` from a PNG file's IHDR chunk; None for a file that is not a PNG."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(26)
    except OSError as err:
        raise DataError(path, f"cannot be opened ({err.strerror}); check its permissions") from err
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None  # not a PNG (or a broken one: SimpleITK says why)
    return head[24], head[25]


def _png_has_transparency(path: Path) -> bool:
    """Whether a PNG has a tRNS chunk (a transparent grey value or palette alphas); header chunks only."""
    try:
        with Image.open(path) as image:
            return "transparency" in image.info
    except Exception:  # noqa: BLE001 - unreadable: SimpleITK's reading says why
        return False


def _read_png_with_pillow(path: Path, depth: int, colour: int) -> np.ndarray:
    """A grey + alpha, palette or transparent grey PNG as one grey channel, or a :class:`DataError`.

    Each becomes the channels-last array :func:`one_channel` checks: grey + alpha as it is, a palette
    looked up into RGB (RGBA when it has transparent entries), a grey value marked transparent (tRNS)
    as an alpha of 0 where the image holds that value.
    """
    if colour == _PNG_GREY_ALPHA and depth == 16:  # Pillow keeps 8 of the 16 bits, SimpleITK fails
        raise DataError(path, "is a 16-bit grey + alpha PNG, which cannot be read without losing grey levels; save it "
                              "as a grey PNG without alpha or remove it from the list")
    try:
        with Image.open(path) as image:
            image.load()
            transparency = image.info.get("transparency")
            if colour == _PNG_GREY_ALPHA:
                return one_channel(np.asarray(image.convert("LA")), path)
            if colour == _PNG_PALETTE:
                rgb = np.asarray(image.convert("RGBA" if transparency is not None else "RGB"))
                return one_channel(rgb, path, kind="palette")
            if depth == 16:  # a 16-bit grey value marked transparent
                grey = np.asarray(image).astype(np.uint16)
                alpha = np.where(grey == int(transparency), 0, np.iinfo(np.uint16).max).astype(np.uint16)
                return one_channel(np.stack([grey, alpha], -1), path, kind="grey + tRNS transparency")
            return one_channel(np.asarray(image.convert("LA")), path, kind="grey + tRNS transparency")
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow's decoders raise OSError, ValueError, SyntaxError...
        raise DataError(path, f"cannot be read as an image ({type(err).__name__}: {str(err)[:200]}); "
                              "re-download it or remove it from the list") from err


_COLOUR_KINDS = {2: "grey + alpha", 3: "RGB", 4: "RGBA"}


def one_channel(array: np.ndarray, path: str | os.PathLike, kind: str | None = None) -> np.ndarray:
    """The grey channel of a radiograph stored in colour (channels last), or a :class:`DataError`.

    A grey image saved as RGB(A) or grey + alpha (equal colour channels, alpha fully opaque; some
    ChestX-ray14 PNGs are RGBA) is turned into its one channel with a
    :class:`~dira3d.data.errors.DataWarning` (listed under the case's warnings in the report); so is a
    palette image whose colours are grey. Colour channels that differ (a photo, an annotated screenshot)
    or transparent pixels have no one grey reading, so they are refused rather than averaged into an
    image the bundles would train on.

    Args:
        array: ``(..., channels)`` array as SimpleITK gives a multi-component image.
        path: the file it came from (named in the warning or error).
        kind: how the file stores the image, for the messages (default from the channels: grey + alpha,
            RGB, RGBA); e.g. ``"palette"`` for a palette PNG looked up into RGB(A).

    Raises:
        DataError: not 2, 3 or 4 channels, colour channels that differ, or an alpha channel that is
            not fully opaque.
    """
    channels = array.shape[-1]
    if channels not in _COLOUR_KINDS:
        raise DataError(path, f"has {channels} components per pixel; a grey radiograph (one channel) is expected: "
                              "remove it from the list or replace it with the grey original")
    kind = kind or _COLOUR_KINDS[channels]
    colour = array[..., : 3 if channels >= 3 else 1]
    differ = int((colour != colour[..., :1]).any(axis=-1).sum())
    if differ:
        raise DataError(path, f"is a colour {kind} image: its colour channels differ in {differ} pixels, so it is "
                              "not a grey radiograph (a photo or an annotated screenshot?); remove it from the list "
                              "or replace it with the grey original")
    if channels in (2, 4):
        opaque = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else 1.0
        clear = int((array[..., -1] != opaque).sum())
        if clear:
            raise DataError(path, f"is a {kind} image with {clear} transparent pixels (alpha below {opaque:g}), so "
                                  "its grey values are not what a viewer shows; remove it from the list or replace it "
                                  "with the grey original")
    warnings.warn(f"{path}: stored as {kind} with equal colour channels{' and an opaque alpha' if channels in (2, 4) else ''}; "
                  "prepared as one grey channel", DataWarning, stacklevel=2)
    return colour[..., 0]


def to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit version of a grey image: ``uint8`` is kept, anything else is min-max scaled to 0..255.

    Raises:
        ValueError: the image holds NaN or infinite values.
    """
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("image holds NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:  # a constant image stays constant (black)
        return np.zeros(array.shape, np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _resize(array: np.ndarray, size: int, **kwargs) -> np.ndarray:
    # MONAI works channel-first on (C, *spatial); our spatial axes are (rows, cols)
    tensor = torch.as_tensor(np.asarray(array, np.float32))[None]
    return np.asarray(Resize((size, size), **kwargs)(tensor))[0]


def resize_image(array: np.ndarray, size: int) -> np.ndarray:
    """Resize an 8-bit image to ``size × size`` (area averaging when shrinking, bilinear when enlarging).

    Args:
        array: ``(rows, cols)`` ``uint8`` image.
        size: output side; 0 returns the image unchanged.

    Returns:
        ``uint8`` ``(size, size)`` image.
    """
    if size == 0 or array.shape == (size, size):
        return array
    resized = _resize(array, size, **image_resize_mode(array.shape, size))
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def image_resize_mode(shape: Sequence[int], size: int) -> dict:
    """The interpolation :func:`resize_image` resizes an image of ``shape`` to ``size × size`` with, as MONAI
    ``Resize`` arguments: ``mode="area"`` when no side is enlarged, else bilinear (``align_corners=False``)."""
    if min(shape) >= size:
        # area averaging: no aliasing, and (unlike a Gaussian pre-filter, which pads with zeros)
        # no darkened border
        return {"mode": "area"}
    return {"mode": "bilinear", "align_corners": False}


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a binary mask to ``size × size``: area-average the 0/1 values, keep those ≥ 0.5.

    Args:
        mask: ``(rows, cols)`` array, non-zero = foreground.
        size: output side; 0 returns the mask (as 0/1 ``uint8``) unchanged in size.

    Returns:
        ``uint8`` mask with values 0/1.
    """
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if size == 0 or binary.shape == (size, size):
        return binary
    return (_resize(binary, size, mode="area") >= 0.5).astype(np.uint8)


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a ``uint8`` ``(rows, cols)`` array as a grey PNG, atomically (temp file + rename)."""
    path = Path(path)
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"{path}: expected a 2D uint8 array, got {array.dtype} {array.shape}")
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array, mode="L").save(tmp, format="PNG")
    return path


def convert_image(src: str | os.PathLike, dst: str | os.PathLike, size: int) -> dict:
    """Read a radiograph, rescale it to ``uint8``, resize it to ``size`` and write it as PNG.

    Returns:
        ``{"shape": [rows, cols]}`` of the source image (for the run report).

    Raises:
        DataError: ``src`` cannot be read or has no usable intensity range.
    """
    array = read_radiograph(src)
    write_png(dst, resize_image(array, size))
    return {"shape": list(array.shape)}


def scale_box(box: Sequence[float], shape: Sequence[int], size: int) -> list[float]:
    """Rescale a box ``[x, y, w, h]`` drawn on an image of ``shape = (rows, cols)`` to ``size × size``.

    Returns:
        ``[x · sx, y · sy, w · sx, h · sy]`` with ``sx = size / cols`` and ``sy = size / rows``
        (the box unchanged when ``size`` is 0).
    """
    if size == 0:
        return [float(v) for v in box]
    sx, sy = size / shape[1], size / shape[0]
    x, y, w, h = (float(v) for v in box)
    return [x * sx, y * sy, w * sx, h * sy]


def read_csv_rows(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    """Read a CSV into dicts keyed by its header (names stripped of spaces), checking columns.

    Args:
        path: the CSV file.
        required: column names that must be present.

    Returns:
        One dict per row, values stripped of surrounding spaces.

    Raises:
        DataError: missing file, empty file or missing columns (listed, with those found).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "does not exist; it comes with the dataset download (check --src)")
    reader = csv.reader(io.StringIO(read_text(path, "CSV", "re-download it", encoding="utf-8-sig"), newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(path, "is empty; re-download it")
    names = [h.strip() for h in header]
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(path, f"lacks the column(s) {missing}; found {names}. Is this the right CSV?")
    last = max(names.index(c) for c in required) if required else -1
    rows = []
    for row in reader:
        if not any(v.strip() for v in row):
            continue
        if len(row) <= last:  # a row cut short (an interrupted download) would read as blank cells
            raise DataError(path, f"line {reader.line_num} has {len(row)} of the {len(names)} columns, so no "
                                  f"{names[len(row)]!r}: the file is cut short or the row is broken; re-download it "
                                  "or fix that row")
        rows.append({n: v.strip() for n, v in zip(names, row)})
    return rows


def add_size_argument(parser) -> None:
    """Add ``--size`` (output side in pixels, 0 = keep) to an argparse parser."""
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"resize images and masks to SIZE×SIZE pixels (default {DEFAULT_SIZE}; 0 keeps the "
                             "native size)")


def check_size(size: int) -> int:
    """Return ``size`` if it is 0 or at least 8, else raise a ``ValueError`` naming ``--size``."""
    if size != 0 and size < 8:
        raise ValueError(f"--size {size} is too small; use 0 (keep the native size) or at least 8 (default "
                         f"{DEFAULT_SIZE})")
    return size
