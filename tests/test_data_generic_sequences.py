"""`dira3d prepare generic --sequences`: multi-sequence MRI in a hospital layout (one folder per case, one file or
DICOM series per sequence, a mask), prepared as `dira3d prepare brats` prepares BraTS, for brats_tumor_seg."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series

from dira3d.cli import main as cli_main
from dira3d.data import brats, generic
from dira3d.data.io import xyz_to_image

SHAPE = (24, 20, 12)
SEQUENCES = ["t1=*T1w*", "flair=*FLAIR*"]


def _case_images(seed: int) -> dict[str, sitk.Image]:
    """T1, FLAIR (each its own scale and ramp, so a swapped channel shows) and a mask, LPS on disk."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(SHAPE, bool)
    brain[3:21, 3:17, 2:10] = True
    mask = np.zeros(SHAPE, np.uint8)
    c = rng.integers(8, 14, size=3)
    mask[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, 3:8] = 1
    ramp_x, ramp_y, _ = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    t1 = np.where(brain, 300 + 10 * ramp_x + rng.normal(0, 5, SHAPE) - 100.0 * mask, 0)
    flair = np.where(brain, 800 + 20 * ramp_y + rng.normal(0, 5, SHAPE) + 600.0 * mask, 0)
    images = {"t1": xyz_to_image(t1.astype(np.float32)), "flair": xyz_to_image(flair.astype(np.float32)),
              "mask": xyz_to_image(mask)}
    for image in images.values():
        image.SetSpacing((1.0, 1.1, 2.5))
        image.SetOrigin((90.0, 120.0, -30.0))
        image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # LPS: the prepared volume is reoriented to RAS
    return images


def _hospital_case(src: Path, pid: str, seed: int, skip: str = "") -> dict[str, sitk.Image]:
    """`<pid>/<pid>_T1w.nii.gz`, `<pid>_FLAIR.nrrd`, `<pid>_mask.nii.gz` and a BIDS sidecar (not an image)."""
    folder = src / pid
    folder.mkdir(parents=True)
    images = _case_images(seed)
    names = {"t1": f"{pid}_T1w.nii.gz", "flair": f"{pid}_FLAIR.nrrd", "mask": f"{pid}_mask.nii.gz"}
    for kind, image in images.items():
        if kind != skip:
            sitk.WriteImage(image, str(folder / names[kind]))
    (folder / f"{pid}_T1w.json").write_text('{"RepetitionTime": 2.3}')
    return images


def _hospital_export(src: Path) -> None:
    for i in range(4):
        _hospital_case(src, f"sub-0{i + 1}", seed=i)
    _hospital_case(src, "sub-05", seed=5, skip="flair")  # a missing sequence
    _hospital_case(src, "sub-06", seed=6)  # two files match the T1 pattern
    sitk.WriteImage(_case_images(7)["t1"], str(src / "sub-06" / "sub-06_run-2_T1w.nii.gz"))
    images = _hospital_case(src, "sub-07", seed=7)  # a FLAIR on another grid
    flair = images["flair"][:, :, 1:]
    sitk.WriteImage(flair, str(src / "sub-07" / "sub-07_FLAIR.nrrd"))


def test_a_hospital_export_is_prepared_as_prepare_brats_prepares_the_same_scans(tmp_path):
    src, dst = tmp_path / "export", tmp_path / "prepared"
    _hospital_export(src)
    results = {r.case_id: r for r in generic.prepare(src, dst, sequences=SEQUENCES, label_pattern="*mask*",
                                                     test_fraction=0.25, keep_going=True, progress=False)}
    assert {c for c, r in results.items() if r.status == "written"} == {"sub-01", "sub-02", "sub-03", "sub-04"}
    missing, ambiguous, grid = results["sub-05"].reason, results["sub-06"].reason, results["sub-07"].reason
    assert "sub-05" in missing and "flair pattern" in missing and "'*FLAIR*'" in missing
    assert "2 files match the t1 pattern" in ambiguous and "sub-06_run-2_T1w.nii.gz" in ambiguous
    assert "sub-07_FLAIR.nrrd" in grid and "sequence does not match image" in grid and "size" in grid
    assert "co-registered" in grid
    report = json.loads((dst / "report.json").read_text())
    assert {c["case_id"] for c in report["cases"] if c["status"] == "failed"} == {"sub-05", "sub-06", "sub-07"}

    datalist = json.loads((dst / "pretrain_datalist.json").read_text())
    meta = datalist["meta"]
    assert meta["channels"] == ["t1", "flair"] and meta["modality"] == "mr" and meta["percentiles"] == [0.5, 99.5]
    assert meta["sequences"] == {"t1": "*T1w*", "flair": "*FLAIR*"} and meta["label_pattern"] == "*mask*"
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [3, 0, 1]

    # the same scans in the BraTS layout, through prepare brats: the same volumes and masks
    layout = tmp_path / "brats"
    for pid in ("sub-01", "sub-02", "sub-03", "sub-04"):
        folder = layout / "HGG" / pid
        folder.mkdir(parents=True)
        for kind, name in (("t1", f"{pid}_T1w.nii.gz"), ("flair", f"{pid}_FLAIR.nrrd"), ("seg", f"{pid}_mask.nii.gz")):
            sitk.WriteImage(sitk.ReadImage(str(src / pid / name)), str(folder / f"{pid}_{kind}.nii.gz"))
    brats.prepare(layout, tmp_path / "brats_out", modalities=("t1", "flair"), split=(3, 1), progress=False)
    for entry in datalist["training"] + datalist["test"]:
        ours, theirs = nib.load(dst / entry["image"]), nib.load(tmp_path / "brats_out" / "images" / f"{entry['case_id']}.nii.gz")
        assert ours.shape == (*SHAPE, 2) and nib.aff2axcodes(ours.affine) == ("R", "A", "S")
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
        np.testing.assert_allclose(ours.affine, theirs.affine)
        label = np.asarray(nib.load(dst / entry["label"]).dataobj)
        np.testing.assert_array_equal(label, np.asarray(nib.load(tmp_path / "brats_out" / "labels" / f"{entry['case_id']}.nii.gz").dataobj))
        assert set(entry) == {"image", "label", "case_id", "patient_id"}


