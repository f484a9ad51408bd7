"""inference.json takes a user's own file: a wrong one is refused with one error naming it and saying what to do.

Before these checks a volume already prepared by ``dira3d prepare`` given to a bundle that windows raw HU, or a mask
given as the image, was segmented into garbage without a word; a colour PNG, a 4D NIfTI or a 2D image given to a 3D
bundle failed in the network or the sliding window with a shape error naming no file. A datalist of several inputs
stopped at its first bad one (a classification run then wrote nothing at all). Tiny untrained networks: the checks
come before the network, and the good inputs only need to run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from test_inference_outputs import _infer as run_inference

from dira3d.data.errors import DataError, DataWarning
from dira3d.evaluation import build_resnet_task_network, build_task_network, check_inference_input
from dira3d.utils import atomic_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SEG3D = {"width": 0.125, "roi_size": [32, 32, 16], "sw_batch_size": 1}
CLS3D = {"width": 0.125, "roi_size": [16, 16, 8]}
BUNDLES_2D = ("chestxray14_cls", "chexpert_cls", "siim_pneumothorax_seg", "montgomery_lung_seg")
OUT_2D = {"chestxray14_cls": 14, "chexpert_cls": 5, "siim_pneumothorax_seg": 1, "montgomery_lung_seg": 1}


def _nifti(path: Path, array, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), np.eye(4)), str(path))
    return path


def _raw_ct(path: Path) -> Path:
    ct = np.random.default_rng(0).normal(0, 300, (32, 32, 16))
    ct[:4] = -1024  # air
    return _nifti(path, ct)


def _grey_png(path: Path) -> Path:
    Image.fromarray((np.arange(64 * 80) % 251).astype(np.uint8).reshape(64, 80)).save(path)
    return path


def _models(tmp_path: Path, bundle: str) -> tuple[Path, tuple[str, ...], dict]:
    """A tiny untrained model for ``bundle``: its folder, config files and overrides. Seeded: two calls give the same
    weights (a test comparing two inputs' predictions compared two random models before, and flipped whole masks)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _seeded_models(tmp_path, bundle)


def _seeded_models(tmp_path: Path, bundle: str) -> tuple[Path, tuple[str, ...], dict]:
    models = tmp_path / f"models_{bundle}"
    if bundle in BUNDLES_2D:
        kind = "segmentation" if bundle.endswith("_seg") else "classification"
        net = build_resnet_task_network(kind, 1, OUT_2D[bundle], backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8))
        configs, settings = ("inference.json", "tiny.json"), {}
    elif bundle.endswith("_fpr"):
        net, configs, settings = build_task_network("classification", 3, 1, 1, 0.125, ""), ("inference.json",), CLS3D
    else:
        net, configs, settings = build_task_network("segmentation", 3, 1, 1, 0.125, ""), ("inference.json",), SEG3D
    atomic_save(net.state_dict(), models / "model.pt")
    return models, configs, settings


def _infer(bundle: str, tmp_path: Path, image: Path | str = "", **overrides) -> Path:
    """Run ``bundle``'s inference.json writing into a fresh folder; returns that folder."""
    models, configs, settings = _models(tmp_path, bundle)
    out = tmp_path / f"out_{bundle}_{Path(str(image)).name or 'batch'}"
    out.mkdir(exist_ok=True)
    target = {"output_path": str(out / "prob.json")} if bundle.endswith(("_cls", "_fpr")) else {"output_dir": str(out)}
    run_inference(bundle, image, models, configs, **{**settings, **target, **overrides})
    return out


def _refused(bundle: str, tmp_path: Path, image: Path, **overrides) -> str:
    """The DataError message of an inference run on ``image``; checks it names the file and nothing was written."""
    with pytest.raises(Exception) as raised:
        _infer(bundle, tmp_path, image, **overrides)
    error = raised.value
    while error is not None and not isinstance(error, DataError):
        error = error.__cause__ or error.__context__
    assert error is not None, f"not a DataError: {raised.value!r}"
    message = str(error)
    assert message.startswith(f"{image}: "), message
    assert not any((tmp_path / f"out_{bundle}_{image.name}").iterdir())
    return message


# --- 1. colour PNGs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bundle, mode", [("chestxray14_cls", "RGBA"), ("chexpert_cls", "RGB"),
                                          ("siim_pneumothorax_seg", "RGB"), ("montgomery_lung_seg", "RGBA")])
