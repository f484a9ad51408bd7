"""BraTS 2018 preparation on tiny patients in the official HGG/ LGG/ layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dira3d.data import brats

SHAPE = (12, 10, 8)
ORDER = ("t1", "t1ce", "t2", "flair")


def expected_normalised(volume: np.ndarray) -> np.ndarray:
    """The documented rule, computed independently: 0.5 / 99.5 percentiles of the brain voxels."""
    lo, hi = np.percentile(volume[volume != 0], [0.5, 99.5])
    return np.where(volume != 0, np.clip((volume - lo) / (hi - lo), 0, 1), 0.0)


def make_patient(root: Path, grade: str, pid: str, rng: np.random.Generator, skip: str = "") -> dict[str, np.ndarray]:
    folder = root / grade / pid
    folder.mkdir(parents=True)
    brain = np.zeros(SHAPE, bool)
    brain[2:10, 2:8, 1:7] = True
    seg = np.zeros(SHAPE, np.uint8)
    seg[4:7, 3:6, 2:5] = 2
    seg[5, 4, 3] = 4
    seg[4, 3, 2] = 1
    # each sequence has its own scale and its own spatial ramp, so a swapped channel is detected
    ramps = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    arrays = {}
    for m, kind in enumerate(ORDER):
        ramp = ramps[m % 3] * (1 + m) + rng.normal(0, 0.3, SHAPE)
        arrays[kind] = np.where(brain, 100.0 * (m + 1) + 5 * ramp + 40 * (seg > 0), 0.0).astype(np.float32)
    arrays["seg"] = seg
    affine = np.diag([1.0, 1.0, 1.0, 1.0])  # RAS on disk: the prepared arrays keep the index order
    for kind, array in arrays.items():
        if kind != skip:
            nib.save(nib.Nifti1Image(array, affine), folder / f"{pid}_{kind}.nii.gz")
    return arrays


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    src = tmp_path / "MICCAI_BraTS_2018_Data_Training"
    data = {}
    for grade, pid in [("HGG", "Brats18_2013_2_1"), ("HGG", "Brats18_CBICA_AAB_1"), ("HGG", "Brats18_TCIA01_131_1"),
                       ("LGG", "Brats18_2013_0_1")]:
        data[pid] = make_patient(src, grade, pid, rng)
    data["Brats18_TCIA09_141_1"] = make_patient(src, "LGG", "Brats18_TCIA09_141_1", rng, skip="t2")
    return src, data


def test_four_channels_normalised_mask_and_split(tree, tmp_path: Path) -> None:
    src, data = tree
    dst = tmp_path / "out"
    results = brats.prepare(src, dst, keep_going=True, progress=False)
    status = {r.case_id: r for r in results}
    bad = status.pop("Brats18_TCIA09_141_1")
    assert bad.status == "failed" and "Brats18_TCIA09_141_1_t2.nii.gz" in bad.reason
    assert all(r.status == "written" for r in status.values())

    datalist = json.loads((dst / "brats_datalist.json").read_text())
    split = json.loads((dst / "split.json").read_text())
    # 5 patients at 190 : 95 → 3 training, 2 test; disjoint; every patient (even the failed one) placed
    assert len(split["training"]) == 3 and len(split["test"]) == 2
    assert not set(split["training"]) & set(split["test"]) and len(set(split["training"] + split["test"])) == 5
    for part in ("training", "test"):
        assert {e["case_id"] for e in datalist[part]} == set(split[part]) - {"Brats18_TCIA09_141_1"}
    entry = next(e for part in ("training", "test") for e in datalist[part] if e["case_id"] == "Brats18_2013_0_1")
    assert entry["grade"] == "LGG" and datalist["meta"]["channels"] == list(ORDER)

    image = nib.load(dst / entry["image"])
    volume = image.get_fdata()
    assert volume.shape == (*SHAPE, 4) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    source = data["Brats18_2013_0_1"]
    for c, kind in enumerate(ORDER):
        assert volume[..., c].min() == 0.0 and volume[..., c].max() == pytest.approx(1.0)
        assert np.allclose(volume[..., c], expected_normalised(source[kind]), atol=1e-5), kind
    mask = np.asarray(nib.load(dst / entry["label"]).dataobj)
    assert mask.dtype == np.uint8 and np.array_equal(mask, (source["seg"] > 0).astype(np.uint8))



def test_flair_only_is_3d_and_split_is_deterministic(tree, tmp_path: Path) -> None:
    src, data = tree
    results = brats.prepare(src, tmp_path / "flair", modalities=["flair"], progress=False)
    assert [r.status for r in results] == ["written"] * 5  # the missing T2 is not needed
    datalist = json.loads((tmp_path / "flair" / "brats_datalist.json").read_text())
    entry = datalist["training"][0]
    volume = nib.load(tmp_path / "flair" / entry["image"]).get_fdata()
    assert volume.shape == SHAPE
    assert np.allclose(volume, expected_normalised(data[entry["case_id"]]["flair"]), atol=1e-5)
    first = json.loads((tmp_path / "flair" / "split.json").read_text())
    brats.prepare(src, tmp_path / "again", modalities=["flair"], progress=False)
    assert json.loads((tmp_path / "again" / "split.json").read_text()) == first
    with pytest.raises(ValueError, match="--modalities"):
        brats.prepare(src, tmp_path / "x", modalities=["flair", "dwi"])


def test_patient_in_two_folders_fails_that_patient_only(tree, tmp_path: Path) -> None:
    """The same patient id in two folders used to stop the whole batch."""
    src, _ = tree
    make_patient(src, "LGG", "Brats18_2013_2_1", np.random.default_rng(1))  # also under HGG
    results = {r.case_id: r for r in brats.prepare(src, tmp_path / "out", keep_going=True, progress=False)}
    dup = results["Brats18_2013_2_1"]
    assert dup.status == "failed" and "also appears in" in dup.reason
    assert "HGG" in dup.reason and "LGG" in dup.reason
    assert results["Brats18_2013_0_1"].status == "written" and results["Brats18_CBICA_AAB_1"].status == "written"
    assert brats.main(["--src", str(src), "--dst", str(tmp_path / "strict")]) == 1  # stops without --keep-going


def test_sequence_on_another_grid_is_named_as_a_sequence(tree, tmp_path: Path) -> None:
    """A T2 on another grid than the T1 is a sequence problem, not a mask problem."""
    src, data = tree
    t2 = src / "HGG" / "Brats18_2013_2_1" / "Brats18_2013_2_1_t2.nii.gz"
    nib.save(nib.Nifti1Image(data["Brats18_2013_2_1"]["t2"], np.diag([2.0, 1.0, 1.0, 1.0])), t2)
    results = {r.case_id: r for r in brats.prepare(src, tmp_path / "out", keep_going=True, progress=False)}
    reason = results["Brats18_2013_2_1"].reason
    assert "sequence does not match image" in reason and "t2.nii.gz" in reason and "spacing" in reason
    assert "mask" not in reason
    assert results["Brats18_2013_0_1"].status == "written"


def test_an_empty_split_names_brats_own_split_option(tmp_path: Path, capsys) -> None:
    """One patient leaves 'test' empty; the warning named --train-subsets and --val-fraction, which brats lacks."""
    make_patient(tmp_path / "src", "HGG", "Brats18_2013_2_1", np.random.default_rng(0))
    brats.prepare(tmp_path / "src", tmp_path / "out", progress=False)
    err = capsys.readouterr().err
    assert "its 'test' list is empty" in err and "--split 190 95 is cut over the 1 patient(s) found" in err
    assert "subsets" not in err and "fraction" not in err



def test_a_part_of_split_size_0_is_a_note_not_a_warning(tmp_path: Path, capsys) -> None:
    """`--split 190 0` asks for no 'test' list; it was warned about as a part too few patients left empty."""
    make_patient(tmp_path / "src", "HGG", "Brats18_2013_2_1", np.random.default_rng(0))
    brats.prepare(tmp_path / "src", tmp_path / "out", split=(190, 0), progress=False)
    err = capsys.readouterr().err
    assert "WARNING" not in err and "note brats_datalist.json: its 'test' list is empty, as asked: --split 190 0 " \
        "gives it size 0\n" in err, err


@pytest.mark.parametrize("value, kept", [(255, False), (7, False), (3, True)])
def test_a_segmentation_with_a_value_brats_does_not_use_fails_its_patient(tree, tmp_path: Path, value: int,
                                                                          kept: bool) -> None:
    """A walk of 2026-11-28: a ``_seg`` file holding a value no BraTS edition uses (a 0 / 255 mask, a parcellation)
    was taken as it was, every value > 0 becoming tumour, without a word; it fails its patient, naming the file, the
    values and the BraTS labels. 3, the enhancing tumour of BraTS 2023, is whole tumour like 1, 2 and 4."""
    src, data = tree
    seg_path = src / "HGG" / "Brats18_CBICA_AAB_1" / "Brats18_CBICA_AAB_1_seg.nii.gz"
    seg = data["Brats18_CBICA_AAB_1"]["seg"].copy()
    seg[seg == 4] = value
    nib.save(nib.Nifti1Image(seg, np.eye(4)), seg_path)
    results = {r.case_id: r for r in brats.prepare(src, tmp_path / "out", keep_going=True, progress=False)}
    result = results["Brats18_CBICA_AAB_1"]
    assert results["Brats18_2013_2_1"].status == "written"
    if kept:
        assert result.status == "written", result.reason
        mask = np.asarray(nib.load(tmp_path / "out" / "labels" / "Brats18_CBICA_AAB_1.nii.gz").dataobj)
        assert np.array_equal(mask, (seg > 0).astype(np.uint8))
    else:
        assert result.status == "failed"
        assert result.reason.startswith(str(seg_path)), result.reason
        assert f"holds label value(s) {value}, which BraTS does not use" in result.reason
        assert not (tmp_path / "out" / "labels" / "Brats18_CBICA_AAB_1.nii.gz").exists()