def test_reruns_skip_the_written_cases_and_redo_the_fixed_and_the_damaged(tmp_path):
    src, dst = tmp_path / "export", tmp_path / "prepared"
    _hospital_export(src)
    options = dict(sequences=SEQUENCES, label_pattern="*mask*", keep_going=True, progress=False)
    generic.prepare(src, dst, **options)
    (src / "sub-06" / "sub-06_run-2_T1w.nii.gz").rename(src / "sub-06" / "run-2_T1.nii.gz")  # the user fixes one case
    damaged = dst / "volumes" / "sub-02.nii.gz"  # a volume of another run: one channel
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), damaged)
    again = {r.case_id: r for r in generic.prepare(src, dst, **options)}
    assert {c: r.status for c, r in again.items()} == {
        "sub-01": "skipped", "sub-02": "written", "sub-03": "skipped", "sub-04": "skipped", "sub-05": "failed",
        "sub-06": "written", "sub-07": "failed"}
    assert "holds 1 channel(s), not the 2" in again["sub-02"].warnings[0]
    assert nib.load(damaged).shape == (*SHAPE, 2)
    # other sequences would leave the written cases with the old channels: refused before any case
    with pytest.raises(ValueError, match="channels"):
        generic.prepare(src, dst, **{**options, "sequences": ["flair=*FLAIR*", "t1=*T1w*"]})


def _dicom_series(folder: Path, image: sitk.Image) -> None:
    """``image`` (an axial LPS grid) as a DICOM MR series of int16 slices, a series UID of its own per folder."""
    write_dicom_series(folder, np.round(sitk.GetArrayFromImage(image)).transpose(2, 1, 0), image.GetSpacing(),
                       image.GetOrigin(), modality="MR", series_uid=f"1.2.826.0.1.3680043.2.1125.{folder.name}",
                       sop_prefix=f"1.2.826.0.1.3680043.2.1125.3.{len(folder.name)}", file_name="IM{:04d}.dcm")


def test_dicom_series_folders_are_sequences_and_a_mask_matching_a_sequence_pattern_is_named(tmp_path):
    src = tmp_path / "export"
    images = _case_images(0)
    for image in images.values():
        image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    (src / "patient1").mkdir(parents=True)
    _dicom_series(src / "patient1" / "T1_MPRAGE", images["t1"])
    _dicom_series(src / "patient1" / "FLAIR_AX", images["flair"])
    sitk.WriteImage(images["mask"], str(src / "patient1" / "lesion.nii.gz"))
    (src / "patient2").mkdir()
    sitk.WriteImage(images["t1"], str(src / "patient2" / "t1_mprage.nii.gz"))
    sitk.WriteImage(images["mask"], str(src / "patient2" / "flair_lesion.nii.gz"))  # matches *flair* and *lesion*
    results = {r.case_id: r for r in generic.prepare(src, tmp_path / "out", sequences=["t1=*mprage*,flair=*flair*"],
                                                     label_pattern="*lesion*", keep_going=True, progress=False)}
    assert results["patient1"].status == "written", results["patient1"].reason
    assert nib.load(tmp_path / "out" / "volumes" / "patient1.nii.gz").shape == (*SHAPE, 2)
    reason = results["patient2"].reason
    assert "flair_lesion.nii.gz matches the patterns of flair and label" in reason


