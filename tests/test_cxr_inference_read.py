"""Every chest X-ray file a 2D bundle's inference.json is given is read as `dira3d prepare` reads it.

The previous bundles read a DICOM through ``dira3d.data.cxr.read_radiograph`` (tests/test_cxr_dicom.py) but a PNG,
JPEG, TIFF or BMP with MONAI's plain ``PILReader``, which disagreed with preparation on most kinds of file:

- a 16-bit grey PNG or TIFF was refused by the 0..255 check (values above 255), or, with values within 0..255,
  reached the network unscaled without a word; preparation min-max scales it to 0..255;
- a grey image stored as grey + alpha, RGB(A) or a colour JPEG was refused as 2 to 4 channels; preparation takes its
  one grey channel;
- a palette PNG or BMP reached the network as its palette indices; preparation looks them up (grey values);
- a grey PNG with a transparent grey value (tRNS) was taken as it is; preparation refuses it.

Each test writes the file, runs it through the bundle's own inference preprocessing and checks the network input
equals that of the PNG ``dira3d prepare`` writes from the same file (``convert_image``, native size).
"""

from __future__ import annotations

import json
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cxr_dicom import BASE, BUNDLES_2D, COLS, LOW, ROWS, STEP, preprocessing
from test_inference_inputs import _infer, _refused

from dira3d.data.cxr import convert_image, read_radiograph
from dira3d.data.errors import DataError, DataWarning

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

OPAQUE = np.full_like(BASE, 255)
PALETTE = [v for i in range(256) for v in (255 - i,) * 3]  # index i shows grey 255 - i: indices are not grey values


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _palette(path: Path) -> Path:
    image = Image.fromarray((255 - BASE).astype(np.uint8), mode="P")
    image.putpalette(PALETTE)
    return _save(path, image)


