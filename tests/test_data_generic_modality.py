"""``dira3d prepare generic`` without ``--modality``: it used to default to ``ct``, so a folder of MRIs
prepared without ``--modality mr`` was windowed to HU [-1000, 1000] (0 … 900 became 0.5 … 0.95, the
brightest tissue clipped), with one warning per case and exit 0. Now the modality comes from an earlier
run into ``--dst`` or from the scans (air below -500 HU: CT), and scans without air stop the run before
anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.cli import main as cli_main
from dira3d.data import generic
from dira3d.data.io import xyz_to_image

SHAPE = (16, 14, 6)


def _mr(path: Path, seed: int) -> Path:
    array = np.zeros(SHAPE, np.float32)
    array[3:13, 3:11, 1:5] = np.random.default_rng(seed).uniform(100, 2900, size=(10, 8, 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(xyz_to_image(array), str(path))
    return path


def _ct(path: Path, seed: int) -> Path:
    array = np.full(SHAPE, -1000, np.int16)  # air around a body of soft tissue
    array[3:13, 3:11, 1:5] = np.random.default_rng(seed).integers(-100, 200, size=(10, 8, 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(xyz_to_image(array), str(path))
    return path


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_mri_without_modality_is_refused_before_anything_is_written(tmp_path, capsys):
    src, dst = tmp_path / "brains", tmp_path / "out"
    for i in range(3):
        _mr(src / f"brain{i}.nii.gz", i)
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "brain0.nii.gz" in err and "no voxel below -500 HU" in err and "nothing was written" in err, err
    assert "for an MRI pass --modality mr" in err and "pass --modality ct" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not dst.exists()  # no volume, datalist, report or lock
    with pytest.raises(generic.DataError, match=r"brain0\.nii\.gz.*--modality mr"):
        generic.prepare(src, dst, dry_run=True, progress=False)
    assert not dst.exists()
    # the user's fix: --modality mr, percentiles (not the HU window: 0.5 .. 1 with the top clipped)
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst), "--modality", "mr"]) == 0
    data = np.asarray(nib.load(dst / "volumes" / "brain0.nii.gz").dataobj)
    assert data.min() == 0.0 and data.max() == 1.0 and np.median(data[data > 0]) < 0.75
    assert json.loads((dst / "pretrain_datalist.json").read_text())["meta"]["modality"] == "mr"


def test_ct_without_modality_is_prepared_as_ct_and_says_so(tmp_path, capsys):
    src, dst = tmp_path / "chests", tmp_path / "out"
    for i in range(3):
        _ct(src / f"chest{i}.nii.gz", i)
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("--modality not given: prepared as ct") == 1, captured.err
    assert "no voxel below" not in captured.err and "3 written" in captured.out
    meta = json.loads((dst / "pretrain_datalist.json").read_text())["meta"]
    assert meta["modality"] == "ct" and meta["window"] == [-1000.0, 1000.0] and meta["percentiles"] is None
    data = np.asarray(nib.load(dst / "volumes" / "chest0.nii.gz").dataobj)
    assert data.min() == 0.0 and 0.45 <= data.max() <= 0.6  # the HU window: air 0, soft tissue about 0.5


def test_the_ct_example_is_named_relative_to_src(tmp_path, capsys):
    # a DICOM series folder is often named "ct" or "1": its name alone said "e.g. ct"
    src, dst = tmp_path / "chests", tmp_path / "out"
    for i in range(2):
        _ct(src / f"patient{i}" / "ct" / "scan.nii.gz", i)
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst), "--patient-from", "parent"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if "--modality not given" in x)
    assert "e.g. patient0/ct/scan.nii.gz" in line or "e.g. patient1/ct/scan.nii.gz" in line, line


def test_a_mixed_folder_without_modality_is_refused_naming_both_kinds(tmp_path, capsys):
    src, dst = tmp_path / "scans", tmp_path / "out"
    for i in range(2):
        _ct(src / f"chest{i}.nii.gz", i)
        _mr(src / f"knee{i}.nrrd", i)
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "mixed" in err and "chest0.nii.gz" in err and "knee1.nrrd" in err and "separate --dst" in err, err
    assert not dst.exists()


def test_an_mri_the_sample_missed_fails_its_case_and_is_not_written(tmp_path, capsys):
    """The scans are sampled (5, spread over the folder): an MRI among many CTs is found when its turn comes."""
    src, dst = tmp_path / "scans", tmp_path / "out"
    for i in range(6):  # sorted a .. f; the sample reads a, b, c, e, f
        (_mr if i == 3 else _ct)(src / f"{'abcdef'[i]}.nii.gz", i)
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst / "strict")]) == 1
    assert not (dst / "strict" / "volumes" / "d.nii.gz").exists()
    assert not (dst / "strict" / "pretrain_datalist.json").exists()
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst / "all"), "--keep-going"]) == 0
    err = capsys.readouterr().err
    assert "FAILED d:" in err and "d.nii.gz" in err and "--modality mr" in err and "--modality ct" in err, err
    assert _files(dst / "all" / "volumes") == [f"{c}.nii.gz" for c in "abcef"]
    datalist = json.loads((dst / "all" / "pretrain_datalist.json").read_text())
    assert sorted(e["case_id"] for e in datalist["training"]) == list("abcef") and datalist["meta"]["modality"] == "ct"


def test_explicit_modality_ct_on_mri_still_prepares_with_warnings(tmp_path, capsys):
    src, dst = tmp_path / "crops", tmp_path / "out"
    for i in range(2):
        _mr(src / f"crop{i}.nii.gz", i)  # e.g. CT crops without air, or a CT stored without its intercept
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst), "--modality", "ct"]) == 0
    captured = capsys.readouterr()
    assert "2 written" in captured.out and captured.err.count("no voxel below -500 HU") == 2, captured.err
    assert "--modality not given" not in captured.err
    assert json.loads((dst / "pretrain_datalist.json").read_text())["meta"]["modality"] == "ct"


@pytest.mark.parametrize("first", ["mr", "ct"])
def test_a_rerun_without_modality_takes_the_recorded_one_and_keeps_the_split(tmp_path, capsys, first):
    src, dst = tmp_path / "scans", tmp_path / "out"
    for i in range(4):
        (_mr if first == "mr" else _ct)(src / f"s{i}.nii.gz", i)
    common = ["prepare", "generic", "--src", str(src), "--dst", str(dst), "--val-fraction", "0.25"]
    assert cli_main([*common, "--modality", first]) == 0
    datalist = dst / "pretrain_datalist.json"
    before = json.loads(datalist.read_text())
    capsys.readouterr()
    assert cli_main(common) == 0  # no --modality: the recorded one, not a refusal
    captured = capsys.readouterr()
    assert "4 skipped" in captured.out and f"prepared as {first} (as recorded in {datalist}" in captured.err
    after = json.loads(datalist.read_text())
    assert after["meta"]["modality"] == first and after["validation"] == before["validation"]
    # a new scan of the other kind fails its case instead of being scaled as the recorded modality: an MRI in a
    # folder recorded as ct would be windowed flat, a CT in one recorded as mr scaled by its own percentiles
    (_mr if first == "ct" else _ct)(src / "s9.nii.gz", 9)
    assert cli_main([*common, "--keep-going"]) == 0
    err = capsys.readouterr().err
    assert "FAILED s9:" in err and not (dst / "volumes" / "s9.nii.gz").exists(), err
    assert ("no voxel below -500 HU" if first == "ct" else "looks like a CT") in err


def test_explicit_modality_mr_on_ct_still_prepares_with_warnings(tmp_path, capsys):
    src, dst = tmp_path / "scans", tmp_path / "out"
    for i in range(2):
        _ct(src / f"ct{i}.nii.gz", i)
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst), "--modality", "mr"]) == 0
    captured = capsys.readouterr()
    assert "2 written" in captured.out and captured.err.count("looks like a CT") == 2, captured.err
    assert json.loads((dst / "pretrain_datalist.json").read_text())["meta"]["modality"] == "mr"


@pytest.mark.parametrize("lowest", [-500, -500.0, -500.25, -499.75, -501])
def test_check_hu_and_check_mr_are_complements_at_the_air_boundary(lowest):
    """A scan is CT when some voxel lies strictly below AIR_HU (-500): one whose lowest voxel is exactly -500 used to
    pass both checks (check_hu: "lowest > -500 is no air", check_mr: "lowest >= -500 is no air"); now every scan
    fails exactly one of them, and a lowest voxel of -500 is no air (MR)."""
    from dira3d.data.io import DataError
    from dira3d.data.modality import AIR_HU, check_hu, check_mr

    dtype = np.int16 if isinstance(lowest, int) else np.float32
    array = np.full(SHAPE, 300, dtype)
    array[0, 0, 0] = lowest
    image = xyz_to_image(array)
    refused = []
    for name, check in (("ct", check_hu), ("mr", check_mr)):
        try:
            check(image, "scan.nii.gz", chosen_by="taken from the scans")
        except DataError:
            refused.append(name)
    assert refused == (["mr"] if lowest < AIR_HU else ["ct"]), refused
    if lowest == AIR_HU:  # the message states the rule it applied
        with pytest.raises(DataError, match=r"no voxel below -500 HU \(lowest -500\)"):
            check_hu(image, "scan.nii.gz", chosen_by="taken from the scans")


def test_the_inference_ct_warning_uses_the_same_air_boundary():
    """The inference bundles' NormalizeScand (modality ct) warns about a scan without air by the same strict rule as
    check_hu: a lowest voxel of exactly -500 is no air (warned), -500.25 is air (silent)."""
    import warnings

    import torch

    from dira3d.evaluation.transforms import NormalizeScand

    for lowest, warned in ((-500.0, True), (-500.25, False)):
        array = torch.full((1, 8, 8, 4), 300.0)
        array[0, 0, 0, 0] = lowest
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            NormalizeScand(["image"], modality="ct")({"image": array})
        assert any("no voxel below -500 HU" in str(w.message) for w in caught) == warned, (lowest, caught)
        # the advice fits a CT model too: it said "for an MRI set modality to mr, as the model's training volumes were
        # prepared" to a model fine-tuned on CT, whose preprocessing.json had chosen ct
        assert all("if the model was fine-tuned on MRI" in str(w.message) and "fine-tuned on CT" in str(w.message)
                   for w in caught if "no voxel below" in str(w.message)), caught


def _float_ct(seed: int) -> np.ndarray:
    """A CT stored as float32 (as some converters write it): integral HU, hundreds of distinct values."""
    array = np.full(SHAPE, -1000.0, np.float32)
    array[3:13, 3:11, 1:5] = np.random.default_rng(seed).integers(-100, 400, size=(10, 8, 4))
    return array


def test_a_mask_saved_as_float_is_refused_and_float_scans_are_not():
    """check_not_a_mask returned early for any float image: a 0.0 / 1.0 mask saved as float32 (nibabel scripts, some
    tools) left among the scans was normalised into a flat volume without an error."""
    from dira3d.data.io import DataError
    from dira3d.data.modality import check_not_a_mask

    mask = (_float_ct(0) > 0).astype(np.float32)
    with pytest.raises(DataError, match=r"seg\.nii\.gz: has only 2 distinct values \(0\.0, 1\.0\): it looks like a mask"):
        check_not_a_mask(xyz_to_image(mask), "seg.nii.gz")
    labels = mask * 2 + (_float_ct(1) > 200)  # labels 0..3 as float64
    with pytest.raises(DataError, match=r"has only 4 distinct values \(0\.0, 1\.0, 2\.0, 3\.0\)"):
        check_not_a_mask(xyz_to_image(labels.astype(np.float64)), "labels.nii.gz")
    mri = np.zeros(SHAPE, np.float32)
    mri[3:13, 3:11, 1:5] = np.random.default_rng(2).uniform(100, 2900, size=(10, 8, 4))
    scans = {"float CT, integral HU": _float_ct(3), "MRI, fractional values": mri,
             "few fractional values": mask * 0.5 + (_float_ct(4) > 0) * 0.25,  # 0, 0.25, 0.5, 0.75
             "thresholded CT in HU": np.where(_float_ct(5) > 0, 0.0, -1000.0)}  # negative: no label map
    for what, array in scans.items():
        check_not_a_mask(xyz_to_image(array), f"{what}.nii.gz")  # no error


def test_a_float_mask_among_the_scans_fails_its_case_and_does_not_decide_the_modality(tmp_path, capsys):
    """Read as a scan, the float mask (no voxel below -500) made the modality probe call the folder mixed, so nothing
    was written; now the probe passes over it, the CTs are written and the mask's case fails naming it."""
    src, dst = tmp_path / "chests", tmp_path / "out"
    for i in range(2):
        _ct(src / f"chest{i}.nii.gz", i)
    nib.save(nib.Nifti1Image((_float_ct(0) > 0).astype(np.float32), np.eye(4)), str(src / "chest0_seg.nii.gz"))
    assert nib.load(src / "chest0_seg.nii.gz").get_data_dtype() == np.float32
    assert cli_main(["prepare", "generic", "--src", str(src), "--dst", str(dst), "--keep-going"]) == 0
    err = capsys.readouterr().err
    assert "mixed" not in err, err
    assert "chest0_seg.nii.gz" in err and "2 distinct values (0.0, 1.0): it looks like a mask" in err, err
    assert _files(dst / "volumes") == ["chest0.nii.gz", "chest1.nii.gz"]
    assert json.loads((dst / "pretrain_datalist.json").read_text())["meta"]["modality"] == "ct"


