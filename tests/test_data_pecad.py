"""PE-CAD preparation in the documented layout: volumes/ + candidates.csv (world and voxel rows)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from dira3d.data import pecad

SIZE = (30, 26, 20)


def write_volume(path: Path, blob: tuple[int, int, int], spacing, direction) -> sitk.Image:
    """Soft tissue (40 HU) with a bright 3-voxel cube (1000 HU) centred on ``blob`` (x, y, z)."""
    array = np.full(SIZE, 40, np.int16)
    x, y, z = blob
    array[x - 1:x + 2, y - 1:y + 2, z - 1:z + 2] = 1000
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, 35.0, -310.0))
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def test_cubes_centred_folds_by_patient_and_bad_rows(tmp_path: Path) -> None:
    src = tmp_path / "PE-CAD"
    flip_x = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    rows = [("patient_id", "x", "y", "z", "coords", "label", "note")]
    blobs = {"PE01": (10, 12, 7), "PE02": (20, 9, 12), "PE03": (15, 15, 10), "PE04": (5, 20, 14)}
    for n, (pid, blob) in enumerate(blobs.items()):
        spacing = (0.7, 0.7, 1.5) if n % 2 else (0.8, 0.6, 2.0)
        suffix = ".nrrd" if n == 3 else ".nii.gz"
        image = write_volume(src / "volumes" / f"{pid}{suffix}", blob, spacing, flip_x if n % 2 else (1, 0, 0, 0, 1, 0, 0, 0, 1))
        world = image.TransformIndexToPhysicalPoint(blob)
        rows.append((pid, *(f"{v:.4f}" for v in world), "world", 1, "embolus"))
        rows.append((pid, *blob, "voxel", 1, "same embolus, voxel coordinates"))
        rows.append((pid, 2, 2, 2, "voxel", 0, "false positive"))
    rows.append(("PE02", 5, 5, 500, "voxel", 0, "outside the volume"))
    rows.append(("PE03", 0.0, 0.0, 4000.0, "world", 1, "outside the volume"))
    rows.append(("PE09", 1, 2, 3, "voxel", 0, "no such patient"))
    with open(src / "candidates.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)

    # without --keep-going a bad row stops the batch
    assert pecad.main(["--src", str(src), "--dst", str(tmp_path / "strict")]) == 1
    assert not (tmp_path / "strict" / "pecad_datalist.json").exists()

    dst = tmp_path / "out"
    results = {r.case_id: r for r in pecad.prepare(src, dst, keep_going=True, progress=False)}
    assert results["PE01"].status == results["PE04"].status == "written"
    assert results["PE02"].status == "failed" and "row 13" in results["PE02"].reason and "outside" in results["PE02"].reason
    assert results["PE03"].status == "failed" and "row 14 (candidate 13)" in results["PE03"].reason
    assert results["PE09"].status == "failed" and "PE09" in results["PE09"].reason and "candidates.csv" in results["PE09"].reason
    report = json.loads((dst / "report.json").read_text())
    assert report["summary"]["failed"] == 3

    datalist = json.loads((dst / "pecad_datalist.json").read_text())
    entries = datalist["training"]
    assert len(entries) == 12  # 3 good rows per patient, bad rows left out, good rows of PE02/PE03 kept
    for entry in entries:
        cube = nib.load(dst / entry["image"])
        data = cube.get_fdata()
        assert data.shape == (64, 64, 64) and nib.aff2axcodes(cube.affine) == ("R", "A", "S")
        if entry["label"] == 1:
            # the bright blob (1000 HU → 1.0) sits at the cube centre, whichever coordinate kind
            assert np.allclose(np.argwhere(data > 0.99).mean(axis=0), [32, 32, 32])
            assert data[32, 32, 32] == 1.0 and abs(data[32, 32, 36] - 0.52) < 1e-6  # soft tissue, 40 HU
    # folds: 0..2, each patient in exactly one fold, folds balanced over the 5 CSV patients
    fold_of = {}
    for entry in entries:
        assert fold_of.setdefault(entry["case_id"], entry["fold"]) == entry["fold"]
    split = json.loads((dst / "split.json").read_text())
    assert split["folds"] == {**fold_of, "PE09": split["folds"]["PE09"]}
    assert sorted(np.bincount(list(split["folds"].values()), minlength=3).tolist()) == [1, 2, 2]

    # resume: clean patients are skipped, patients with bad rows are redone and reported again
    again = {r.case_id: r.status for r in pecad.prepare(src, dst, keep_going=True, progress=False)}
    assert again == {"PE01": "skipped", "PE02": "failed", "PE03": "failed", "PE04": "skipped", "PE09": "failed"}


def test_real_ct_candidate_world_and_voxel_agree(real_data: Path, tmp_path: Path) -> None:
    """A real chest CT (0.57 × 0.57 × 5 mm): the nodule's centre as voxel and as world coordinates
    gives the same cube, and the labelled nodule lies at its centre."""
    src = tmp_path / "PE-CAD"
    (src / "volumes").mkdir(parents=True)
    (src / "volumes" / "lung1.nrrd").symlink_to(real_data / "lung1_image.nrrd")
    label = sitk.ReadImage(str(real_data / "lung1_label.nrrd"))
    centre = np.round(np.argwhere(sitk.GetArrayFromImage(label) > 0).mean(axis=0)[::-1]).astype(int)  # (x, y, z)
    world = label.TransformIndexToPhysicalPoint([int(v) for v in centre])
    with open(src / "candidates.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("patient_id", "x", "y", "z", "coords", "label"),
                                      ("lung1", *centre, "voxel", 1), ("lung1", *world, "world", 1)])
    assert [r.status for r in pecad.prepare(src, tmp_path / "out", cube_size=(32, 32, 8), progress=False)] == ["written"]
    entries = json.loads((tmp_path / "out" / "pecad_datalist.json").read_text())["training"]
    cubes = [nib.load(tmp_path / "out" / e["image"]) for e in entries]
    assert np.array_equal(cubes[0].get_fdata(), cubes[1].get_fdata()) and np.allclose(cubes[0].affine, cubes[1].affine)
    # the cube's centre voxel is the labelled voxel, in the world (RAS affine vs LPS physical point)
    centre_ras = cubes[0].affine @ np.array([16, 16, 4, 1.0])
    assert np.allclose(centre_ras[:3] * [-1, -1, 1], world, atol=1e-3)
    assert 0.3 < cubes[0].get_fdata()[16, 16, 4] <= 1.0  # soft-tissue nodule, not lung air (≈ 0.1)


def test_two_volumes_of_one_patient_fail_that_patient_only(tmp_path: Path) -> None:
    """A second volume of one patient used to stop the whole batch."""
    src = tmp_path / "PE-CAD"
    for name in ("PE01.nii.gz", "PE01.nrrd", "PE02.nii.gz"):
        write_volume(src / "volumes" / name, (10, 12, 7), (0.8, 0.6, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    (src / "candidates.csv").write_text("patient_id,x,y,z,coords,label\nPE01,10,12,7,voxel,1\nPE02,10,12,7,voxel,1\n")
    results = {r.case_id: r for r in pecad.prepare(src, tmp_path / "out", keep_going=True, progress=False)}
    assert results["PE02"].status == "written"
    assert results["PE01"].status == "failed" and "PE01.nii.gz" in results["PE01"].reason
    assert "PE01.nrrd" in results["PE01"].reason and "one volume per patient" in results["PE01"].reason
    entries = json.loads((tmp_path / "out" / "pecad_datalist.json").read_text())["training"]
    assert [e["case_id"] for e in entries] == ["PE02"]


def test_a_hostile_patient_id_fails_that_patient_only(tmp_path: Path) -> None:
    # a patient_id cell that would write outside --dst stopped the whole batch before any case (exit 2,
    # even with --keep-going); it is a failed case naming the CSV, and the good patient is prepared
    src = tmp_path / "PE-CAD"
    write_volume(src / "volumes" / "PE01.nii.gz", (10, 12, 7), (0.8, 0.6, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    rows = [("patient_id", "x", "y", "z", "coords", "label"), ("PE01", 10, 12, 7, "voxel", 1),
            ("../../escape", 1, 2, 3, "voxel", 0), ("/abs", 1, 2, 3, "voxel", 0)]
    with open(src / "candidates.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    dst = tmp_path / "work" / "out"
    assert pecad.main(["--src", str(src), "--dst", str(dst), "--keep-going"]) == 0
    report = {c["case_id"]: c for c in json.loads((dst / "report.json").read_text())["cases"]}
    assert report["PE01"]["status"] == "written"
    for bad in ("../../escape", "/abs"):
        assert report[bad]["status"] == "failed" and "candidates.csv" in report[bad]["reason"], report[bad]
    assert [e["case_id"] for e in json.loads((dst / "pecad_datalist.json").read_text())["training"]] == ["PE01"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PE-CAD", "work"]  # nothing written beside --dst
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out"]
