"""Mutation audit of session 19 (mut19), the data side: the visual words' body rule (its bound, its advice, when
``auto`` turns it on), the DICOM refusal of ``check_volume`` (``dicom_advice``) and ``LoadVolumed``'s check that the
files exist. References: patches and shares counted by hand, the documented settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dira3d.data.errors import DataError
from dira3d.engines.inputs import LoadVolumed, check_volume
from dira3d.visual_words.coordinates import CoordinateRules, CoordinateSamplingError, sample_coordinate
from dira3d.visual_words.discover import resolve_body_filter

TISSUE, AIR = 0.3, 0.0  # tissue: above the air threshold 0.25, below the dense threshold 0.425


def test_a_patch_wholly_inside_the_body_is_taken_with_max_outside_fraction_0():
    """The bound is "at most": a share of 0 passes a bound of 0."""
    volume = np.full((12, 12, 6), TISSUE, dtype=np.float32)
    rules = CoordinateRules(patch_size=(4, 4, 2), border=(0, 0, 0), max_outside_fraction=0.0, max_tries=5)
    centre = sample_coordinate(volume, rules, np.random.RandomState(0))
    assert len(centre) == 3


def test_the_advice_names_the_least_share_outside_rounded_up_to_a_value_that_takes_it():
    # a tissue band two voxels wide (x = 5, 6) across all y and z, air on both sides reaching the edges: a patch
    # three voxels wide holds at least one column of air, a share of 1/3 at best (x = 4..6 or 5..7)
    volume = np.full((12, 8, 4), AIR, dtype=np.float32)
    volume[5:7] = TISSUE
    rules = CoordinateRules(patch_size=(3, 2, 2), border=(0, 0, 0), max_outside_fraction=0.3, max_tries=400)
    with pytest.raises(CoordinateSamplingError) as raised:
        sample_coordinate(volume, rules, np.random.RandomState(0), name="scan")
    message = str(raised.value)
    assert message.startswith("scan: no valid patch centre in 400 tries (0 had more than 15% of voxels >= 0.425, 0 "
                              "were closer than 5.0 voxels to an earlier class, 400 lay more than 30% outside the body)")
    # 1/3 = 0.333...: 0.34 takes it, 0.33 would not
    assert message.endswith("; --max-outside-fraction 0.34 would take the patch least outside the body (or "
                            "--body-filter off), or use smaller --border / --patch-size")


def test_max_outside_fraction_must_lie_in_0_1():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"max outside fraction .* must be in \[0, 1\] \(--max-outside-fraction\)"):
            CoordinateRules(max_outside_fraction=bad)


@pytest.mark.parametrize("body, lung, modality, expected", [
    ("auto", "on", "ct", "on"),
    ("auto", "off", "ct", "off"),   # the documented rule: on only while the lung filter is on
    ("auto", "on", "mr", "off"),
    ("auto", "on", None, "off"),    # a datalist of no dira3d prepare (LUNA16's): TransVW's rules
    ("on", "off", "mr", "on"),      # an explicit choice wins
    ("off", "on", "ct", "off"),
])
def test_resolve_body_filter_by_the_documented_rule(tmp_path, body, lung, modality, expected):
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"training": [], **({"meta": {"modality": modality}} if modality else {})}))
    assert resolve_body_filter(body, lung, datalist) == expected


def test_resolve_body_filter_refuses_another_value_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"--body-filter"):
        resolve_body_filter("yes", "on", tmp_path / "dl.json")


# --- check_volume's DICOM refusal --------------------------------------------------------------------------------------

def test_a_dicom_file_is_refused_only_where_dicom_advice_is_given(tmp_path):
    dicom = tmp_path / "cxr.dcm"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    image = np.full((1, 8, 8), 0.5, dtype=np.float32)
    with pytest.raises(DataError, match=r"is a DICOM file, .*: prepare it first"):
        check_volume(image, dicom, spatial_dims=2, slices=False, dicom_advice="prepare it first")
    check_volume(image, dicom, spatial_dims=2, slices=False)  # no advice (3D pipelines): taken


def test_a_folder_named_like_a_dicom_is_not_refused_as_a_dicom_file(tmp_path):
    folder = tmp_path / "series.dcm"
    folder.mkdir()
    check_volume(np.full((1, 8, 8), 0.5, dtype=np.float32), folder, spatial_dims=2, slices=False,
                 dicom_advice="prepare it first")


# --- LoadVolumed: a missing file named before any reader tries it ------------------------------------------------------

def test_a_missing_file_in_a_list_of_channels_is_named(tmp_path):
    here = tmp_path / "here.nii.gz"
    here.write_bytes(b"")
    gone = tmp_path / "gone.nii.gz"
    with pytest.raises(DataError) as raised:
        LoadVolumed(keys="image")({"image": [str(here), str(gone)]})
    assert str(raised.value) == f"{gone}: does not exist; check the path"


# --- the body outline's threshold, and no body rule at its default ----------------------------------------------------

def test_a_voxel_at_the_air_threshold_is_tissue():
    from dira3d.visual_words.coordinates import outside_body

    image = np.full((6, 6, 2), 0.25, dtype=np.float32)  # every voxel exactly at the threshold: all body
    image[0] = 0.1  # one face of air, reaching the edge
    air = outside_body(image, air_threshold=0.25)
    assert air[0].all() and not air[1:].any()


def test_without_the_body_rule_a_refusal_says_nothing_of_the_body():
    volume = np.ones((8, 8, 4), dtype=np.float32)  # all dense: every try broke the lung rule
    rules = CoordinateRules(patch_size=(2, 2, 2), border=(0, 0, 0), max_tries=3)  # max_outside_fraction 1.0: off
    with pytest.raises(CoordinateSamplingError) as raised:
        sample_coordinate(volume, rules, np.random.RandomState(0))
    assert "outside the body" not in str(raised.value) and "3 had more than 15%" in str(raised.value)


def test_the_documented_default_keeps_at_most_half_a_patch_outside_the_body():
    import inspect

    from dira3d.visual_words.command import build_parser
    from dira3d.visual_words.discover import discover_visual_words as discover

    assert inspect.signature(discover).parameters["max_outside_fraction"].default == 0.5
    assert inspect.signature(discover).parameters["body_filter"].default == "auto"
    args = build_parser().parse_args(["--datalist", "dl.json", "--out", "words"])
    assert (args.max_outside_fraction, args.body_filter) == (0.5, "auto")


# --- EXIF orientation: values outside 1..8 and files Pillow refuses for their size -------------------------------------

def test_an_orientation_outside_1_to_8_and_a_too_large_image_read_as_stored(tmp_path, monkeypatch):
    from PIL import Image

    from dira3d.data.cxr_orientation import exif_orientation

    path = tmp_path / "odd.jpg"
    exif = Image.Exif()
    exif[274] = 9  # not an EXIF orientation
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(path, exif=exif.tobytes())
    assert exif_orientation(path) == 1
    exif[274] = 6
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(path, exif=exif.tobytes())
    assert exif_orientation(path) == 6
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 600 pixels > 2 x 100: Pillow refuses to open it
    assert exif_orientation(path) == 1
