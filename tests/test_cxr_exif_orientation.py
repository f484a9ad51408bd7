"""A radiograph file stored sideways with an EXIF orientation tag is read upright, as image viewers show it.

Found by a 2D walkthrough: SimpleITK ignores the EXIF ``Orientation`` tag that phones, film scanners and some PACS
exports write into a JPEG, so `dira3d prepare radiographs` (and every 2D preparation and bundle inference, which share
``read_radiograph``) took such an X-ray lying on its side or mirrored, without a word, while a viewer showed it upright.
The reference is Pillow's ``ImageOps.exif_transpose``, what viewers do.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_cxr_dicom import BASE, BUNDLES_2D, preprocessing, write_dicom

from dira3d.cli import main as cli_main
from dira3d.data.cxr import read_radiograph
from dira3d.data.errors import DataWarning

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _tagged(path, pixels, orientation, **save):
    exif = Image.Exif()
    exif[274] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), **save)
    return path


def _viewer(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_is_read_as_a_viewer_shows_it(orientation, tmp_path):
    path = _tagged(tmp_path / "cxr.png", BASE, orientation)  # lossless, so the reading compares exactly
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = read_radiograph(path)
    np.testing.assert_array_equal(got, _viewer(path))
    told = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert (len(told) == 1 and str(path) in told[0] and f"EXIF orientation tag ({orientation})" in told[0]) == \
           (orientation != 1), told
    if orientation in (5, 6, 7, 8):
        assert got.shape == BASE.shape[::-1]


def test_a_dicom_and_a_plain_png_are_read_as_before(tmp_path):
    Image.fromarray(BASE).save(tmp_path / "plain.png")
    write_dicom(tmp_path / "m2.dcm", BASE, "MONOCHROME2", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # no orientation warning either
        np.testing.assert_array_equal(read_radiograph(tmp_path / "plain.png"), BASE)
        np.testing.assert_array_equal(read_radiograph(tmp_path / "m2.dcm"), BASE)


def test_prepare_radiographs_writes_a_sideways_jpeg_upright_and_reports_it(tmp_path):
    src = tmp_path / "xrays"
    src.mkdir()
    Image.fromarray(BASE).save(src / "upright.png")
    stored = np.ascontiguousarray(np.rot90(BASE))  # stored turned 90 degrees counter-clockwise ...
    _tagged(src / "sideways.jpg", stored, 6, quality=100)  # ... and tagged "turn 90 degrees clockwise to show"
    dst = tmp_path / "out"
    assert cli_main(["prepare", "radiographs", "--src", str(src), "--dst", str(dst), "--size", "0",
                     "--val-fraction", "0"]) == 0
    upright = np.asarray(Image.open(dst / "images" / "sideways.png")).astype(int)
    assert upright.shape == BASE.shape and np.abs(upright - BASE).mean() < 3  # JPEG: close to the upright original
    report = {c["case_id"]: c for c in json.loads((dst / "report.json").read_text())["cases"]}
    assert "EXIF orientation tag (6)" in " ".join(report["sideways"]["warnings"])
    assert report["upright"]["warnings"] == []


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_bundle_inference_gives_a_tagged_file_the_input_of_its_upright_png(bundle, tmp_path):
    tagged = _tagged(tmp_path / "tagged.png", np.ascontiguousarray(np.rot90(BASE, -1)), 8)  # shown turned back
    Image.fromarray(BASE).save(tmp_path / "upright.png")
    transform = preprocessing(bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        got = transform({"image": str(tagged)})["image"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(transform({"image": str(tmp_path / "upright.png")})["image"]))
