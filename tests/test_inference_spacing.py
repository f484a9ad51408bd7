"""The 3D ``inference.json`` resamples a raw scan to the voxel size the model was trained at.

Before, ``preprocessing.json`` recorded the intensity scaling only and ``pixdim`` defaulted to the scan's own voxels: a
0.57 mm scan was run at native voxels against a model trained on 2x2x5 mm volumes (slow, and silently wrong), unless
the user copied ``--pixdim`` from ``dira3d finetune``'s printed command. Fine-tuning now records the datalist's
``meta.spacing`` there and ``pixdim`` follows it; the prediction is still written on the scan's own grid.
"""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from test_inference_outputs import _infer as run_inference

from dira3d.evaluation import build_task_network
from dira3d.evaluation.finetune import bundle_path
from dira3d.evaluation.preprocessing import datalist_preprocessing, trained_spacing, write_preprocessing
from dira3d.utils import atomic_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _datalist(tmp_path, spacing):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [], "meta": {"dataset": "lits", "window": [-100, 400], "spacing": spacing}}))
    return path


@pytest.mark.parametrize("spacing, recorded", [([2, 2, 5], [2.0, 2.0, 5.0]), (1.5, [1.5, 1.5, 1.5]), (None, None)])
def test_finetuning_records_the_datalist_spacing(tmp_path, spacing, recorded):
    assert datalist_preprocessing(_datalist(tmp_path, spacing)) == {"window": [-100, 400], "spacing": recorded}


def test_a_datalist_without_a_usable_spacing_records_none(tmp_path):
    assert "spacing" not in datalist_preprocessing(_datalist(tmp_path, [0, 1, 1]))
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"training": [], "meta": {"window": [-100, 400]}}))
    assert datalist_preprocessing(path) == {"window": [-100, 400]}


def _parser(bundle, ckpt_dir, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle_path(bundle) / "configs" / "inference.json")])
    parser.update({"ckpt_dir": str(ckpt_dir), **overrides})
    return parser


@pytest.mark.parametrize("bundle", ["lits_liver_seg", "brats_tumor_seg", "lidc_nodule_seg"])
def test_pixdim_follows_the_recorded_spacing_and_the_command_line_wins(bundle, tmp_path, caplog):
    write_preprocessing(tmp_path, {"spacing": [2.0, 2.0, 5.0]})
    with caplog.at_level(logging.WARNING):
        assert _parser(bundle, tmp_path).get_parsed_content("pixdim") == [2.0, 2.0, 5.0]
    assert not caplog.records
    assert _parser(bundle, tmp_path, pixdim=0).get_parsed_content("pixdim") == 0  # native voxels, on request
    assert _parser(bundle, tmp_path, pixdim=[1, 1, 1]).get_parsed_content("pixdim") == [1, 1, 1]
    write_preprocessing(tmp_path, {"spacing": None})  # the training volumes kept their own voxel size
    assert _parser(bundle, tmp_path).get_parsed_content("pixdim") == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bundle, default", [("lits_liver_seg", [0.0] * 3), ("lidc_nodule_seg", [1.0] * 3)])
def test_a_file_from_before_the_record_keeps_the_old_default_with_one_note(bundle, default, tmp_path, caplog):
    assert _parser(bundle, tmp_path).get_parsed_content("pixdim") == default  # no file: silently as before
    write_preprocessing(tmp_path, {"modality": "ct"})
    with caplog.at_level(logging.WARNING, logger="dira3d.evaluation.preprocessing"):
        assert _parser(bundle, tmp_path).get_parsed_content("pixdim") == default
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and str(tmp_path / "preprocessing.json") in notes[0] and "--pixdim" in notes[0]


def test_a_garbled_spacing_is_named(tmp_path):
    write_preprocessing(tmp_path, {"spacing": [2, "x", 5]})
    with pytest.raises(ValueError, match=r"preprocessing\.json: spacing .* --pixdim"):
        trained_spacing(tmp_path)


def _raw_ct(path, spacing=(0.7, 0.7, 2.5)):
    ct = np.random.default_rng(0).normal(0, 300, (40, 36, 12)).astype(np.float32)
    ct[:4] = -1024  # air
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-like axes, off-centre origin
    affine[:3, 3] = [12.0, -7.5, 30.0]
    nib.save(nib.Nifti1Image(ct, affine), str(path))
    return path


def test_a_raw_scan_is_resampled_to_the_training_spacing_and_predicted_on_its_own_grid(tmp_path):
    models = tmp_path / "models"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        atomic_save(build_task_network("segmentation", 3, 1, 1, 0.125, "").state_dict(), models / "model.pt")
    write_preprocessing(models, {"window": [-1000, 1000], "spacing": [2.0, 2.0, 5.0]})
    image = _raw_ct(tmp_path / "scan.nii.gz")
    # what the network is given: the scan at 2 x 2 x 5 mm (40 x 0.7 = 28 mm -> about 14 voxels ...), not its 40 x 36 x 12
    prepared = _parser("lits_liver_seg", models).get_parsed_content("preprocessing")({"image": str(image)})["image"]
    expected = np.array([40 * 0.7 / 2, 36 * 0.7 / 2, 12 * 2.5 / 5])
    assert np.all(np.abs(np.array(prepared.shape[1:]) - expected) <= 1), prepared.shape
    assert np.allclose(prepared.pixdim.numpy(), [2.0, 2.0, 5.0])
    out = tmp_path / "out"
    run_inference("lits_liver_seg", image, models, width=0.125, roi_size=[16, 16, 8], sw_batch_size=1,
                  output_dir=str(out))
    scan, seg = nib.load(str(image)), nib.load(str(out / "scan_seg.nii.gz"))
    assert seg.shape == scan.shape
    assert np.allclose(seg.affine, scan.affine, atol=1e-4)  # spacing, origin and direction of the input
