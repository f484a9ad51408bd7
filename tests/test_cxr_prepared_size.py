"""A raw radiograph given to a 2D bundle's inference reaches the network as its prepared PNG does in training.

``dira3d prepare <dataset>`` stores each radiograph as an 8-bit PNG of 512² (``--size``, area averaging when
shrinking, bilinear when enlarging, rounded to 8 bits: ``dira3d.data.cxr.resize_image``); train.json and evaluate.json
resize that PNG to 224². inference.json resized a raw file (a 16-bit PNG or a DICOM, 1200 x 1000 here) straight from
its native size to 224² and never rounded it to 8 bits: the network saw up to 8 to 12 grey levels (mean 1.2 to 1.5) away from
what evaluation gives for the same case. It now applies the preparation's resizing first (``prepared_size``,
``dira3d.evaluation.PrepareRadiographd``), and the two tensors are equal, exactly: the same functions on the same
8-bit image, then the same transforms.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser
from PIL import Image
from test_cxr_dicom import write_dicom
from test_inference_inputs import _infer

from dira3d.data.cxr import DEFAULT_SIZE, convert_image, write_png
from dira3d.evaluation import PrepareRadiographd
from dira3d.evaluation.finetune import bundle_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

BUNDLES_2D = ("chestxray14_cls", "chexpert_cls", "siim_pneumothorax_seg", "montgomery_lung_seg")


def radiograph(rows: int, cols: int) -> np.ndarray:
    """A 12-bit (0..4095) image with what a chest X-ray has for a resize to get wrong: smooth lungs, ribs, noise."""
    y, x = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    lungs = sum(np.exp(-(((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.35) ** 2)) for cx in (0.3, 0.7))
    ribs = (np.abs(np.sin(y * 90.0)) > 0.6) * (np.abs(x - 0.5) > 0.08)
    image = 500 + 2500 * lungs + 600 * ribs + np.random.default_rng(0).normal(0, 120, (rows, cols))
    return np.clip(np.rint(image), 0, 4095).astype(np.uint16)


def _png16(path: Path, rows: int, cols: int) -> Path:
    Image.fromarray(radiograph(rows, cols) * 16).save(path)  # 16-bit values up to 65520
    return path


# kind: writer of the raw file; 1200 x 1000 is shrunk to 512² (area), 300 x 260 enlarged (bilinear)
RAW = {"16-bit PNG 1200x1000": lambda folder: _png16(folder / "raw.png", 1200, 1000),
       "12-bit MONOCHROME1 DICOM 1200x1000": lambda folder: write_dicom(
           folder / "raw.dcm", 4095 - radiograph(1200, 1000), "MONOCHROME1", 12),
       "16-bit PNG 300x260": lambda folder: _png16(folder / "small.png", 300, 260)}


def _parser(bundle: str, files: tuple[str, ...], **updates) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle_path(bundle) / "configs" / name) for name in files])
    parser.update(updates)
    return parser


@lru_cache(maxsize=None)
def _inference(bundle: str, prepared_size: int | None = None):
    updates = {} if prepared_size is None else {"prepared_size": prepared_size}
    return _parser(bundle, ("inference.json",), **updates).get_parsed_content("preprocessing")


@lru_cache(maxsize=None)
def _evaluation(bundle: str):
    parser = _parser(bundle, ("train.json", "evaluate.json"))
    return parser.get_parsed_content("validate#preprocessing"), parser.get_parsed_content("out_channels")


def _evaluated(bundle: str, png: Path, folder: Path) -> np.ndarray:
    """The network input evaluate.json gives a prepared PNG (with a label, which plays no part in the image)."""
    transform, classes = _evaluation(bundle)
    if bundle.endswith("_seg"):
        label = write_png(folder / "mask.png", np.zeros(np.asarray(Image.open(png)).shape, np.uint8))
    return np.asarray(transform({"image": str(png), "label": str(label) if bundle.endswith("_seg") else [0.0] * classes})["image"])


def _prepared(raw: Path, folder: Path) -> Path:
    """The PNG `dira3d prepare` writes of ``raw`` (its default size)."""
    png = folder / "prepared" / f"{raw.stem}_prepared.png"
    png.parent.mkdir(exist_ok=True)
    convert_image(raw, png, DEFAULT_SIZE)
    return png


@pytest.mark.parametrize("kind", sorted(RAW))
@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_inference_gives_a_raw_radiograph_the_network_input_evaluation_gives_its_prepared_png(bundle, kind, tmp_path):
    raw = RAW[kind](tmp_path)
    png = _prepared(raw, tmp_path)
    expected = _evaluated(bundle, png, tmp_path)
    assert expected.shape == (1, 224, 224)
    np.testing.assert_array_equal(np.asarray(_inference(bundle)({"image": str(raw)})["image"]), expected)
    # the prepared PNG itself, given to inference, is taken as evaluation takes it
    np.testing.assert_array_equal(np.asarray(_inference(bundle)({"image": str(png)})["image"]), expected)


def test_prepared_size_0_resizes_straight_to_the_network_input_as_before(tmp_path):
    """The setting is what makes the difference: without the preparation's resizing the input is up to several grey
    levels off (the skew this fixed), and 0 gives exactly the straight native -> 224 area resize."""
    from monai.transforms import Resize

    raw = RAW["16-bit PNG 1200x1000"](tmp_path)
    expected = _evaluated("chexpert_cls", _prepared(raw, tmp_path), tmp_path)
    straight = np.asarray(_inference("chexpert_cls", 0)({"image": str(raw)})["image"])
    assert np.abs(straight - expected).max() > 3 / 255
    loaded = _inference("chexpert_cls", 0).transforms[0]({"image": str(raw)})["image"][None] / 255.0
    np.testing.assert_allclose(straight, np.asarray(Resize((224, 224), mode="area")(loaded)), atol=1e-6)


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_a_prepared_png_passes_the_preparation_step_unchanged(bundle, tmp_path):
    """An 8-bit 512² PNG (what `dira3d prepare` writes) comes out of the bundle's PrepareRadiographd as it went in,
    and the step sits after the input checks, before the resize to the network's input."""
    from monai.transforms import Resized

    from dira3d.evaluation import CheckInferenceInputd

    png = _prepared(RAW["16-bit PNG 300x260"](tmp_path), tmp_path)
    transforms = _inference(bundle).transforms
    step = next((i for i, t in enumerate(transforms) if isinstance(t, PrepareRadiographd)), None)
    assert step is not None and transforms[step].size == DEFAULT_SIZE
    assert isinstance(transforms[step - 1], CheckInferenceInputd)
    assert [type(t) for t in transforms[step + 1:]].count(Resized) == 1
    data = {"image": str(png)}
    for transform in transforms[:step]:
        data = transform(data)
    before = np.asarray(data["image"]).copy()
    after = transforms[step](data)["image"]
    assert before.shape == (1, DEFAULT_SIZE, DEFAULT_SIZE)
    np.testing.assert_array_equal(np.asarray(after), before)
    np.testing.assert_array_equal(np.asarray(data["image"]), before)  # the input is not written over