def test_2d_inference_refuses_a_colour_png_naming_it(bundle, mode, tmp_path):
    """It failed in the first convolution: "the network expects 1 input channel(s), got 3 ...; set in_channels". The
    file is read as `dira3d prepare` reads it (tests/test_cxr_inference_read.py), which refuses colour channels that
    differ (a grey image stored as RGB(A) is read as its one channel)."""
    grey = np.asarray(Image.open(_grey_png(tmp_path / "grey.png")))
    image = tmp_path / "colour.png"
    Image.fromarray(np.stack([grey, grey[::-1], grey] + ([np.full_like(grey, 255)] if mode == "RGBA" else []), -1),
                    mode=mode).save(image)
    message = _refused(bundle, tmp_path, image)
    assert f"is a colour {mode} image: its colour channels differ" in message and "grey original" in message
    assert any(_infer(bundle, tmp_path, tmp_path / "grey.png").iterdir())  # the grey image runs


# --- 2. a prepared volume for a raw scan, and the reverse --------------------------------------------------------

@pytest.mark.parametrize("bundle", ["lits_liver_seg", "lidc_nodule_seg"])
def test_a_prepared_volume_given_for_a_raw_ct_is_refused_with_the_way_out(bundle, tmp_path):
    """The HU window [-1000, 1000] made a [0, 1] volume about 0.5 everywhere; it was segmented without a word (lits
    warned that it had no air and suggested an MRI setting; lidc said nothing)."""
    prepared = _nifti(tmp_path / "case_prepared.nii.gz", np.random.default_rng(1).random((32, 32, 16)))
    message = _refused(bundle, tmp_path, prepared)
    assert "already prepared by `dira3d prepare`" in message and "pass the original scan" in message
    assert '--hu_window "[0, 1]"' in message
    # the way out the message names: the volume is then taken as it is, without the no-air warning
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no voxel below")
        out = _infer(bundle, tmp_path, prepared, hu_window=[0, 1])
    assert (out / "case_prepared_seg.nii.gz").is_file()
    assert (_infer(bundle, tmp_path, _raw_ct(tmp_path / "raw.nii.gz")) / "raw_seg.nii.gz").is_file()


def test_lits_with_an_mr_model_takes_an_mri_and_refuses_a_ct(tmp_path):
    """modality mr (the model's preprocessing.json or --modality mr): percentile scaling takes any MRI, a prepared one
    too (scaled again to within 1%); a CT in HU, with air, is refused."""
    mri = _nifti(tmp_path / "mri.nii.gz", np.random.default_rng(2).gamma(2.0, 300.0, (32, 32, 16)))
    assert (_infer("lits_liver_seg", tmp_path, mri, modality="mr") / "mri_seg.nii.gz").is_file()
    message = _refused("lits_liver_seg", tmp_path, _raw_ct(tmp_path / "ct.nii.gz"), modality="mr")
    assert "it looks like a CT" in message and "takes an MRI" in message


@pytest.mark.parametrize("bundle", ["luna16_nodule_fpr", "pecad_embolism_fpr"])
def test_candidate_bundles_take_a_prepared_cube_and_refuse_a_raw_ct(bundle, tmp_path):
    cube = _nifti(tmp_path / "cand.nii.gz", np.random.default_rng(1).random((16, 16, 8)))
    assert (_infer(bundle, tmp_path, cube) / "prob.json").is_file()
    message = _refused(bundle, tmp_path, _raw_ct(tmp_path / "raw.nii.gz"))
    assert "outside [0, 1]" in message and "not a raw scan" in message


# --- 3. a mask given as the image ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bundle", ["lits_liver_seg", "brats_tumor_seg", "lidc_nodule_seg", "luna16_nodule_fpr",
                                    "pecad_embolism_fpr"])