def test_case_folders_leave_out_hidden_and_output_folders_and_refuse_a_case_id_given_twice(tmp_path):
    """The case search under --src: a hidden folder (.git, a viewer's .cache) and the output folder inside --src (whose
    volumes a rerun would take for cases) are not searched; two folders that give one case id (`site_a/sub-01` and
    `site_a_sub-01`) would write the same volume: the second is a problem naming both."""
    from dira3d.data.sequences import find_sequence_cases

    src = tmp_path / "export"
    for folder in ("site_a/sub-01", "site_a_sub-01", ".cache/sub-09", "prepared/volumes"):
        (src / folder).mkdir(parents=True)
        (src / folder / f"{Path(folder).name}_T1w.nii.gz").write_bytes(b"")
    problems: dict[str, str] = {}
    found = find_sequence_cases(src, {"t1": "*T1w*"}, exclude=[src / "prepared"], problems=problems)
    assert [(cid, folder) for cid, folder, _, _ in found] == [("site_a_sub-01", src / "site_a" / "sub-01")]
    assert found[0][2] == {"t1": src / "site_a" / "sub-01" / "sub-01_T1w.nii.gz"} and found[0][3] is None
    assert list(problems) == ["site_a_sub-01"]
    assert f"{src / 'site_a_sub-01'}: gives the same case id 'site_a_sub-01' as {src / 'site_a' / 'sub-01'}" in \
        problems["site_a_sub-01"]


@pytest.mark.parametrize("argv, message", [
    (["--sequences", "t1=*T1w*", "dwi=*DWI*"], "'dwi' is unknown"),
    (["--sequences", "t1"], "must be NAME=PATTERN"),
    (["--sequences", "t1=*T1w*", "T1=*T1*"], "names t1 twice"),
    (["--sequences", "t1=*T1w*", "--modality", "ct"], "drop --modality ct"),
    (["--sequences", "t1=*T1w*", "--label-suffix", "_mask"], "--label-pattern"),
    (["--sequences", "t1=*T1w*", "--image-suffix", "_T1w"], "--image-suffix / --label-suffix pair single scans"),
    (["--label-pattern", "*mask*"], "give --sequences too"),
    (["--sequences", "t1=*nothing*"], "no folder holds"),
])
def test_bad_sequence_settings_stop_before_any_case(tmp_path, capsys, argv, message):
    src = tmp_path / "export"
    _hospital_case(src, "sub-01", seed=0)
    code = cli_main(["prepare", "generic", "--src", str(src), "--dst", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out" / "volumes").exists()


@pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py
def test_brats_bundle_fine_tunes_on_the_prepared_export_and_inference_reads_its_channels(tmp_path):
    from monai.bundle import ConfigParser

    from dira3d.evaluation.finetune import bundle_path, run_finetune

    src, dst = tmp_path / "export", tmp_path / "prepared"
    for i in range(5):
        _hospital_case(src, f"sub-0{i + 1}", seed=i)
    generic.prepare(src, dst, sequences=SEQUENCES, label_pattern="*mask*", test_fraction=0.2, progress=False)
    result = run_finetune("brats_tumor_seg", {"datalist": str(dst / "pretrain_datalist.json"), "pretrained": "",
                                              "modalities": "t1,flair", "max_epochs": 1}, output_dir=tmp_path / "ft",
                          tiny=True)
    assert 0.0 <= result["metrics"]["dice"] <= 1.0
    models = tmp_path / "ft" / "models"
    recorded = json.loads((models / "preprocessing.json").read_text())
    assert recorded["channels"] == ["t1", "flair"] and recorded["modalities"] == ["t1", "flair"]
    parser = ConfigParser()
    parser.read_config([str(bundle_path("brats_tumor_seg") / "configs" / "inference.json")])
    parser.update({"ckpt_dir": str(models)})
    assert parser.get_parsed_content("image_channels") == ["t1", "flair"]


def test_a_prediction_written_next_to_a_sequence_is_not_taken_for_it(tmp_path):
    """inference writes `<scan>_seg.nii.gz` next to the scan: `sub-01_T1w_seg.nii.gz` matches the T1 pattern `*T1w*`
    too, and the case failed with '2 files match the t1 pattern'; an unmarked file of that name still does."""
    from dira3d.evaluation.outputs import PredictionNiftiWriter

    src = tmp_path / "export"
    _hospital_case(src, "sub-01", seed=1)
    _hospital_case(src, "sub-02", seed=2)
    scan = nib.load(str(src / "sub-01" / "sub-01_T1w.nii.gz"))
    mask = (np.asarray(scan.dataobj) > 0).astype(np.uint8)
    nib.save(PredictionNiftiWriter.create_backend_obj(mask, affine=scan.affine), str(src / "sub-01" / "sub-01_T1w_seg.nii.gz"))
    nib.save(nib.Nifti1Image(mask, scan.affine), str(src / "sub-02" / "sub-02_T1w_seg.nii.gz"))  # not dira3d's
    results = {r.case_id: r for r in generic.prepare(src, tmp_path / "prepared", sequences=SEQUENCES, label_pattern="*mask*",
                                                     keep_going=True, progress=False)}
    assert results["sub-01"].status == "written", results["sub-01"].reason
    assert results["sub-02"].status == "failed" and "2 files match the t1 pattern" in results["sub-02"].reason
    datalist = json.loads((tmp_path / "prepared" / "pretrain_datalist.json").read_text())
    entry = next(e for split in ("training", "validation") for e in datalist[split] if e["case_id"] == "sub-01")
    t1 = np.asarray(nib.load(tmp_path / "prepared" / entry["image"]).dataobj)[..., 0]
    assert len(np.unique(t1)) > 10  # the T1 channel is the scan, not the 0/1 prediction
