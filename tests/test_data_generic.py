"""Generic folder conversion: mixed formats, masks, bad files, and the real NRRD scans."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.cli import main as cli_main
from dira3d.data import generic
from dira3d.data.io import read_image, xyz_to_image


def _mr(seed: int, shape=(24, 20, 10)) -> sitk.Image:
    array = np.zeros(shape, np.float32)
    array[4:20, 4:16, 2:8] = np.random.default_rng(seed).uniform(100, 900, size=(16, 12, 6))
    image = xyz_to_image(array)
    image.SetSpacing((1.0, 1.2, 3.0))
    image.SetOrigin((10.0, -5.0, 40.0))
    image.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))  # a sagittal-ish permutation
    return image


def test_generic_mixed_formats_masks_and_bad_files(tmp_path):
    src = tmp_path / "scans"
    (src / "site_b").mkdir(parents=True)
    sitk.WriteImage(_mr(0), str(src / "a.nii.gz"))
    sitk.WriteImage(_mr(1), str(src / "site_b" / "b.nrrd"))
    sitk.WriteImage(_mr(2), str(src / "c.mhd"))
    mask = sitk.Cast(_mr(0) > 500, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(src / "a_label.nii.gz"))
    sitk.WriteImage(sitk.Image(10, 12, sitk.sitkFloat32), str(src / "flat.nrrd"))  # 2D
    misaligned = sitk.Image(mask)
    misaligned.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(_mr(3), str(src / "d.nrrd"))
    sitk.WriteImage(misaligned, str(src / "d_label.nrrd"))
    (src / "notes.txt").write_text("not a scan")
    dst = tmp_path / "out"
    results = generic.prepare(src, dst, modality="mr", label_suffix="_label", val_fraction=0.25, keep_going=True,
                              progress=False)
    status = {r.case_id: r for r in results}
    assert set(status) == {"a", "site_b_b", "c", "flat", "d"}
    assert status["flat"].status == "failed" and "flat.nrrd" in status["flat"].reason and "2D" in status["flat"].reason
    assert status["d"].status == "failed" and "d_label.nrrd" in status["d"].reason and "d.nrrd" in status["d"].reason
    assert all(status[k].status == "written" for k in ("a", "site_b_b", "c"))

    datalist = json.loads((dst / "pretrain_datalist.json").read_text())
    entries = datalist["training"] + datalist["validation"]
    assert sorted(e["case_id"] for e in entries) == ["a", "c", "site_b_b"] and len(datalist["validation"]) == 1
    for entry in entries:
        img = nib.load(dst / entry["image"])
        data = np.asarray(img.dataobj)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and data.dtype == np.float32
        assert data.min() == 0.0 and data.max() == 1.0
    a = next(e for e in entries if e["case_id"] == "a")
    label = np.asarray(nib.load(dst / a["label"]).dataobj)
    image = np.asarray(nib.load(dst / a["image"]).dataobj)
    assert label.sum() == np.count_nonzero(sitk.GetArrayFromImage(mask))
    assert image[label == 1].min() > image[(label == 0) & (image > 0)].max() - 1e-6  # mask = bright voxels
    # resumable: the good cases are skipped; the bad ones fail again
    again = generic.prepare(src, dst, modality="mr", label_suffix="_label", keep_going=True, progress=False)
    assert sorted(r.status for r in again) == ["failed", "failed", "skipped", "skipped", "skipped"]


def test_generic_cli_errors(tmp_path, capsys):
    assert cli_main(["prepare", "generic", "--src", str(tmp_path / "none"), "--dst", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["prepare", "generic", "--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "o")]) == 2
    assert "no scans found" in capsys.readouterr().err


def _lesion(path: Path) -> tuple[int, np.ndarray, np.ndarray]:
    """(voxel count, world centroid in RAS mm, voxel volume) of a NIfTI mask."""
    img = nib.load(path)
    idx = np.argwhere(np.asarray(img.dataobj) > 0)
    return len(idx), (img.affine @ np.append(idx.mean(axis=0), 1))[:3], abs(np.linalg.det(img.affine[:3, :3]))


@pytest.mark.parametrize("case,modality", [("lung1", "ct"), ("brain1", "mr")])
def test_generic_on_real_scans(real_data, tmp_path, case, modality):
    src = tmp_path / "src"
    src.mkdir()
    for kind in ("image", "label"):  # links, not copies: the shared folder stays untouched
        (src / f"{case}_{kind}.nrrd").symlink_to(real_data / f"{case}_{kind}.nrrd")
    dst = tmp_path / "out"
    code = cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst), "--modality", modality,
                     "--image-suffix", "_image", "--label-suffix", "_label", "--spacing", "1", "1", "2"])
    assert code == 0
    volume = nib.load(dst / "volumes" / f"{case}.nii.gz")
    data = np.asarray(volume.dataobj)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert np.allclose(volume.header.get_zooms(), (1, 1, 2))
    assert data.dtype == np.float32 and data.min() >= 0 and data.max() <= 1 and data.std() > 0.1

    source_mask = read_image(real_data / f"{case}_label.nrrd")
    src_count = int(np.count_nonzero(sitk.GetArrayViewFromImage(source_mask)))
    src_centroid_lps = np.array(source_mask.TransformContinuousIndexToPhysicalPoint(
        tuple(np.argwhere(sitk.GetArrayViewFromImage(source_mask) > 0)[:, ::-1].mean(axis=0).tolist())))
    count, centroid_ras, voxel_mm3 = _lesion(dst / "labels" / f"{case}.nii.gz")
    assert voxel_mm3 == pytest.approx(2.0)
    assert count * voxel_mm3 == pytest.approx(src_count * np.prod(source_mask.GetSpacing()), rel=0.25)
    assert np.allclose(centroid_ras * [-1, -1, 1], src_centroid_lps, atol=2.0)  # same place in the patient
    lesion = data[np.asarray(nib.load(dst / "labels" / f"{case}.nii.gz").dataobj) > 0]
    if modality == "ct":  # a solid nodule in aerated lung: denser than most of the scan
        assert np.median(lesion) > 0.35 and np.median(lesion) > np.median(data)
    else:  # an enhancing lesion: brighter than the brain around it
        assert np.median(lesion) > np.median(data[data > 0])


def test_an_mri_prepared_as_ct_is_warned_about(tmp_path, capsys):
    # an explicit --modality ct on an MRI (0 … 900) windows it to a flat [0.5, 1] volume: a warning names it
    # (without --modality the folder is refused: tests/test_data_generic_modality.py)
    src = tmp_path / "scans"
    src.mkdir()
    sitk.WriteImage(_mr(0), str(src / "brain.nii.gz"))
    ct = xyz_to_image(np.linspace(-1000, 1000, 24 * 20 * 10, dtype=np.float32).reshape(24, 20, 10))
    sitk.WriteImage(ct, str(src / "chest.nii.gz"))
    results = {r.case_id: r for r in generic.prepare(src, tmp_path / "out", modality="ct", progress=False)}
    assert all(r.status == "written" for r in results.values())
    assert len(results["brain"].warnings) == 1 and "brain.nii.gz" in results["brain"].warnings[0]
    assert "--modality mr" in results["brain"].warnings[0] and not results["chest"].warnings
    results = {r.case_id: r for r in generic.prepare(src, tmp_path / "mr", modality="mr", progress=False)}
    assert not results["brain"].warnings  # and the mirror: a CT prepared as MR is named
    assert len(results["chest"].warnings) == 1 and "chest.nii.gz" in results["chest"].warnings[0]
    assert "looks like a CT" in results["chest"].warnings[0] and "--modality ct" in results["chest"].warnings[0]


def _labelled_scans(src: Path, count: int) -> None:
    src.mkdir(parents=True)
    for i in range(count):
        image = _mr(10 + i)
        sitk.WriteImage(image, str(src / f"s{i}_image.nrrd"))
        sitk.WriteImage(sitk.Cast(image > 500, sitk.sitkUInt8), str(src / f"s{i}_label.nrrd"))


def test_test_fraction_makes_a_test_list_own_labelled_scans_fine_tune_on(tmp_path, capsys, monkeypatch):
    from dira3d.evaluation.finetune import main as finetune_main
    from dira3d.networks import UNet
    from dira3d.utils import atomic_save

    src = tmp_path / "scans"
    _labelled_scans(src, 5)
    common = dict(modality="mr", image_suffix="_image", label_suffix="_label", val_fraction=0.2, seed=3, progress=False)
    generic.prepare(src, tmp_path / "val_only", **common)
    generic.prepare(src, tmp_path / "out", test_fraction=0.2, **common)
    before = json.loads((tmp_path / "val_only" / "pretrain_datalist.json").read_text())
    datalist = json.loads((tmp_path / "out" / "pretrain_datalist.json").read_text())
    assert "test" not in before and datalist["meta"]["test_fraction"] == 0.2
    ids = {part: [e["case_id"] for e in datalist[part]] for part in ("training", "validation", "test")}
    assert [len(v) for v in ids.values()] == [3, 1, 1] and len(set(sum(ids.values(), []))) == 5
    assert ids["validation"] == [e["case_id"] for e in before["validation"]]  # the same seeded order, then the test
    assert all("label" in e for e in datalist["test"])

    # the user's journey: fine-tune a segmentation bundle on those labelled scans, scored on their test list
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=0.125)
    atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                 "meta": {"spatial_dims": 3, "in_channels": 1, "width": 0.125}}, tmp_path / "dira.pt")
    monkeypatch.chdir(tmp_path)  # paths as a user types them, relative to where they stand
    code = finetune_main(["--bundle", "lits_liver_seg", "--datalist", "out/pretrain_datalist.json", "--pretrained", "dira.pt",
                          "--output-dir", "ft", "--tiny", "--set", "max_epochs=1"])
    assert code == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert 0.0 <= written["metrics"]["dice"] <= 1.0
    # metrics.json names its inputs absolutely, wherever it is read from later
    assert written["settings"]["pretrained"] == str(tmp_path / "dira.pt")
    assert written["settings"]["datalist"] == str(tmp_path / "out" / "pretrain_datalist.json")
    # the segmentation output head's policy, default included: runs before and after its default changed differ
    assert written["settings"]["pretrained_head"] == "initialise"
    # how the volumes were scaled goes beside the model, and inference.json scales a raw scan the same way
    # (it windowed every scan to HU [-1000, 1000] unless the user remembered --modality mr)
    assert json.loads((tmp_path / "ft" / "models" / "preprocessing.json").read_text()) == {
        "modality": "mr", "percentiles": [0.5, 99.5], "spacing": None}
    from monai.bundle import ConfigParser

    from dira3d.evaluation.finetune import bundle_path

    parser = ConfigParser()
    parser.read_config([str(bundle_path("lits_liver_seg") / "configs" / "inference.json")])
    parser.update({"ckpt_dir": str(tmp_path / "ft" / "models")})
    assert (parser.get_parsed_content("modality"), parser.get_parsed_content("percentiles")) == ("mr", [0.5, 99.5])
    parser["modality"] = "ct"  # the command line wins
    assert parser.get_parsed_content("modality") == "ct"


def test_a_test_fraction_that_rounds_to_no_patient_is_named(tmp_path, capsys):
    """--test-fraction 0.2 of 2 scans rounds to no test patient: the datalist had no 'test' key and only the
    empty 'validation' list was warned about, so the user learnt of it from `dira3d finetune`, which said to
    add a 'test' list without naming --test-fraction."""
    from dira3d.evaluation.datalists import load_split

    src = tmp_path / "scans"
    _labelled_scans(src, 2)
    generic.prepare(src, tmp_path / "out", modality="mr", image_suffix="_image", label_suffix="_label",
                    val_fraction=0.2, test_fraction=0.2, progress=False)
    datalist = tmp_path / "out" / "pretrain_datalist.json"
    assert json.loads(datalist.read_text())["test"] == []
    assert "'validation', 'test' lists are empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"its 'test' list has no entries \(`dira3d prepare generic ... --test-fraction`"):
        load_split(datalist, "test")


def test_split_fractions_that_leave_no_training_case_stop_before_any_case(tmp_path):
    src = tmp_path / "scans"
    _labelled_scans(src, 2)
    with pytest.raises(ValueError, match="leaving none to train on"):
        generic.prepare(src, tmp_path / "out", modality="mr", image_suffix="_image", label_suffix="_label",
                        val_fraction=0.5, test_fraction=0.4, progress=False)
    assert not (tmp_path / "out" / "volumes").exists()
    with pytest.raises(ValueError, match="--test-fraction must be in"):
        generic.prepare(src, tmp_path / "out", test_fraction=1.0, progress=False)


def _patients_with_two_scans(src: Path, count: int, folders: bool = True) -> None:
    """``count`` patients with two scans each: ``patientNNN/ct_2019.nii.gz`` (or ``patientNNN_a.nii.gz``)."""
    for i in range(count):
        for j, when in enumerate(("2019", "2021")):
            path = src / f"patient{i:03d}" / f"ct_{when}.nii.gz" if folders else src / f"patient{i:03d}_{'ab'[j]}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(_mr(2 * i + j, shape=(24, 20, 8)), str(path))


def _parts_of_patients(datalist: dict) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {}
    for part in ("training", "validation", "test"):
        for entry in datalist.get(part, []):
            parts.setdefault(entry["patient_id"], set()).add(part)
    return parts


def test_patient_from_parent_keeps_a_patients_scans_in_one_part(tmp_path):
    src = tmp_path / "scans"
    _patients_with_two_scans(src, 6)
    generic.prepare(src, tmp_path / "out", modality="mr", val_fraction=0.2, test_fraction=0.2, seed=1,
                    patient_from="parent", progress=False)
    datalist = json.loads((tmp_path / "out" / "pretrain_datalist.json").read_text())
    parts = _parts_of_patients(datalist)
    assert sorted(parts) == [f"patient{i:03d}" for i in range(6)] and all(len(p) == 1 for p in parts.values())
    # the fractions count patients: round(0.2 * 6) = 1 patient each, i.e. both of its scans
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [8, 2, 2]
    entry = next(e for e in datalist["validation"] if e["case_id"].endswith("ct_2019"))
    assert entry["case_id"] == f"{entry['patient_id']}_ct_2019"
    assert datalist["meta"]["patient_from"] == "parent" and datalist["meta"]["patient_regex"] is None


def test_patient_regex_groups_flat_files_and_a_path_it_does_not_match_fails_its_case(tmp_path, capsys):
    src = tmp_path / "scans"
    _patients_with_two_scans(src, 5, folders=False)
    sitk.WriteImage(_mr(50, shape=(24, 20, 8)), str(src / "phantom.nii.gz"))
    args = ["prepare", "generic", "--src", str(src), "--modality", "mr", "--val-fraction", "0.2", "--test-fraction", "0.2",
            "--patient-regex", r"^(patient\d+)_"]
    assert cli_main([*args, "--dst", str(tmp_path / "strict")]) == 1  # the unmatched scan stops the batch
    err = capsys.readouterr().err
    assert "FAILED phantom" in err and "phantom.nii.gz" in err and "does not match" in err
    assert not (tmp_path / "strict" / "pretrain_datalist.json").exists()
    assert cli_main([*args, "--dst", str(tmp_path / "out"), "--keep-going"]) == 0
    datalist = json.loads((tmp_path / "out" / "pretrain_datalist.json").read_text())
    parts = _parts_of_patients(datalist)
    assert sorted(parts) == [f"patient{i:03d}" for i in range(5)] and all(len(p) == 1 for p in parts.values())
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [6, 2, 2]
    assert datalist["meta"]["patient_from"] == "regex" and datalist["meta"]["patient_regex"] == r"^(patient\d+)_"


@pytest.mark.parametrize("options,message", [
    (["--patient-regex", "^patient"], "needs exactly one"),
    (["--patient-regex", "^(patient"], "not a valid regular expression"),
    (["--patient-from", "regex"], "needs --patient-regex"),
    (["--patient-from", "parent", "--patient-regex", "^(p)"], "--patient-from is 'parent'"),
])
def test_a_bad_patient_grouping_is_refused_before_any_case(tmp_path, capsys, options, message):
    src = tmp_path / "scans"
    _patients_with_two_scans(src, 2)
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(tmp_path / "out"), *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_patient_from_parent_fails_a_scan_directly_in_src(tmp_path):
    src = tmp_path / "scans"
    _patients_with_two_scans(src, 2)
    sitk.WriteImage(_mr(9, shape=(24, 20, 8)), str(src / "loose.nii.gz"))
    results = {r.case_id: r for r in generic.prepare(src, tmp_path / "out", modality="mr", patient_from="parent",
                                                     keep_going=True, progress=False)}
    assert results["loose"].status == "failed" and "directly in --src" in results["loose"].reason
    assert sum(r.status == "written" for r in results.values()) == 4


def test_the_default_grouping_keeps_the_split_by_scan_and_records_the_patient(tmp_path):
    src = tmp_path / "scans"
    _patients_with_two_scans(src, 5)
    generic.prepare(src, tmp_path / "out", modality="mr", val_fraction=0.2, test_fraction=0.3, seed=4, progress=False)
    datalist = json.loads((tmp_path / "out" / "pretrain_datalist.json").read_text())
    ids = sorted(f"patient{i:03d}_ct_{y}" for i in range(5) for y in ("2019", "2021"))
    order = np.random.default_rng(4).permutation(len(ids))  # the split by case dira3d always drew
    assert sorted(e["case_id"] for e in datalist["validation"]) == sorted(ids[i] for i in order[:2])
    assert sorted(e["case_id"] for e in datalist["test"]) == sorted(ids[i] for i in order[2:5])
    assert all(e["patient_id"] == e["case_id"] for part in ("training", "validation", "test") for e in datalist[part])
    assert datalist["meta"]["patient_from"] == "case"


def test_a_rerun_with_another_patient_grouping_is_refused(tmp_path):
    src, dst = tmp_path / "scans", tmp_path / "out"
    _patients_with_two_scans(src, 3)
    common = dict(modality="mr", val_fraction=0.3, progress=False)
    generic.prepare(src, dst, **common)
    datalist = dst / "pretrain_datalist.json"
    content = json.loads(datalist.read_text())
    for key in ("patient_from", "patient_regex"):  # as written before the option existed: split by case
        del content["meta"][key]
    datalist.write_text(json.dumps(content))
    assert all(r.status == "skipped" for r in generic.prepare(src, dst, **common))  # the default: accepted
    with pytest.raises(generic.DataError, match=r"--patient-from case \(now --patient-from parent\)"):
        generic.prepare(src, dst, patient_from="parent", **common)
    with pytest.raises(generic.DataError, match="move this datalist away"):
        generic.prepare(src, dst, patient_from="regex", patient_regex=r"^(patient\d+)/", dry_run=True, **common)
    datalist.rename(tmp_path / "old_datalist.json")  # re-splits the volumes already prepared
    assert all(r.status == "skipped" for r in generic.prepare(src, dst, patient_from="parent", **common))
    assert all(len(p) == 1 for p in _parts_of_patients(json.loads(datalist.read_text())).values())
    assert all(r.status == "written" for r in generic.prepare(src, dst, overwrite=True, **common))


@pytest.mark.parametrize("layout", ["dst is src", "src is dst/volumes", "src inside dst/labels"])
def test_a_dst_whose_outputs_land_among_the_scans_is_refused(tmp_path, capsys, layout):
    # --dst = --src: a rerun read volumes/ as new scans (twice the cases, normalised twice); --src D/volumes
    # --dst D: every output had its input's name, so the first run skipped them all and listed the raw
    # scans as prepared volumes, and --overwrite replaced the scans
    src = {"dst is src": tmp_path / "d", "src is dst/volumes": tmp_path / "d" / "volumes",
           "src inside dst/labels": tmp_path / "d" / "labels" / "raw"}[layout]
    src.mkdir(parents=True)
    sitk.WriteImage(_mr(0), str(src / "a.nii.gz"))
    before = (src / "a.nii.gz").read_bytes()
    for extra in ([], ["--overwrite"]):
        assert cli_main(["prepare", "generic", "--modality", "mr", "--src", str(src), "--dst", str(tmp_path / "d"), *extra]) == 2
        err = capsys.readouterr().err
        assert "--dst" in err and "--src" in err and "a folder of its own" in err, err
    assert (src / "a.nii.gz").read_bytes() == before
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        [(src / "a.nii.gz").relative_to(tmp_path).as_posix()]
    # a --dst inside --src stays fine (left out of the search)
    assert cli_main(["prepare", "generic", "--modality", "mr", "--src", str(src), "--dst", str(src / "prepared")]) == 0


def test_the_advice_for_an_empty_list_names_a_fraction_that_fills_it(tmp_path, capsys):
    """docs/data.md's `--val-fraction 0.1` on a few scans rounds to no validation patient, and the warning said
    "rerun with a larger fraction (e.g. --val-fraction 0.1 ...)": the fraction just given, empty again."""
    src = tmp_path / "scans"
    _labelled_scans(src, 3)
    common = dict(modality="mr", image_suffix="_image", label_suffix="_label", progress=False)
    generic.prepare(src, tmp_path / "a", val_fraction=0.1, **common)
    assert "rerun with a larger fraction (e.g. --val-fraction 0.34;" in capsys.readouterr().err
    generic.prepare(src, tmp_path / "a", val_fraction=0.34, **common)  # the advice taken: one validation patient
    datalist = json.loads((tmp_path / "a" / "pretrain_datalist.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation")] == [2, 1]
    # no test fraction could fill 'test' and leave a patient to train on: say so, not "--test-fraction 0.2"
    generic.prepare(src, tmp_path / "c", val_fraction=0.5, test_fraction=0.1, **common)
    err = capsys.readouterr().err
    assert "the 3 patient(s) leave none for the 'test' list beside training: add scans" in err
    assert "--test-fraction 0.2" not in err


def test_a_labelled_datalists_empty_validation_list_is_explained_for_fine_tuning(tmp_path, capsys):
    """The README's labelled `prepare generic ... --test-fraction 0.2` (for fine-tuning, which holds out its own
    patients) warned that 'validation' was empty and to "rerun with a larger fraction", as for a pretraining datalist.
    It now says fine-tuning does not need the list, what pretraining on these volumes does without it (last.pt, not
    best.pt), and scopes the rerun to that; a 'test' list rounded to none, which fine-tuning scores on, comes first."""
    src = tmp_path / "scans"
    _labelled_scans(src, 5)
    common = dict(modality="mr", image_suffix="_image", label_suffix="_label", progress=False)
    generic.prepare(src, tmp_path / "out", val_fraction=0.1, test_fraction=0.2, **common)
    err = capsys.readouterr().err
    assert "WARNING pretrain_datalist.json: its 'validation' list is empty" in err
    assert "fine-tuning does not need the 'validation' list" in err
    assert "--val-fraction 0.1 of the 5 patient(s) rounds to none" in err and "its result is last.pt, not best.pt" in err
    assert "for a 'validation' list to pretrain with: rerun with a larger fraction (e.g. --val-fraction 0.2;" in err
    assert err.count("rerun") == 1
    generic.prepare(src, tmp_path / "both", val_fraction=0.1, test_fraction=0.1, **common)
    err = capsys.readouterr().err
    assert "--test-fraction 0.1 of the 5 patient(s) rounds to none" in err
    test_advice = err.index("rerun with a larger fraction (e.g. --test-fraction 0.2;")
    assert test_advice < err.index("to pretrain on these volumes too") < err.index("(e.g. --val-fraction 0.2;")
    # the README's command (--val-fraction 0, the default): no 'validation' list was asked for, so a note, no rerun
    generic.prepare(src, tmp_path / "asked", test_fraction=0.2, **common)
    err = capsys.readouterr().err
    assert "WARNING" not in err and "rerun" not in err, err
    assert "note pretrain_datalist.json: its 'validation' list is empty, as asked: --val-fraction 0 (the default); " \
        "to pretrain on these volumes too" in err and "its result is last.pt, not best.pt" in err
    # without masks (for pretraining) the warning stays what it was: no word of fine-tuning
    scans = tmp_path / "unlabelled"
    scans.mkdir()
    for i in range(3):
        sitk.WriteImage(_mr(20 + i), str(scans / f"u{i}.nrrd"))
    generic.prepare(scans, tmp_path / "pre", modality="mr", val_fraction=0.1, progress=False)
    err = capsys.readouterr().err
    assert "'validation' list is empty" in err and "fine-tuning" not in err
    assert "validate on the 'validation' list" in err and "; rerun with a larger fraction (e.g. --val-fraction 0.34;" in err


def test_the_output_of_prepare_given_as_src_is_refused_naming_its_datalist(tmp_path, capsys):
    """`--src prepared/mine` (or its volumes/) prepared the prepared volumes again: in [0, 1], they have no air, so
    --modality ct flattened them with the HU window (a warning per volume), and without --modality the error said
    to pass --modality mr or ct. The datalist is what the next step takes."""
    src = tmp_path / "scans"
    _labelled_scans(src, 2)
    dst = tmp_path / "prepared"
    generic.prepare(src, dst, modality="mr", image_suffix="_image", label_suffix="_label", progress=False)
    capsys.readouterr()
    for wrong in (dst, dst / "volumes"):
        assert cli_main(["prepare", "generic", "--src", str(wrong), "--dst", str(tmp_path / "again"), "--modality",
                         "ct"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{wrong}: is the output of `dira3d prepare generic`" in err
        assert f"pass {dst / 'pretrain_datalist.json'} to the next step" in err and str(src.resolve()) in err
    assert not (tmp_path / "again").exists()
    generic.prepare(src, dst, modality="mr", image_suffix="_image", label_suffix="_label", progress=False)  # rerun: fine


def test_hidden_folders_are_not_searched_for_scans(tmp_path):
    """A file system's .snapshot copies (or .Trash) were found as more scans: hidden files were skipped, hidden folders not."""
    src = tmp_path / "scans"
    (src / ".snapshot" / "hourly").mkdir(parents=True)
    (src / "site").mkdir()
    sitk.WriteImage(_mr(0), str(src / "site" / "a.nii.gz"))
    sitk.WriteImage(_mr(0), str(src / ".snapshot" / "hourly" / "a.nii.gz"))
    assert [case_id for case_id, _, _ in generic.discover(src)] == ["site_a"]


