"""LiTS preparation on a miniature tree (volume-N.nii / segmentation-N.nii)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data import lits
from dira3d.data.io import xyz_to_image

SIZE = (48, 40, 24)
LIVER = (slice(10, 30), slice(8, 28), slice(4, 16))  # 20 x 20 x 12 voxels
TUMOUR = (slice(14, 18), slice(12, 16), slice(6, 9))  # 4 x 4 x 3 inside the liver


def _write_case(folder: Path, number: int, seg_size=SIZE, empty=False, spacing=(0.8, 0.7, 2.5)) -> None:
    hu = np.full(SIZE, -900, np.int16)
    hu[LIVER] = 60
    hu[TUMOUR] = 20
    seg = np.zeros(seg_size, np.uint8)
    if not empty:
        seg[LIVER] = 1
        seg[TUMOUR] = 2
    for name, array in ((f"volume-{number}.nii", hu), (f"segmentation-{number}.nii", seg)):
        image = xyz_to_image(array)
        image.SetSpacing(spacing)
        image.SetOrigin((-100.0, 80.0, -400.0))
        image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # how NIfTI RAS files read in ITK (LPS)
        sitk.WriteImage(image, str(folder / name))


@pytest.fixture
def lits_tree(tmp_path) -> Path:
    src = tmp_path / "LiTS"
    for batch, numbers in (("Training Batch 1", (0, 1)), ("Training Batch 2", (100, 120, 130))):
        (src / batch).mkdir(parents=True)
        for n in numbers:
            _write_case(src / batch, n)
    return src


def _world_centroid(path: Path) -> np.ndarray:
    img = nib.load(path)
    idx = np.argwhere(np.asarray(img.dataobj) > 0).mean(axis=0)
    return (img.affine @ np.append(idx, 1.0))[:3]


def test_lits_masks_splits_and_alignment(lits_tree, tmp_path):
    dst = tmp_path / "out"
    results = lits.prepare(lits_tree, dst, progress=False)
    assert [r.status for r in results] == ["written"] * 5
    datalist = json.loads((dst / "lits_datalist.json").read_text())
    ids = {k: [e["case_id"] for e in datalist[k]] for k in ("training", "validation", "test")}
    assert ids == {"training": ["lits-000", "lits-001"], "validation": ["lits-100"], "test": ["lits-120"]}
    assert not (set(ids["training"]) & set(ids["test"]))  # 130 lies outside every range: not listed
    entry = datalist["training"][0]
    image, mask = nib.load(dst / entry["image"]), nib.load(dst / entry["label"])
    assert nib.aff2axcodes(mask.affine) == ("R", "A", "S") and np.allclose(image.affine, mask.affine)
    m = np.asarray(mask.dataobj)
    v = np.asarray(image.dataobj)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    assert m.sum() == 20 * 20 * 12  # liver ∪ tumour, the tumour is not dropped
    # aligned: every mask voxel is liver or tumour tissue (60 / 20 HU), every other voxel is not
    assert np.allclose(np.unique(v[m == 1]), [1020 / 2000, 1060 / 2000])
    assert np.all(v[m == 0] == pytest.approx(100 / 2000))


def test_lits_resampling_keeps_masks_aligned(lits_tree, tmp_path):
    native, resampled = tmp_path / "native", tmp_path / "iso"
    lits.prepare(lits_tree, native, progress=False)
    lits.prepare(lits_tree, resampled, spacing=(1.0, 1.0, 1.0), progress=False)
    before, after = native / "labels" / "lits-100.nii.gz", resampled / "labels" / "lits-100.nii.gz"
    volume_mm3 = 20 * 0.8 * 20 * 0.7 * 12 * 2.5
    count = np.count_nonzero(np.asarray(nib.load(after).dataobj))
    assert count == pytest.approx(volume_mm3, rel=0.1)
    assert np.allclose(_world_centroid(after), _world_centroid(before), atol=0.6)
    img = nib.load(resampled / "volumes" / "lits-100.nii.gz")
    assert np.allclose(img.header.get_zooms(), (1, 1, 1))
    tissue = np.asarray(img.dataobj) > (1040 / 2000 + 100 / 2000) / 2  # halfway between liver and background
    on_mask = np.asarray(nib.load(after).dataobj) == 1
    # the resampled mask and image agree everywhere except a partial-volume rim (dice-like overlap)
    assert 2 * np.sum(tissue & on_mask) / (tissue.sum() + on_mask.sum()) > 0.95


def test_lits_bad_cases_reported(lits_tree, tmp_path):
    bad = lits_tree / "bad"
    bad.mkdir()
    _write_case(bad, 7, seg_size=(48, 40, 20))  # misaligned: fewer slices than the volume
    _write_case(bad, 8, empty=True)
    _write_case(bad, 9)
    (bad / "segmentation-9.nii").unlink()
    dst = tmp_path / "out"
    assert lits.main(["--src", str(lits_tree), "--dst", str(dst)]) == 1  # stops at the first failure
    assert lits.main(["--src", str(lits_tree), "--dst", str(dst), "--keep-going"]) == 0
    cases = {c["case_id"]: c for c in json.loads((dst / "report.json").read_text())["cases"]}
    assert "segmentation-7.nii" in cases["lits-007"]["reason"] and "volume-7.nii" in cases["lits-007"]["reason"]
    assert "size" in cases["lits-007"]["reason"]
    assert "segmentation-8.nii" in cases["lits-008"]["reason"] and "empty" in cases["lits-008"]["reason"]
    assert "volume-9.nii" in cases["lits-009"]["reason"] and "segmentation-9" in cases["lits-009"]["reason"]
    assert {c["status"] for k, c in cases.items() if k not in ("lits-007", "lits-008", "lits-009")} <= {"written", "skipped"}
    datalist = json.loads((dst / "lits_datalist.json").read_text())
    assert [e["case_id"] for e in datalist["training"]] == ["lits-000", "lits-001"]
    with pytest.raises(ValueError, match="overlaps"):
        lits.prepare(lits_tree, dst, splits={"training": (0, 100), "validation": (100, 114)}, progress=False)


def test_lits_duplicate_and_orphan_files_fail_their_case_only(lits_tree, tmp_path, capsys):
    """A second copy of a file or a segmentation without its volume used to stop the whole batch."""
    extra = lits_tree / "extra"
    extra.mkdir()
    _write_case(extra, 1)  # volume-1 and segmentation-1 a second time
    _write_case(extra, 5)
    (extra / "volume-5.nii").unlink()  # segmentation-5 alone
    dst = tmp_path / "out"
    assert lits.main(["--src", str(lits_tree), "--dst", str(tmp_path / "strict")]) == 1
    assert lits.main(["--src", str(lits_tree), "--dst", str(dst), "--keep-going"]) == 0
    cases = {c["case_id"]: c for c in json.loads((dst / "report.json").read_text())["cases"]}
    assert cases["lits-001"]["status"] == "failed" and "duplicate of" in cases["lits-001"]["reason"]
    assert "Training Batch 1" in cases["lits-001"]["reason"] and "extra" in cases["lits-001"]["reason"]
    assert cases["lits-005"]["status"] == "failed" and "segmentation-5.nii" in cases["lits-005"]["reason"]
    assert "volume-5.nii" in cases["lits-005"]["reason"]
    assert [cases[k]["status"] for k in ("lits-000", "lits-100", "lits-120", "lits-130")] == ["written"] * 4
    datalist = json.loads((dst / "lits_datalist.json").read_text())
    assert [e["case_id"] for e in datalist["training"]] == ["lits-000"]
    # a rerun reports the duplicate again instead of skipping it
    assert lits.main(["--src", str(lits_tree), "--dst", str(dst), "--keep-going"]) == 0
    assert "FAILED lits-001" in capsys.readouterr().err


def test_an_empty_split_names_lits_own_range_options(tmp_path, capsys):
    """Training Batch 2 alone (volumes 28-130) leaves 'training' empty; the warning named LUNA16's --train-subsets
    and generic's fractions, options `prepare lits` does not have, instead of its --train-range / --val-range ..."""
    src = tmp_path / "LiTS" / "Training Batch 2"
    src.mkdir(parents=True)
    _write_case(src, 101)
    lits.prepare(src.parent, tmp_path / "out", progress=False)
    err = capsys.readouterr().err
    assert "WARNING lits_datalist.json: its 'training', 'test' lists are empty" in err
    assert "check --train-range / --val-range / --test-range (volume numbers, both ends included" in err
    assert "subsets" not in err and "fraction" not in err
