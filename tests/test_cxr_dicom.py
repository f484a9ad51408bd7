"""Hospital chest X-ray DICOMs (MONOCHROME1, 12-bit with a VOI window) reach the 2D bundles as `dira3d prepare` reads them.

Only 8-bit MONOCHROME2 DICOMs (SIIM-ACR's) had been tried. The 2D bundles' inference.json read a DICOM with MONAI's
PydicomReader, which keeps MONOCHROME1 as stored: the network saw a negative (bones dark) and predicted without a
word; a 12-bit DICOM was refused by the 0..255 check although `dira3d prepare` min-max scales it. Both now go
through ``dira3d.data.cxr.read_radiograph``, the reading the preparations use, so the two cannot drift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.bundle import ConfigParser
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_inference_inputs import _infer, _refused

from dira3d.data import siim
from dira3d.data.cxr import convert_image, read_radiograph
from dira3d.data.errors import DataError
from dira3d.data.rle import encode_rle
from dira3d.engines.inputs import data_error_in
from dira3d.evaluation.finetune import bundle_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

BUNDLES_2D = ("chestxray14_cls", "chexpert_cls", "siim_pneumothorax_seg", "montgomery_lung_seg")
ROWS, COLS = 24, 30  # rows != cols: a transposed image would not match
# the bone-bright 8-bit image every DICOM below stands for: 0 and 255 both present, so min-max keeps it
BASE = ((np.arange(ROWS * COLS).reshape(ROWS, COLS) * 7) % 256).astype(np.uint8)
BASE[0, 0], BASE[0, 1] = 0, 255
LOW, STEP = 100, 10  # 12-bit values LOW + STEP * BASE: 100..2650 of 0..4095
WINDOW = (600, 400)  # a VOI window that would give another image if it were applied


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, bits: int, window=None, samples: int = 1,
                frames: int | None = None) -> Path:
    """A single-file DICOM (CR) of ``pixels`` as stored, with the given interpretation and BitsStored."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = path.stem, "CR"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if samples > 1 else pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def hospital_dicoms(folder: Path) -> dict[str, Path]:
    """The same radiograph (BASE) stored three ways hospitals store it."""
    twelve = LOW + STEP * BASE.astype(np.uint16)
    return {"monochrome1_8bit": write_dicom(folder / "m1_8.dcm", 255 - BASE, "MONOCHROME1", 8),
            "monochrome2_12bit": write_dicom(folder / "m2_12.dcm", twelve, "MONOCHROME2", 12, WINDOW),
            "monochrome1_12bit": write_dicom(folder / "m1_12.dcm", 4095 - twelve, "MONOCHROME1", 12, WINDOW)}


def preprocessing(bundle: str):
    parser = ConfigParser()
    parser.read_config(str(bundle_path(bundle) / "configs" / "inference.json"))
    return parser.get_parsed_content("preprocessing")


def test_the_dicoms_store_what_the_test_means(tmp_path):
    # pydicom's own decoding, without any VOI or photometric handling: MONOCHROME1 really is stored inverted
    dicoms = hospital_dicoms(tmp_path)
    stored = pydicom.dcmread(dicoms["monochrome1_12bit"])
    assert stored.PhotometricInterpretation == "MONOCHROME1" and stored.BitsStored == 12
    np.testing.assert_array_equal(stored.pixel_array, 4095 - (LOW + STEP * BASE.astype(np.uint16)))


@pytest.mark.parametrize("kind", ["monochrome1_8bit", "monochrome2_12bit", "monochrome1_12bit"])
def test_read_radiograph_inverts_monochrome1_and_scales_12_bit_min_max(kind, tmp_path):
    # min-max by hand: (LOW + STEP*BASE - LOW) * 255 / (STEP*255) = BASE; the VOI window (600, 400) is not applied
    np.testing.assert_array_equal(read_radiograph(hospital_dicoms(tmp_path)[kind]), BASE)


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_each_2d_bundle_gives_a_hospital_dicom_the_input_tensor_of_its_png(bundle, tmp_path):
    png = tmp_path / "cxr.png"
    Image.fromarray(BASE).save(png)
    transform = preprocessing(bundle)
    expected = transform({"image": str(png)})["image"]
    for kind, path in hospital_dicoms(tmp_path).items():
        got = transform({"image": str(path)})["image"]
        assert tuple(got.shape) == tuple(expected.shape), kind
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=kind)


def test_preparation_and_inference_agree_on_the_same_dicom(tmp_path):
    src = tmp_path / "siim"
    uid = "1.2.276.0.7230010.3.1.4.7"
    dicom = write_dicom(src / "dicom-images-train" / "s" / "t" / f"{uid}.dcm",
                        4095 - (LOW + STEP * BASE.astype(np.uint16)), "MONOCHROME1", 12, WINDOW)
    mask = np.zeros((ROWS, COLS), np.uint8)
    mask[3:9, 4:12] = 1
    (src / "train-rle.csv").write_text(f"ImageId, EncodedPixels\n{uid}, {encode_rle(mask)}\n")
    siim.prepare(src, tmp_path / "out", size=0, val_fraction=0.0, test_fraction=0.0, progress=False)
    prepared = tmp_path / "out" / "images" / f"{uid}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(prepared)), BASE)
    converted = convert_image(dicom, tmp_path / "converted.png", 0)  # ChestX-ray14 / CheXpert / Montgomery's path
    assert converted == {"shape": [ROWS, COLS]}
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "converted.png")), BASE)
    transform = preprocessing("siim_pneumothorax_seg")
    np.testing.assert_array_equal(np.asarray(transform({"image": str(dicom)})["image"]),
                                  np.asarray(transform({"image": str(prepared)})["image"]))


def test_a_segmentation_run_on_a_monochrome1_dicom_writes_the_mask_of_its_png(tmp_path):
    png = tmp_path / "png" / "cxr.png"
    png.parent.mkdir()
    Image.fromarray(BASE).save(png)
    dicom = hospital_dicoms(tmp_path / "dcm")["monochrome1_12bit"]
    from_png, from_dicom = _infer("montgomery_lung_seg", tmp_path, png), _infer("montgomery_lung_seg", tmp_path, dicom)
    (png_mask,), (dicom_mask,) = sorted(from_png.glob("*.png")), sorted(from_dicom.glob("*.png"))
    mask = np.asarray(Image.open(dicom_mask))
    assert mask.shape == (ROWS, COLS)  # the DICOM's own size, as for the PNG
    np.testing.assert_array_equal(mask, np.asarray(Image.open(png_mask)))


@pytest.mark.parametrize("kind", ["colour", "multiframe"])
def test_a_colour_or_multiframe_dicom_is_refused_naming_the_file(kind, tmp_path):
    if kind == "colour":
        rgb = np.stack([BASE, BASE[::-1], BASE[:, ::-1]], -1)
        path = write_dicom(tmp_path / "colour.dcm", rgb, "RGB", 8, samples=3)
        expected = "is a colour RGB image"
    else:
        path = write_dicom(tmp_path / "frames.dcm", np.stack([BASE] * 3), "MONOCHROME2", 8, frames=3)
        expected = "holds 3 frames"
    with pytest.raises(DataError, match=expected):
        read_radiograph(path)  # what preparation reports for the case
    message = _refused("chexpert_cls", tmp_path, path)  # inference: names the file, writes nothing
    assert expected in message, message
    with pytest.raises(Exception) as raised:
        preprocessing("siim_pneumothorax_seg")({"image": str(path)})
    assert str(data_error_in(raised.value)).startswith(f"{path}: {expected}")