def test_a_classification_run_on_a_raw_file_gives_the_probabilities_of_its_prepared_png(tmp_path):
    raw = RAW["16-bit PNG 1200x1000"](tmp_path)
    png = _prepared(raw, tmp_path)  # another name: _infer's output folder is named after the input
    from_raw, from_png = _infer("chexpert_cls", tmp_path, raw), _infer("chexpert_cls", tmp_path, png)
    (got,), (expected,) = (json.loads((out / "prob.json").read_text())["predictions"] for out in (from_raw, from_png))
    assert {k: v for k, v in got.items() if k != "image"} == {k: v for k, v in expected.items() if k != "image"}


@pytest.mark.parametrize("kind", ["16-bit PNG 300x260", "12-bit MONOCHROME1 DICOM 1200x1000"])
def test_a_segmentation_mask_comes_back_at_the_input_size(kind, tmp_path):
    """Invertd undoes the preparation's resizing too (recorded as MONAI's Resize records it): the mask is written on
    the file's own grid, whether preparation shrank the image or enlarged it."""
    raw = RAW[kind](tmp_path)
    (mask,) = sorted(_infer("montgomery_lung_seg", tmp_path, raw).glob("*.png"))
    rows, cols = (1200, 1000) if "1200" in kind else (300, 260)
    assert np.asarray(Image.open(mask)).shape == (rows, cols)


@pytest.mark.parametrize("size", [3, -1])
def test_a_prepared_size_that_is_no_storage_size_is_refused_naming_the_setting(size):
    with pytest.raises(ValueError, match=r"prepared_size -?\d+ is not a storage size.*`dira3d prepare <dataset> --size`"):
        PrepareRadiographd("image", size)