def test_an_empty_validation_list_is_explained_with_generics_own_options(tmp_path, capsys):
    """A `dira3d prepare generic` whose --val-fraction rounded to no patient (at the default 0, see
    test_a_validation_list_asked_for_by_a_zero_fraction_is_a_note_not_a_warning) warned that 'validation' was empty
    and said to check --train-subsets / --val-subsets / --test-subsets, options generic does not have, without
    saying that the next step (`dira3d visual-words`, default --val-neighbours 30) needs that list."""
    src = tmp_path / "scans"
    _labelled_scans(src, 3)
    generic.prepare(src, tmp_path / "out", modality="mr", image_suffix="_image", label_suffix="_label",
                    val_fraction=0.1, progress=False)
    err = capsys.readouterr().err
    assert "'validation' list is empty" in err and "--val-fraction 0.1 of the 3 patient(s) rounds to none" in err
    assert "dira3d visual-words" in err and "--train-subsets" not in err
    generic.prepare(src, tmp_path / "out2", modality="mr", image_suffix="_image", label_suffix="_label",
                    val_fraction=0.5, test_fraction=0.1, progress=False)
    err = capsys.readouterr().err
    assert "'test' list is empty" in err and "--test-fraction 0.1 of the 3 patient(s) rounds to none" in err
    assert "--val-fraction" not in err and "--train-subsets" not in err


def test_a_validation_list_asked_for_by_a_zero_fraction_is_a_note_not_a_warning(tmp_path, capsys):
    """`--val-fraction 0` (generic's default) asks for no 'validation' list, yet the empty list was a WARNING that "no
    prepared case went there" with advice to rerun with a larger fraction. It is now one note line naming the setting
    and what reads the list; a fraction that rounds to no patient still warns (the tests above)."""
    scans = tmp_path / "unlabelled"
    scans.mkdir()
    for i in range(3):
        sitk.WriteImage(_mr(20 + i), str(scans / f"u{i}.nrrd"))
    for argv in ([], ["--val-fraction", "0"]):
        assert cli_main(["prepare", "generic", "--modality", "mr", "--src", str(scans), "--dst",
                         str(tmp_path / f"out{len(argv)}"), *argv]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "'validation'" in line]
        assert len(lines) == 1 and lines[0].startswith("note pretrain_datalist.json: its 'validation' list is empty, "
                                                       "as asked: --val-fraction 0 (the default); "), lines
        assert "validate on the 'validation' list" in lines[0] and "rerun" not in lines[0], lines