def test_a_mask_given_as_the_image_is_refused(bundle, tmp_path):
    """lits/lidc/luna16/pecad segmented or scored a {0, 1} mask without a word; brats failed with "MR volume is
    constant in its foreground", naming no file."""
    shape = (16, 16, 8) if bundle.endswith("_fpr") else (32, 32, 16)
    mask = np.zeros(shape, np.uint8)
    mask[4:12, 4:12, 2:6] = 1
    message = _refused(bundle, tmp_path, _nifti(tmp_path / "case_seg.nii.gz", mask, np.uint8))
    assert "has only 2 distinct values (0, 1): it looks like a mask or label map, not a scan" in message


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_2d_inference_refuses_a_mask_and_images_of_another_scale(bundle, tmp_path):
    mask = ((np.asarray(Image.open(_grey_png(tmp_path / "grey.png"))) > 120) * 255).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert "distinct values (0, 255): it looks like a mask" in _refused(bundle, tmp_path, tmp_path / "mask.png")
    # a 16-bit mask is min-max scaled to 0/255 as `dira3d prepare` reads a 16-bit PNG, and still refused as a mask
    # (a 16-bit radiograph is now read as preparation reads it: tests/test_cxr_inference_read.py)
    Image.fromarray((mask // 255).astype(np.uint16)).save(tmp_path / "mask16.png")
    assert "distinct values (0, 255): it looks like a mask" in _refused(bundle, tmp_path, tmp_path / "mask16.png")
    wide = _nifti(tmp_path / "wide.nii.gz", np.random.default_rng(0).integers(0, 4096, (64, 80)))  # not a radiograph file
    assert "outside [0, 255]" in (message := _refused(bundle, tmp_path, wide)) and "NIfTI" in message
    scaled = _nifti(tmp_path / "scaled.nii.gz", np.random.default_rng(0).random((64, 80)))  # scaled to [0, 1]: black
    assert "within [0, 1]" in _refused(bundle, tmp_path, scaled)


# --- 4. another dimensionality -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bundle", ["lits_liver_seg", "lidc_nodule_seg", "luna16_nodule_fpr"])
def test_a_4d_file_given_to_a_one_channel_3d_bundle_is_refused(bundle, tmp_path):
    """lits/lidc failed in the network ("expects 1 input channel(s), got 4 ...; set in_channels"), naming no file."""
    image = _nifti(tmp_path / "four.nii.gz", np.random.default_rng(0).random((32, 32, 16, 4)) * 500 - 1000)
    message = _refused(bundle, tmp_path, image)
    assert "has 4 channels" in message and "pass one 3D volume" in message


@pytest.mark.parametrize("bundle", ["lits_liver_seg", "brats_tumor_seg", "lidc_nodule_seg"])
def test_a_2d_image_given_to_a_3d_bundle_is_refused(bundle, tmp_path):
    """It failed in the sliding window: "Inputs must have 5 dimensions for 3D roi_size ...", naming no file."""
    message = _refused(bundle, tmp_path, _grey_png(tmp_path / "cxr.png"))
    assert "loaded as a 2D image" in message and "use a 2D bundle" in message


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_a_3d_volume_given_to_a_2d_bundle_is_refused(bundle, tmp_path):
    """It failed in Resized: "len(spatial_size) must be greater or equal to img spatial dimensions"."""
    message = _refused(bundle, tmp_path, _raw_ct(tmp_path / "ct.nii.gz"))
    assert "loaded as a 3D volume" in message and "use a 3D bundle" in message


# --- 5. not an image -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bundle, suffix", [("lits_liver_seg", ".nii.gz"), ("luna16_nodule_fpr", ".nii.gz"),
                                            ("siim_pneumothorax_seg", ".png")])
def test_a_file_that_is_not_an_image_and_an_empty_file_are_named_as_such(bundle, suffix, tmp_path):
    """MONAI said "cannot find a suitable reader ... Please install the reader libraries"."""
    text = tmp_path / f"notes{suffix}"
    text.write_text("not an image\n")
    message = _refused(bundle, tmp_path, text)
    assert "cannot be read as an image" in message and "install" not in message
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    assert "is empty (0 bytes)" in _refused(bundle, tmp_path, empty)


# --- 6. a datalist of several inputs -------------------------------------------------------------------------------

def test_a_batch_goes_on_with_the_good_inputs_and_names_the_bad_ones(tmp_path):
    """One mask among candidate cubes stopped the whole run, and the probabilities of the good ones were never written."""
    rng = np.random.default_rng(0)
    good = [_nifti(tmp_path / f"cand{i}.nii.gz", rng.random((16, 16, 8))) for i in range(2)]
    mask = _nifti(tmp_path / "cand_seg.nii.gz", (rng.random((16, 16, 8)) > 0.5), np.uint8)
    datalist = [{"image": str(good[0])}, {"image": str(mask)}, {"image": str(good[1])}]
    with pytest.warns(DataWarning) as caught:
        out = _infer("luna16_nodule_fpr", tmp_path, datalist=datalist)
    result = json.loads((out / "prob.json").read_text())
    assert [Path(p["image"]).name for p in result["predictions"]] == ["cand0.nii.gz", "cand1.nii.gz"]
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"left out: {mask}: has only 2 distinct values") for m in messages), messages
    assert any("1 of 3 inputs left out" in m for m in messages), messages