@pytest.mark.parametrize("size", [0, None])
def test_prepared_size_0_or_null_leaves_the_image_and_its_inverse_alone(size):
    import torch
    from monai.data import MetaTensor

    image = MetaTensor(torch.arange(12.0).reshape(1, 3, 4) * 20.5)
    step = PrepareRadiographd("image", size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = step({"image": image})
        back = step.inverse(out)
    assert out["image"] is image and back["image"] is image and not image.applied_operations


def test_localisation_loads_a_raw_radiograph_as_the_bundle_does(tmp_path):
    """`dira3d localise` loads each image as chestxray14_cls's inference does (docs/2d.md), so it takes the
    preparation's resizing too (--prepared-size, default 512); 0 resizes straight, as before."""
    from dira3d.evaluation import localise

    assert localise.DEFAULT_SIZE == DEFAULT_SIZE  # its default, written out there
    load_cxr_image = localise.load_cxr_image
    raw = RAW["16-bit PNG 1200x1000"](tmp_path)
    expected = _evaluated("chestxray14_cls", _prepared(raw, tmp_path), tmp_path)
    image, size = load_cxr_image(raw, (224, 224))
    assert size == (1000, 1200)  # (x, y): the boxes are scaled from the file's own size
    np.testing.assert_array_equal(np.asarray(image), expected)
    straight, _ = load_cxr_image(raw, (224, 224), prepared_size=0)
    np.testing.assert_array_equal(np.asarray(straight), np.asarray(_inference("chestxray14_cls", 0)({"image": str(raw)})["image"]))


def test_localise_refuses_a_prepared_size_that_is_no_storage_size(tmp_path, capsys):
    from dira3d.evaluation.localise import main

    with pytest.raises(SystemExit) as info:
        main(["--bbox-datalist", str(tmp_path / "boxes.json"), "--model", str(tmp_path / "model.pt"), "--output-dir",
              str(tmp_path / "loc"), "--prepared-size", "4"])
    assert info.value.code == 2
    assert "--prepared-size 4 is not a storage size" in capsys.readouterr().err
    assert not (tmp_path / "loc").exists()


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_a_model_trained_on_pngs_prepared_at_another_size_gets_raw_images_through_that_size(bundle, tmp_path):
    """Found by a 2D walkthrough: data prepared with `--size 128` trained a model that inference then fed through the
    default 512 (up to 16 grey levels off on a noisy image) unless the user remembered --prepared_size. dira3d
    finetune keeps the datalist's meta.size in preprocessing.json beside the model, and inference.json reads it."""
    from dira3d.evaluation import datalist_preprocessing
    from dira3d.evaluation.preprocessing import write_preprocessing

    raw = RAW["16-bit PNG 1200x1000"](tmp_path)
    png = tmp_path / "prepared" / "raw_128.png"
    png.parent.mkdir()
    convert_image(raw, png, 128)
    expected = _evaluated(bundle, png, tmp_path)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "meta": {"dataset": "x", "size": 128, "image_format": "png uint8 grey"}}))
    assert datalist_preprocessing(datalist) == {"prepared_size": 128}
    write_preprocessing(tmp_path / "models", datalist_preprocessing(datalist))  # what the bundles' model saver writes
    parser = _parser(bundle, ("inference.json",), ckpt_dir=str(tmp_path / "models"))
    assert parser.get_parsed_content("prepared_size") == 128
    np.testing.assert_array_equal(np.asarray(parser.get_parsed_content("preprocessing")({"image": str(raw)})["image"]),
                                  expected)
    assert not np.array_equal(np.asarray(_inference(bundle)({"image": str(raw)})["image"]), expected)  # through 512
    # a value given on the command line wins; a model without the file keeps the default
    assert _parser(bundle, ("inference.json",), ckpt_dir=str(tmp_path / "models"), prepared_size=0).get_parsed_content(
        "prepared_size") == 0
    assert _parser(bundle, ("inference.json",), ckpt_dir=str(tmp_path)).get_parsed_content("prepared_size") == DEFAULT_SIZE


@pytest.mark.parametrize("size", [True, -1, None, "512", 1.5])
def test_a_datalist_size_that_is_no_whole_side_is_not_kept(size, tmp_path):
    from dira3d.evaluation import datalist_preprocessing

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "meta": {"size": size}}))
    assert datalist_preprocessing(datalist) == {}
