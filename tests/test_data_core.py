"""Core of data preparation: readers, orientation, geometry, normalisation, batch runner."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series

from dira3d.data import command
from dira3d.data.errors import record_or_raise
from dira3d.data.geometry import crop_cube, resample, voxel_to_world, world_to_voxel
from dira3d.data.io import (
    DataError,
    check_mask_matches,
    image_to_xyz,
    read_image,
    to_ras,
    write_nifti,
    xyz_to_image,
)
from dira3d.data.normalize import normalize_mr, window_hu
from dira3d.data.runner import Case, finish, run_cases, safe_case_path, write_datalist

# an oblique-free but flipped/permuted direction: x → -y, y → +x, z → -z (LPS world)
ODD_DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _image(shape_xyz=(12, 10, 6), spacing=(0.7, 0.8, 2.5), origin=(-120.0, 35.5, -310.0), direction=ODD_DIRECTION,
           seed=0) -> sitk.Image:
    array = np.random.default_rng(seed).integers(-1000, 1000, size=shape_xyz).astype(np.int16)
    image = xyz_to_image(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def test_xyz_order_matches_sitk_index():
    image = _image()
    array = image_to_xyz(image)
    assert array.shape == image.GetSize() == (12, 10, 6)
    for index in [(0, 0, 0), (11, 2, 5), (3, 9, 1)]:
        assert array[index] == image.GetPixel(index)
    back = xyz_to_image(array, image)
    assert back.GetOrigin() == image.GetOrigin() and np.array_equal(image_to_xyz(back), array)


def test_to_ras_writes_ras_nifti_and_keeps_world_positions(tmp_path):
    image = _image()
    ras = to_ras(image)
    path = write_nifti(ras, tmp_path / "v.nii.gz")
    loaded = nib.load(path)
    assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S")
    data = np.asarray(loaded.dataobj)
    # every voxel of the source sits at the same anatomical point in the written file
    for index in [(0, 0, 0), (11, 9, 5), (4, 7, 2)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras_mm = lps * np.array([-1, -1, 1])  # NIfTI world is RAS
        ijk = np.linalg.solve(loaded.affine[:3, :3], ras_mm - loaded.affine[:3, 3])
        assert np.allclose(ijk, np.round(ijk), atol=1e-4)
        assert data[tuple(np.round(ijk).astype(int))] == image.GetPixel(index)
    # MONAI reads it (x, y, z) channel-first exactly as image_to_xyz(ras)
    from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

    monai_img = EnsureChannelFirst()(LoadImage(image_only=True)(str(path)))
    assert tuple(monai_img.shape) == (1, *ras.GetSize())
    assert np.array_equal(np.asarray(monai_img[0]), image_to_xyz(ras))
    assert np.array_equal(np.asarray(Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(monai_img)), np.asarray(monai_img))  # already RAS


def test_read_image_roundtrip_and_errors(tmp_path):
    image = sitk.Cast(_image(), sitk.sitkFloat32)
    sitk.WriteImage(image, str(tmp_path / "ok.mhd"))
    back = read_image(tmp_path / "ok.mhd")
    assert back.GetDirection() == pytest.approx(ODD_DIRECTION) and back.GetOrigin() == pytest.approx(image.GetOrigin())
    assert np.array_equal(image_to_xyz(back), image_to_xyz(image))

    sitk.WriteImage(image, str(tmp_path / "trunc.mhd"))
    raw = tmp_path / "trunc.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(DataError, match=r"trunc\.raw.*truncated.*100 bytes"):
        read_image(tmp_path / "trunc.mhd")

    sitk.WriteImage(image, str(tmp_path / "gone.mhd"))
    (tmp_path / "gone.raw").unlink()
    with pytest.raises(DataError, match=r"gone\.mhd.*'gone\.raw'.*does not exist"):
        read_image(tmp_path / "gone.mhd")

    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkInt16), str(tmp_path / "flat.nrrd"))
    with pytest.raises(DataError, match=r"flat\.nrrd.*2D image"):
        read_image(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image(8, 9, 1, sitk.sitkInt16), str(tmp_path / "one.nii.gz"))
    with pytest.raises(DataError, match=r"one\.nii\.gz.*single slice"):
        read_image(tmp_path / "one.nii.gz")

    bad = image_to_xyz(image)
    bad[3, 4, 2] = np.nan
    sitk.WriteImage(xyz_to_image(bad, image), str(tmp_path / "nan.nrrd"))
    with pytest.raises(DataError, match=r"nan\.nrrd.*1 NaN/Inf"):
        read_image(tmp_path / "nan.nrrd")

    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"junk\.nii\.gz.*cannot be read"):
        read_image(tmp_path / "junk.nii.gz")
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "nowhere.nii")


def test_dicom_series_read_and_missing_slice_detected(tmp_path):
    array = np.random.default_rng(1).integers(-1000, 1000, size=(16, 12, 6)).astype(np.int16)
    write_dicom_series(tmp_path / "series", array)
    image = read_image(tmp_path / "series")
    assert image.GetSize() == (16, 12, 6)
    assert image.GetSpacing()[2] == pytest.approx(2.0)
    assert np.array_equal(image_to_xyz(image), array)
    (tmp_path / "series" / "slice003.dcm").unlink()  # slice at z = 106 mm
    with pytest.raises(DataError, match=r"series.*non-uniform slice spacing.*106\.00 mm is missing"):
        read_image(tmp_path / "series")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM series"):
        read_image(tmp_path / "empty")


def test_check_mask_matches_names_both_files():
    image = _image()
    mask = sitk.Cast(image > 0, sitk.sitkUInt8)
    check_mask_matches(image, mask, "img.nii", "msk.nii")  # same grid: fine
    shifted = sitk.Image(mask)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(DataError, match=r"msk\.nii: mask does not match image img\.nii: origin"):
        check_mask_matches(image, shifted, "img.nii", "msk.nii")
    with pytest.raises(DataError, match="size"):
        check_mask_matches(image, sitk.Image(3, 3, 3, sitk.sitkUInt8), "img.nii", "msk.nii")
    empty = sitk.Image(mask) * 0
    with pytest.raises(DataError, match="empty"):
        check_mask_matches(image, empty, "img.nii", "msk.nii")
    check_mask_matches(image, empty, "img.nii", "msk.nii", allow_empty=True)


def test_world_to_voxel_uses_full_geometry():
    image = _image()
    direction = np.array(ODD_DIRECTION).reshape(3, 3)
    index = np.array([[2.0, 3.5, 1.0], [11.0, 0.0, 5.0]])
    by_hand = np.array(image.GetOrigin()) + (direction @ (index * np.array(image.GetSpacing())).T).T
    assert np.allclose(voxel_to_world(image, index), by_hand)
    assert np.allclose(world_to_voxel(image, by_hand), index)
    assert world_to_voxel(image, by_hand[0]).shape == (3,)
    # the same world point stays on the same anatomy after reorientation
    ras = to_ras(image)
    point = by_hand[1]
    assert ras.GetPixel(tuple(int(v) for v in np.round(world_to_voxel(ras, point)))) == image.GetPixel((11, 0, 5))


def test_resample_keeps_mask_aligned_with_image():
    array = np.zeros((40, 36, 12), np.float32)
    array[10:22, 14:26, 3:8] = 1.0  # a box of 12 x 12 x 5 voxels
    image = xyz_to_image(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(ODD_DIRECTION)
    mask = sitk.Cast(image, sitk.sitkUInt8)

    def centroid_mm(img, threshold):
        idx = np.argwhere(image_to_xyz(img) > threshold).mean(axis=0)
        return voxel_to_world(img, idx)

    out_img = resample(image, (1.0, 1.0, 1.0), "linear")
    out_mask = resample(mask, 1.0, "nearest")
    assert out_img.GetSize() == out_mask.GetSize() == (32, 29, 30)  # field of view kept: 40*0.8 = 32 mm ...
    box_mm3 = 12 * 0.8 * 12 * 0.8 * 5 * 2.5
    assert np.count_nonzero(image_to_xyz(out_mask)) == pytest.approx(box_mm3, rel=0.15)
    assert np.allclose(centroid_mm(out_mask, 0), centroid_mm(mask, 0), atol=0.5)
    assert np.allclose(centroid_mm(out_img, 0.5), centroid_mm(mask, 0), atol=0.5)
    with pytest.raises(ValueError, match="interpolator"):
        resample(image, 1.0, "cubic")


def test_crop_cube_centre_and_padding():
    array = np.arange(10 * 8 * 6, dtype=np.float32).reshape(10, 8, 6)
    cube = crop_cube(array, (5.2, 3.6, 2.4), (4, 4, 2), pad_value=-1)
    assert cube.shape == (4, 4, 2)
    assert cube[2, 2, 1] == array[5, 4, 2]  # round(centre) lands at size // 2
    assert np.array_equal(cube, array[3:7, 2:6, 1:3])
    edge = crop_cube(array, (0, 7, 5), (4, 4, 4), pad_value=-1)
    assert edge[2, 2, 2] == array[0, 7, 5]
    assert np.all(edge[:2] == -1) and np.all(edge[:, 3:] == -1) and np.all(edge[:, :, 3:] == -1)
    assert np.array_equal(edge[2:, :3, :3], array[0:2, 5:8, 3:6])
    assert np.all(crop_cube(array, (50, 50, 50), (3, 3, 3), pad_value=7) == 7)
    assert crop_cube(xyz_to_image(array), (5, 4, 2), (2, 2, 2))[1, 1, 1] == array[5, 4, 2]


def test_normalisation_by_hand():
    hu = np.array([-2000, -1000, -150, 0, 1000, 3000])
    assert np.allclose(window_hu(hu), [0, 0, 0.425, 0.5, 1, 1])
    assert window_hu(hu).dtype == np.float32
    assert np.allclose(window_hu(hu, -150, 250), [0, 0, 0, 150 / 400, 1, 1])
    with pytest.raises(ValueError, match="window"):
        window_hu(hu, 10, 10)
    mr = np.concatenate([np.zeros(50), np.arange(1, 101)]).astype(np.float32)
    out = normalize_mr(mr, lower=0, upper=100)  # percentiles of non-zero voxels: 1 and 100
    assert np.allclose(out[50:], (np.arange(1, 101) - 1) / 99) and np.all(out[:50] == 0)
    assert normalize_mr(mr).max() == 1.0 and normalize_mr(mr).min() == 0.0
    with pytest.raises(ValueError, match="constant"):
        normalize_mr(np.full(10, 5.0))


def _write_case(case: Case) -> dict:
    if case.params.get("bad"):
        raise DataError(case.params["bad"], "is broken on purpose")
    for path in case.outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(case.case_id)
    return {"n": len(case.outputs)}


@pytest.mark.parametrize("workers", [1, 2])
def test_runner_resume_dry_run_failures_and_report(tmp_path, workers, capsys):
    out = tmp_path / "out"
    cases = [Case(f"c{i}", [out / f"c{i}.txt"], {"bad": "in/c2.nii" if i == 2 else None}) for i in range(5)]
    plan = run_cases(cases, _write_case, out_dir=out, dry_run=True, progress=False)
    assert [r.status for r in plan] == ["dry-run"] * 5 and not out.exists()
    assert "would write c0" in capsys.readouterr().out

    results = run_cases(cases, _write_case, out_dir=out, workers=workers, keep_going=True, progress=False)
    assert [r.status for r in results] == ["written", "written", "failed", "written", "written"]
    assert "in/c2.nii: is broken on purpose" in results[2].reason
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["written"] == 4 and report["summary"]["failed"] == 1
    assert report["cases"][2]["reason"] == results[2].reason and report["cases"][0]["info"] == {"n": 1}
    assert finish(results, keep_going=True) == 0 and finish(results) == 1

    (out / "c0.txt").write_text("kept")
    again = run_cases(cases, _write_case, out_dir=out, workers=workers, keep_going=True, progress=False)
    assert [r.status for r in again] == ["skipped", "skipped", "failed", "skipped", "skipped"]
    assert (out / "c0.txt").read_text() == "kept"  # never overwritten without overwrite=True
    run_cases(cases[:1], _write_case, out_dir=out, overwrite=True, progress=False)
    assert (out / "c0.txt").read_text() == "c0"

    fresh = tmp_path / "fresh"
    cases = [Case(c.case_id, [fresh / f"{c.case_id}.txt"], c.params) for c in cases]
    stopped = run_cases(cases, _write_case, out_dir=fresh, workers=1, progress=False)
    assert [r.status for r in stopped] == ["written", "written", "failed", "cancelled", "cancelled"]
    assert not (fresh / "c3.txt").exists()
    capsys.readouterr()
    assert finish(stopped) == 1 and "add --keep-going" in capsys.readouterr().err
    known_bad = [Case("c0", [fresh / "x.txt"], {}), Case("c1", [fresh / "y.txt"], {}, error="c1.nii: truncated")]
    plan = run_cases(known_bad, _write_case, out_dir=fresh, dry_run=True, progress=False)
    assert [r.status for r in plan] == ["dry-run", "failed"]
    assert finish(plan, dry_run=True) == 1  # the real run would fail: say so, but not that it stopped
    err = capsys.readouterr().err
    assert "FAILED c1: c1.nii: truncated" in err and "the real run would stop" in err and "no datalist was written" not in err
    with pytest.raises(ValueError, match="duplicate"):
        run_cases(cases + cases[:1], _write_case, out_dir=fresh, progress=False)


def test_record_or_raise_raises_without_a_dict_else_collects_per_key():
    err = DataError("a.csv", "data row 3 is bad")
    with pytest.raises(DataError) as raised:
        record_or_raise(None, "a", err)  # strict: the error itself, unchanged
    assert raised.value is err
    problems: dict[str, str] = {}
    record_or_raise(problems, "a", err, "; fix or remove the row")  # the advice goes into the record only
    record_or_raise(problems, "b", DataError(None, "b is twice"))
    record_or_raise(problems, "a", DataError("a2.nii", "duplicate of a.nii"))
    assert problems == {"a": "a.csv: data row 3 is bad; fix or remove the row; a2.nii: duplicate of a.nii",
                        "b": "b is twice"}


def test_safe_case_path_and_datalist(tmp_path):
    assert safe_case_path(tmp_path, "a/b", ".nii.gz") == tmp_path / "a/b.nii.gz"
    for bad in ["../x", "/etc/x", "a/../../b", ""]:
        with pytest.raises(ValueError, match="case id"):
            safe_case_path(tmp_path, bad, ".nii.gz")
    from monai.data import load_decathlon_datalist

    image = tmp_path / "volumes" / "a.nii.gz"
    path = write_datalist(tmp_path / "lists" / "dl.json",
                          {"training": [{"image": image, "case_id": "a", "label": 1}], "validation": []},
                          {"dataset": "x"})
    stored = json.loads(path.read_text())
    assert stored["training"][0]["image"] == "../volumes/a.nii.gz" and stored["meta"] == {"dataset": "x"}
    loaded = load_decathlon_datalist(str(path), data_list_key="training", base_dir=str(path.parent))
    assert Path(loaded[0]["image"]).resolve() == image.resolve() and loaded[0]["label"] == 1


def test_an_empty_split_of_a_datalist_is_warned_about(tmp_path, capsys):
    """LUNA16 with only subsets 0-5 downloaded wrote an empty test list without a word (default test subsets 7-9)."""
    entry = {"image": tmp_path / "a.nii.gz", "case_id": "a"}
    write_datalist(tmp_path / "dl.json", {"training": [entry], "validation": [entry]}, {})
    assert "WARNING" not in capsys.readouterr().err
    write_datalist(tmp_path / "dl.json", {"training": [entry], "validation": [], "test": []}, {})
    err = capsys.readouterr().err
    assert "WARNING dl.json: its 'validation', 'test' lists are empty" in err, err
    # without advice of its own, no dataset's options (LUNA16's subsets were named to every dataset): its prepare's --help
    assert err.rstrip().endswith("check the split options of its `dira3d prepare <dataset>` (see its --help) against "
                                 "the cases found") and "subsets" not in err, err


def test_an_empty_validation_list_of_a_labelled_datalist_is_said_to_be_no_loss_for_fine_tuning(tmp_path, capsys):
    """The task datalists (lits, lidc, montgomery, siim, luna16's cubes) warned of an empty 'validation' list as of a
    missing part, but every task bundle early-stops on a share of the training patients it holds out itself (holdout
    0.1): only holdout=validation reads that list. A pretraining datalist (no labels) gets no such word."""
    labelled = {"image": tmp_path / "a.nii.gz", "label": tmp_path / "a_label.nii.gz", "case_id": "a"}
    write_datalist(tmp_path / "task.json", {"training": [labelled], "validation": [], "test": [labelled]}, {})
    err = capsys.readouterr().err
    assert "WARNING task.json: its 'validation' list is empty: no prepared case went there; fine-tuning does not " \
           "need the 'validation' list: `dira3d finetune` early-stops on 0.1 of the training patients" in err
    assert "only --set holdout=validation reads that list" in err
    write_datalist(tmp_path / "task.json", {"training": [labelled], "validation": [labelled], "test": []}, {})
    assert "fine-tuning" not in capsys.readouterr().err  # an empty 'test' list is what fine-tuning scores on
    unlabelled = {"image": tmp_path / "a.nii.gz", "case_id": "a"}
    write_datalist(tmp_path / "dl.json", {"training": [unlabelled], "validation": []}, {})
    err = capsys.readouterr().err
    assert "its 'validation' list is empty" in err and "fine-tuning" not in err


def test_an_empty_list_the_user_asked_for_is_a_note_not_a_warning(tmp_path, capsys):
    """An empty list a setting asked for (``--val-fraction 0``) was warned about like one no case reached, with advice
    to rerun; write_datalist's ``asked_empty`` makes it one note line, and the lists it does not name still warn."""
    entry = {"image": tmp_path / "a.nii.gz", "case_id": "a"}
    asked = {"validation": "--val-fraction 0", "test": "--test-fraction 0"}
    write_datalist(tmp_path / "dl.json", {"training": [entry], "validation": [], "test": [entry]}, {}, asked_empty=asked)
    assert capsys.readouterr().err == "note dl.json: its 'validation' list is empty, as asked: --val-fraction 0\n"
    write_datalist(tmp_path / "dl.json", {"training": [], "validation": [], "test": []}, {}, split_advice="advice",
                   asked_empty=asked)
    assert capsys.readouterr().err.splitlines() == [
        "note dl.json: its 'validation', 'test' lists are empty, as asked: --val-fraction 0; --test-fraction 0",
        "WARNING dl.json: its 'training' list is empty: no prepared case went there; advice"]
    write_datalist(tmp_path / "dl.json", {"training": [entry], "validation": [entry]}, {}, asked_empty=asked)
    assert capsys.readouterr().err == ""  # a list asked to be empty that an earlier split filled: no word

def test_prepare_command_dispatch(capsys):
    assert command.main(["nosuch"]) == 2
    assert "unknown dataset 'nosuch'" in capsys.readouterr().err
    assert command.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("luna16", "lits", "lidc", "brats", "pecad"))
    assert "docs/data.md" in usage and "docs/data_2d.md" in usage  # the 2D datasets are documented there


