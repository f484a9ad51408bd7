"""2D training (dira_pretrain's 2d.json, the 2D bundles' train.json / evaluate.json) refuses a raw DICOM or 16-bit PNG.

Found by a 2D walkthrough: a datalist naming one's own X-ray files as they are (not run through `dira3d prepare`)
trained without a word on wrong images. The training pipelines read with ``LoadImaged(PILReader)``, whose fallback for
a DICOM is MONAI's ``PydicomReader``: a ``MONOCHROME1`` DICOM (an 8-bit one passes the 0..255 check) went in inverted,
bones dark. 2d.json had no 0..255 check either, so a 16-bit PNG was clipped almost white by its ``ScaleIntensityRanged``.
Training takes the 8-bit PNGs of `dira3d prepare` (docs/2d.md); such files are now refused while caching, naming the
file and the `dira3d prepare` command that reads them right. Inference still reads them (LoadRadiographd).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose
from PIL import Image
from test_cxr_dicom import BASE, BUNDLES_2D, hospital_dicoms

from dira3d.data.errors import DataError
from dira3d.engines.inputs import check_volume
from dira3d.evaluation.finetune import bundle_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "dira_pretrain" / "configs"


def _read_by_pydicom():
    """Expect MONAI's PydicomReader (PILReader's fallback) to say, reading a raw radiograph DICOM, that it has no
    orientation tags (as CR / DX files often have not): it was read before dira3d's check refused it."""
    return pytest.warns(UserWarning, match=r"PydicomReader: ImageOrientationPatient \(0020,0037\) and/or "
                                           r"ImagePositionPatient \(0020,0032\) tags are missing")


def _pretrain_loading() -> Compose:
    """2d.json's loading and checks (not the resizing and views)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in ("train.json", "2d.json", "2d_moco.json", "2d_tiny.json")])
    return Compose([parser.get_parsed_content(f"preprocessing#transforms#{i}") for i in range(3)])


def _bundle_loading(bundle: str) -> tuple[Compose, object]:
    parser = ConfigParser()
    parser.read_config(str(bundle_path(bundle) / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle_path(bundle))
    label = [0.0] * parser.get_parsed_content("out_channels") if bundle.endswith("_cls") else None
    return Compose(parser.get_parsed_content("load_transforms")), label


def _files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = dict(hospital_dicoms(folder))  # BASE as a MONOCHROME1 8-bit, MONOCHROME2 12-bit, MONOCHROME1 12-bit DICOM
    Image.fromarray(BASE.astype(np.uint16) * 200 + 100).save(folder / "sixteen.png")
    files["png_16bit"] = folder / "sixteen.png"
    Image.fromarray(BASE).save(folder / "prepared.png")  # what `dira3d prepare` writes of each of them
    Image.fromarray((BASE > 128).astype(np.uint8)).save(folder / "mask.png")
    return files


def _refusal(transform, item) -> str:
    with pytest.raises(Exception) as raised:
        transform(item)
    error = raised.value
    while error is not None and not isinstance(error, DataError):
        error = error.__cause__ or error.__context__
    assert error is not None, repr(raised.value)
    return str(error)


def test_the_8_bit_monochrome1_dicom_passes_the_old_checks_inverted(tmp_path):
    """Why a check by value could not catch it: read as stored it is a valid 8-bit image, the negative of BASE."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    path = _files(tmp_path)["monochrome1_8bit"]
    with _read_by_pydicom():
        image = EnsureChannelFirst()(LoadImage(reader="PILReader", image_only=True)(str(path)))
    check_volume(image, path, spatial_dims=2, slices=False, channels=1, value_range=(0, 255))  # no error
    np.testing.assert_array_equal(np.asarray(image)[0].T, 255 - BASE)


@pytest.mark.parametrize("kind", ["monochrome1_8bit", "monochrome2_12bit", "monochrome1_12bit", "png_16bit"])
def test_2d_pretraining_refuses_a_raw_file_naming_it(kind, tmp_path):
    files = _files(tmp_path)
    with _read_by_pydicom() if kind != "png_16bit" else nullcontext():
        message = _refusal(_pretrain_loading(), {"image": str(files[kind])})
    assert message.startswith(f"{files[kind]}: ") and "`dira3d prepare radiographs`" in message, message
    if kind != "png_16bit":
        assert "is a DICOM file" in message and "MONOCHROME1 radiograph inverted" in message, message
    assert np.asarray(_pretrain_loading()({"image": str(tmp_path / "prepared.png")})["image"]).shape == (1, 30, 24)


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_2d_fine_tuning_refuses_a_dicom_naming_it_and_takes_the_prepared_png(bundle, tmp_path):
    files = _files(tmp_path)
    loading, label = _bundle_loading(bundle)
    label = label if label is not None else str(tmp_path / "mask.png")
    task = {"chestxray14_cls": "chestxray14", "chexpert_cls": "chexpert", "siim_pneumothorax_seg": "siim",
            "montgomery_lung_seg": "montgomery"}[bundle]
    for kind in ("monochrome1_8bit", "monochrome1_12bit"):
        with _read_by_pydicom():
            message = _refusal(loading, {"image": str(files[kind]), "label": label})
        assert message.startswith(f"{files[kind]}: is a DICOM file") and f"`dira3d prepare {task} ...`" in message
    loaded = loading({"image": str(tmp_path / "prepared.png"), "label": label})  # the prepared PNG: taken
    assert np.asarray(loaded["image"]).shape[0] == 1 and float(np.asarray(loaded["image"]).max()) > 0


def test_dira3d_pretrain_stops_at_a_dicom_in_the_datalist_with_one_line(tmp_path, capsys):
    from dira3d.engines.command import main

    files = _files(tmp_path / "xrays")
    items = [{"image": str(tmp_path / "xrays" / "prepared.png"), "case_id": "a"},
             {"image": str(files["monochrome1_8bit"]), "case_id": "b"}]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items, "validation": items[:1]}))
    with _read_by_pydicom():
        code = main(["--datalist", str(tmp_path / "datalist.json"), "--output", str(tmp_path / "out"), "--tiny",
                     "--config", "2d.json", "--config", "2d_moco.json", "--config", "2d_tiny.json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{files['monochrome1_8bit']}: is a DICOM file" in err, err
    assert not (tmp_path / "out" / "models" / "last.pt").exists()
