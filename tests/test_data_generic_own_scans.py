"""`dira3d prepare generic` on a user's own scan folder as it is after the other steps of the path: a prediction
that inference wrote next to a scan, scans of several voxel sizes, a validation list of one volume."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from dira3d.data import generic
from dira3d.data.io import xyz_to_image
from dira3d.data.nifti_header import is_marked_prediction


def _ct(seed: int, spacing=(1.0, 1.0, 2.0), shape=(20, 18, 10)) -> sitk.Image:
    """A small CT in HU: air around a soft-tissue block."""
    array = np.full(shape, -1000.0, np.float32)
    array[4:16, 4:14, 2:8] = np.random.default_rng(seed).uniform(-100, 300, size=(12, 10, 6))
    image = xyz_to_image(array.astype(np.int16))
    image.SetSpacing(spacing)
    return image


def _prediction(path: Path, like: Path) -> None:
    """A mask as a task bundle's inference writes it: MONAI's NIfTI writer with dira3d's mark in ``descrip``."""
    from dira3d.evaluation.outputs import PredictionNiftiWriter

    scan = nib.load(str(like))
    mask = (np.asarray(scan.dataobj) > 0).astype(np.uint8)
    nib.save(PredictionNiftiWriter.create_backend_obj(mask, affine=scan.affine), str(path))


def test_a_prediction_written_next_to_a_scan_is_left_out_of_the_scans(tmp_path, capsys):
    """inference.json writes `<scan>_seg.nii.gz` next to the scan by default; the next `prepare generic` of that folder
    took it for a scan and failed its case ('looks like a mask'), which stopped the batch without --keep-going."""
    src = tmp_path / "my_scans"
    src.mkdir()
    for i, name in enumerate(("a", "b")):
        sitk.WriteImage(_ct(i), str(src / f"{name}.nii.gz"))
    _prediction(src / "a_seg.nii.gz", src / "a.nii.gz")
    assert is_marked_prediction(src / "a_seg.nii.gz") and not is_marked_prediction(src / "a.nii.gz")

    results = generic.prepare(src, tmp_path / "out", modality="ct", progress=False)
    assert sorted((r.case_id, r.status) for r in results) == [("a", "written"), ("b", "written")]
    err = capsys.readouterr().err
    assert "left out 1 prediction file(s) written by a dira3d bundle's inference" in err and "a_seg.nii.gz" in err, err
    datalist = json.loads((tmp_path / "out" / "pretrain_datalist.json").read_text())
    assert sorted(e["case_id"] for e in datalist["training"]) == ["a", "b"]

    # named like a mask, it is one (a prediction corrected by hand, used as a label)
    results = generic.prepare(src, tmp_path / "labelled", modality="ct", label_suffix="_seg", progress=False)
    assert all(r.status == "written" for r in results)
    entry = next(e for e in json.loads((tmp_path / "labelled" / "pretrain_datalist.json").read_text())["training"]
                 if e["case_id"] == "a")
    assert np.asarray(nib.load(tmp_path / "labelled" / entry["label"]).dataobj).any()


def test_an_unmarked_mask_among_the_scans_still_fails_its_case(tmp_path):
    src = tmp_path / "my_scans"
    src.mkdir()
    sitk.WriteImage(_ct(0), str(src / "a.nii.gz"))
    mask = nib.load(str(src / "a.nii.gz"))
    nib.save(nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), mask.affine), str(src / "a_seg.nii.gz"))
    results = {r.case_id: r for r in generic.prepare(src, tmp_path / "out", modality="ct", keep_going=True, progress=False)}
    assert results["a_seg"].status == "failed" and "looks like a mask" in results["a_seg"].reason