def test_the_mask_check_copies_a_float_volume_at_most_once():
    """Judging float images too must stay cheap on a 512^3 CT: a float scan is settled by a coarse look (every 4th
    voxel), a float mask costs one copy (np.unique's sorted copy, plus its flags)."""
    import tracemalloc

    from dira3d.data.io import DataError
    from dira3d.data.modality import check_not_a_mask

    shape = (64, 128, 128)  # z, y, x: 4 MiB of float32
    ct = np.full(shape, -1000.0, np.float32)
    ct[8:56, 16:112, 16:112] = np.random.default_rng(0).integers(-100, 400, size=(48, 96, 96))
    images = {"ct": sitk.GetImageFromArray(ct), "mask": sitk.GetImageFromArray((ct > 0).astype(np.float32))}
    del ct
    np.unique(np.arange(4.0)[::2])  # numpy's one-time set-up of unique is not the volume's copies
    peaks = {}
    for name, image in images.items():
        tracemalloc.start()
        try:
            check_not_a_mask(image, f"{name}.nii.gz")
        except DataError:
            assert name == "mask"
        else:
            assert name == "ct"
        peaks[name] = tracemalloc.get_traced_memory()[1] / (np.prod(shape) * 4)
        tracemalloc.stop()
    assert peaks["ct"] < 0.1 and peaks["mask"] < 1.75, peaks