# kind: (file name, writer, PIL mode the file opens in, the image preparation gives when it is exact, else None)
KINDS = {
    "16-bit grey PNG above 255": ("wide.png", lambda p: _save(p, Image.fromarray(LOW + STEP * BASE.astype(np.uint16))),
                                  "I;16", BASE),
    "16-bit grey PNG within 0..255": ("narrow.png", lambda p: _save(p, Image.fromarray(20 + BASE.astype(np.uint16) // 2)),
                                      "I;16", np.rint((BASE // 2) * (255 / 127)).astype(np.uint8)),
    "16-bit grey TIFF": ("wide.tif", lambda p: _save(p, Image.fromarray(LOW + STEP * BASE.astype(np.uint16))),
                         "I;16", BASE),
    # big-endian ("MM"): how Pillow writes I;16B, and many scanners' TIFFs; the little-endian one above starts "II"
    "16-bit grey TIFF, big-endian": ("wide_be.tif", lambda p: _save(p, Image.frombytes(
        "I;16B", (COLS, ROWS), (LOW + STEP * BASE.astype(np.uint16)).astype(">u2").tobytes())), "I;16B", BASE),
    "grey + alpha PNG, opaque": ("la.png", lambda p: _save(p, Image.fromarray(np.stack([BASE, OPAQUE], -1), "LA")),
                                 "LA", BASE),
    "RGB PNG of a grey image": ("rgb.png", lambda p: _save(p, Image.fromarray(np.stack([BASE] * 3, -1), "RGB")),
                                "RGB", BASE),
    "RGBA PNG of a grey image, opaque": ("rgba.png",
                                         lambda p: _save(p, Image.fromarray(np.stack([BASE] * 3 + [OPAQUE], -1), "RGBA")),
                                         "RGBA", BASE),
    "palette PNG with grey colours": ("palette.png", _palette, "P", BASE),
    "palette BMP with grey colours": ("palette.bmp", _palette, "P", BASE),
    "colour JPEG of a grey image": ("colour.jpg",
                                    lambda p: _save(p, Image.fromarray(np.stack([BASE] * 3, -1), "RGB"), quality=95),
                                    "RGB", None),  # lossy: compared with what preparation makes of it
}


@lru_cache(maxsize=None)
def _preprocessing(bundle: str):
    return preprocessing(bundle)


def _write(kind: str, folder: Path) -> Path:
    name, write, _, _ = KINDS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    return write(folder / name)


def test_the_files_store_what_the_tests_mean(tmp_path):
    """Pillow opens each file in the mode its kind names: a 16-bit grey, grey + alpha, colour or palette image."""
    for kind, (_, _, mode, _) in KINDS.items():
        with Image.open(_write(kind, tmp_path)) as image:
            assert image.mode == mode, kind
    with Image.open(tmp_path / "palette.png") as image:
        assert not (np.asarray(image) == BASE).all()  # its indices are not the grey values preparation reads


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_preparation_reads_each_kind_as_the_grey_image_it_shows(kind, tmp_path):
    path = _write(kind, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # a grey image stored in colour: preparation warns
        convert_image(path, tmp_path / "prepared.png", 0)
    prepared = np.asarray(Image.open(tmp_path / "prepared.png"))
    expected = KINDS[kind][3]
    if expected is None:  # a colour JPEG: lossy, but grey in and one grey channel out
        assert prepared.shape == (ROWS, COLS) and np.abs(prepared.astype(int) - BASE).max() <= 8
    else:
        np.testing.assert_array_equal(prepared, expected)


@pytest.mark.parametrize("bundle", BUNDLES_2D)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_2d_bundle_gives_a_file_the_network_input_of_its_prepared_png(bundle, kind, tmp_path):
    path = _write(kind, tmp_path / "raw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        convert_image(path, tmp_path / "prepared.png", 0)  # what `dira3d prepare` writes of it (native size)
        transform = _preprocessing(bundle)
        expected = transform({"image": str(tmp_path / "prepared.png")})["image"]
        got = transform({"image": str(path)})["image"]
    assert tuple(got.shape) == tuple(expected.shape)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_a_prepared_png_reaches_the_network_as_training_reads_it(bundle, tmp_path):
    """The tests above compare two files read by the same reader (the inference one); this one anchors that reader
    to train.json's: MONAI's PILReader on the prepared 8-bit PNG (width first). A transposed or otherwise different
    reading would give the network other inputs than fine-tuning gave it, for every file kind alike."""
    from monai.transforms import Compose, LoadImaged

    from dira3d.evaluation import LoadRadiographd

    png = _save(tmp_path / "cxr.png", Image.fromarray(BASE))  # rows != cols
    inference = _preprocessing(bundle)
    first = inference.transforms[0]
    assert isinstance(first, LoadRadiographd)
    training = Compose([LoadImaged(keys=["image"], reader="PILReader", image_only=True), *inference.transforms[1:]])
    got, expected = inference({"image": str(png)})["image"], training({"image": str(png)})["image"]
    assert tuple(got.shape) == tuple(expected.shape)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    loaded = first({"image": str(png)})["image"]
    assert tuple(loaded.shape) == (COLS, ROWS)  # PILReader's width-first array
    np.testing.assert_array_equal(np.asarray(loaded), BASE.T)


def test_a_grey_image_stored_in_colour_is_read_with_the_warning_preparation_gives(tmp_path):
    path = _write("RGB PNG of a grey image", tmp_path)
    with pytest.warns(DataWarning, match=r"rgb\.png: stored as RGB with equal colour channels"):
        _preprocessing("chexpert_cls")({"image": str(path)})


@pytest.mark.parametrize("bundle", ["chexpert_cls", "siim_pneumothorax_seg"])
def test_an_inference_run_on_a_16_bit_png_gives_the_prediction_of_its_prepared_png(bundle, tmp_path):
    """A 16-bit PNG (values above 255) stopped the run; it now gives what its prepared PNG gives."""
    wide = _write("16-bit grey PNG above 255", tmp_path / "raw")
    (tmp_path / "png").mkdir()
    prepared = tmp_path / "png" / "prepared.png"  # another name: _infer's output folder is named after the input
    convert_image(wide, prepared, 0)
    from_raw, from_prepared = _infer(bundle, tmp_path, wide), _infer(bundle, tmp_path, prepared)
    if bundle.endswith("_cls"):
        (raw,), (png,) = (json.loads((out / "prob.json").read_text())["predictions"] for out in (from_raw, from_prepared))
        assert raw["image"] == str(wide) and png["image"] == str(prepared)
        assert {k: v for k, v in raw.items() if k != "image"} == {k: v for k, v in png.items() if k != "image"}
    else:
        (raw_mask,), (png_mask,) = sorted(from_raw.glob("*.png")), sorted(from_prepared.glob("*.png"))
        mask = np.asarray(Image.open(raw_mask))
        assert mask.shape == (ROWS, COLS)
        np.testing.assert_array_equal(mask, np.asarray(Image.open(png_mask)))


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_a_png_with_transparent_pixels_is_refused_as_preparation_refuses_it(bundle, tmp_path):
    """A grey PNG whose value 17 is marked transparent (tRNS) was taken as it is, the hidden pixels as grey."""
    path = _save(tmp_path / "trns.png", Image.fromarray(BASE), transparency=17)
    expected = "is a grey + tRNS transparency image with 3 transparent pixels"
    with pytest.raises(DataError, match=re.escape(expected)):
        read_radiograph(path)  # what preparation reports for the case
    assert expected in _refused(bundle, tmp_path, path)  # names the file, writes nothing


def test_the_radiograph_reader_claims_only_radiograph_files(tmp_path):
    """MONAI asks a reader whether it can read the files (verify_suffix): RadiographReader says yes only when every
    file is a radiograph, told by content (a volume or a file that is not an image goes to another reader)."""
    from dira3d.evaluation.radiographs import RadiographReader, radiograph_format

    png = _write("palette PNG with grey colours", tmp_path)
    tif = _write("16-bit grey TIFF, big-endian", tmp_path)
    other = tmp_path / "scan.nii.gz"
    other.write_bytes(b"\x1f\x8b\x08\x00not a radiograph")
    assert [radiograph_format(p) for p in (png, tif, other, tmp_path / "missing.png")] == ["PNG", "TIFF", None, None]
    reader = RadiographReader()
    assert reader.verify_suffix([str(png), str(tif)]) is True
    assert reader.verify_suffix([str(png), str(other)]) is False
    assert reader.verify_suffix(str(other)) is False