def test_native_spacings_that_differ_are_warned_about_with_a_spacing_to_use(tmp_path, capsys):
    """Without --spacing every volume keeps its voxel size; scans of 1 mm and 5 mm slices became one datalist
    without a word, so a patch covered five times the depth in some scans."""
    src = tmp_path / "my_scans"
    src.mkdir()
    sitk.WriteImage(_ct(0, spacing=(0.8, 0.8, 1.0)), str(src / "thin.nii.gz"))
    sitk.WriteImage(_ct(1, spacing=(0.8, 0.8, 5.0)), str(src / "thick.nrrd"))
    sitk.WriteImage(_ct(2, spacing=(0.8, 0.8, 2.0)), str(src / "mid.nrrd"))
    generic.prepare(src, tmp_path / "native", modality="ct", progress=False)
    err = capsys.readouterr().err
    assert ("WARNING pretrain_datalist.json: the volumes kept their native spacing, which differs by more than 1.5x on "
            "axis z: 1 mm (thin) to 5 mm (thick)") in err, err
    assert "--spacing 0.8 0.8 2, the median" in err

    generic.prepare(src, tmp_path / "resampled", modality="ct", spacing=(1.0, 1.0, 2.0), progress=False)
    assert "native spacing" not in capsys.readouterr().err
    for name in ("thick.nrrd", "mid.nrrd"):
        (src / name).unlink()
    sitk.WriteImage(_ct(1, spacing=(0.9, 0.8, 1.4)), str(src / "close.nrrd"))  # within 1.5x of thin's 0.8 0.8 1
    generic.prepare(src, tmp_path / "close", modality="ct", progress=False)
    assert "native spacing" not in capsys.readouterr().err


def test_a_validation_list_of_one_volume_is_warned_about(tmp_path, capsys):
    """Visual-word validation (--val-neighbours 2 or more, which pretraining on visual words needs) and Barlow
    Twins need 2 validation volumes: a --val-fraction giving one was found only at those later steps."""
    src = tmp_path / "my_scans"
    src.mkdir()
    for i in range(4):
        sitk.WriteImage(_ct(i), str(src / f"s{i}.nii.gz"))
    generic.prepare(src, tmp_path / "one", modality="ct", val_fraction=0.25, progress=False)
    err = capsys.readouterr().err
    assert "its 'validation' list holds 1 volume" in err and "--val-neighbours 2 or more" in err, err
    generic.prepare(src, tmp_path / "two", modality="ct", val_fraction=0.5, progress=False)
    assert "holds 1 volume" not in capsys.readouterr().err


def test_a_dicom_folder_without_a_readable_series_fails_by_name_while_the_good_scans_go_on(tmp_path):
    """A folder of `.dcm` files that GDCM reads no series from (zero-byte or truncated copies) was left out without a
    word: `1 written`, no failed case, no warning, so the user never learned that a scan was missing."""
    from conftest import write_dicom_series

    src = tmp_path / "my_scans"
    src.mkdir()
    sitk.WriteImage(_ct(0), str(src / "good.nii.gz"))
    write_dicom_series(src / "series_ok", sitk.GetArrayFromImage(_ct(1)).transpose(2, 1, 0))
    (src / "empty_copy").mkdir()
    (src / "empty_copy" / "IM0001.dcm").write_bytes(b"")
    (src / "empty_copy" / "IM0002.dcm").write_bytes(b"not a dicom file")
    (src / "cd_root").mkdir()  # a DICOMDIR alone (its series in sub-folders) is no scan of its own
    (src / "cd_root" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    results = {r.case_id: r for r in generic.prepare(src, tmp_path / "out", modality="ct", keep_going=True,
                                                     progress=False)}
    assert set(results) == {"good", "series_ok", "empty_copy"}, results
    assert results["good"].status == results["series_ok"].status == "written"
    assert results["empty_copy"].status == "failed"
    reason = results["empty_copy"].reason
    assert "empty_copy" in reason and "2 DICOM file(s) (IM0001.dcm, IM0002.dcm)" in reason and "no image series" in reason
    datalist = json.loads((tmp_path / "out" / "pretrain_datalist.json").read_text())
    assert sorted(e["case_id"] for e in datalist["training"]) == ["good", "series_ok"]