def test_resample_keeps_the_field_of_view_of_an_oblique_scan():
    """The new grid covers the old box: its outer voxel corners are the old ones, along the image axes
    (the direction matters: a 1 mm grid shifted by one new voxel would keep the centroids but crop a slice)."""
    image = _image(shape_xyz=(10, 8, 6), spacing=(0.8, 1.0, 2.5))  # ODD_DIRECTION
    out = resample(image, 1.0, "linear")
    assert out.GetSize() == (8, 8, 15)
    first = np.full(3, -0.5)  # the outer corner of voxel 0, in voxel units
    assert np.allclose(voxel_to_world(out, first), voxel_to_world(image, first), atol=1e-6)
    last_new, last_old = np.asarray(out.GetSize()) - 0.5, np.asarray(image.GetSize()) - 0.5
    assert np.allclose(voxel_to_world(out, last_new), voxel_to_world(image, last_old), atol=1e-6)


def _interrupted_at_c2(case: Case) -> dict:
    if case.case_id == "c2":
        raise KeyboardInterrupt  # Ctrl-C while this case runs
    return _write_case(case)


def test_ctrl_c_during_prepare_is_one_line_and_the_rerun_skips_the_finished_cases(tmp_path, capsys):
    # a traceback before; now one line saying what is kept and how to go on, exit 130
    import argparse

    from dira3d.data.runner import run_prepare

    out = tmp_path / "out"
    cases = [Case(f"c{i}", [out / f"c{i}.txt"]) for i in range(4)]

    def prepare(src, dst, *, workers, overwrite, dry_run, keep_going, report_path, progress, process=_interrupted_at_c2):
        return run_cases(cases, process, out_dir=dst, workers=workers, overwrite=overwrite, dry_run=dry_run,
                         keep_going=keep_going, report_path=report_path, progress=progress)

    args = argparse.Namespace(src=str(tmp_path), dst=str(out), workers=1, overwrite=False, dry_run=False,
                              keep_going=False, report=None)
    assert run_prepare("dira3d prepare test", prepare, args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "dira3d prepare test: interrupted; the cases finished so far are kept in" in err
    assert sorted(p.name for p in out.glob("*.txt")) == ["c0.txt", "c1.txt"]
    results = prepare(str(tmp_path), out, workers=1, overwrite=False, dry_run=False, keep_going=False,
                      report_path=None, progress=False, process=_write_case)
    assert [r.status for r in results] == ["skipped", "skipped", "written", "written"]