def test_a_segmentation_batch_writes_the_good_masks_and_a_batch_of_bad_inputs_lists_them_all(tmp_path):
    raw = _raw_ct(tmp_path / "raw.nii.gz")
    prepared = _nifti(tmp_path / "prepared.nii.gz", np.random.default_rng(1).random((32, 32, 16)))
    with pytest.warns(DataWarning, match=r"^1 of 2 inputs left out \(each named above\); inference goes on"), \
            pytest.warns(DataWarning, match=rf"left out: {prepared}: .*already prepared"):
        out = _infer("lits_liver_seg", tmp_path, datalist=[{"image": str(prepared)}, {"image": str(raw)}])
    assert sorted(p.name for p in out.iterdir()) == ["inference_report.json", "raw_seg.nii.gz"]  # tests/test_inference_batch.py
    text = tmp_path / "notes.nii.gz"
    text.write_text("x")
    with pytest.raises(Exception) as raised:
        _infer("lits_liver_seg", tmp_path, datalist=[{"image": str(prepared)}, {"image": str(text)}])
    error = raised.value
    while error is not None and not isinstance(error, DataError):
        error = error.__cause__ or error.__context__
    assert "none of the 2 inputs can be used" in str(error) and str(prepared) in str(error) and str(text) in str(error)


# --- the checks themselves -----------------------------------------------------------------------------------------

def test_mask_values_sees_masks_of_any_type_and_leaves_scans_alone():
    from dira3d.data.normalize import mask_values

    labels = np.zeros((16, 16, 8), np.float32)
    labels[:4], labels[4:6] = 1, 2
    assert mask_values(labels).tolist() == [0, 1, 2]  # a label map read as floats
    assert mask_values(labels.astype(np.int16)).tolist() == [0, 1, 2]
    assert mask_values(labels * 0.5) is None  # 0, 0.5, 1: not integers
    assert mask_values(np.zeros((8, 8))) is None  # constant: judged by the intensity checks
    ct = np.random.default_rng(0).normal(0, 300, (32, 32, 16)).round().astype(np.int16)
    assert mask_values(ct) is None
    # a CT thresholded to two values, or quantised to 100-HU steps, has negative values: not a label map
    assert mask_values(np.where(ct > 0, 1000, -1000)) is None
    assert mask_values((np.clip(ct, -1000, 500) // 100 * 100).astype(np.int16)) is None
    assert mask_values(np.where(ct > 0, 255, 0)).tolist() == [0, 255]  # a 0/255 mask still is one


def test_the_checks_pass_what_each_bundle_takes():
    rng = np.random.default_rng(0)
    ct = torch.as_tensor(rng.normal(0, 300, (1, 16, 16, 8)) - 500.0)
    check_inference_input(ct, "ct.nii.gz", 3, 1, "ct", [-1000, 1000])
    check_inference_input(torch.as_tensor(rng.random((1, 16, 16, 8))), "cube.nii.gz", 3, 1, "prepared", value_range=[0, 1])
    check_inference_input(torch.as_tensor(rng.random((4, 16, 16, 8)) * 900), "brats.nii.gz", 3, None, "mr")
    check_inference_input(torch.as_tensor(rng.integers(0, 256, (1, 32, 40)).astype(np.float32)), "cxr.png", 2, 1, "8bit",
                          value_range=[0, 255])
    with pytest.raises(ValueError, match="modality='hu' .*'ct' .*'mr'"):
        check_inference_input(ct, "ct.nii.gz", takes="hu")


def test_a_dicom_series_with_a_missing_slice_is_refused_not_read_by_another_reader(tmp_path):
    """inference.json's ``SimpleITKReader`` refused a DICOM series with a missing slice (``read_image``), but MONAI's
    ``LoadImage`` went on to its own readers: pydicom read the 23 slices left with the gap spread over them (spacing
    2.09 instead of 2 mm) and a mask was written on that grid, exit code 0; ``dira3d prepare`` refuses the series."""
    from conftest import write_dicom_series

    from dira3d.engines.inputs import LoadVolumed
    from dira3d.evaluation import SimpleITKReader

    volume = np.full((16, 16, 24), -800, dtype=np.int16)
    whole, gapped = tmp_path / "1.2.826.0.1.1", tmp_path / "1.2.826.0.1.2"
    write_dicom_series(whole, volume)
    write_dicom_series(gapped, volume)
    (gapped / "slice010.dcm").unlink()
    load = LoadVolumed(keys="image", reader=SimpleITKReader(), image_only=True)
    image = load({"image": str(whole)})["image"]
    assert tuple(image.shape) == (16, 16, 24) and np.allclose(image.meta["spacing"], (0.7, 0.7, 2.0))
    with pytest.raises(DataError, match=r"1\.2\.826\.0\.1\.2: the DICOM series has non-uniform slice spacing: .* missing"):
        load({"image": str(gapped)})
