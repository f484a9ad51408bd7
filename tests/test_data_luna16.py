"""LUNA16 preparation on a miniature tree in the official layout (MetaImage + CSVs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data import luna16
from dira3d.data.io import image_to_xyz, read_image, xyz_to_image

SIZE = (48, 40, 24)  # x, y, z
# scan uid -> (subset, direction, origin, spacing, nodule voxel)
SCANS = {
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.100": (0, (1, 0, 0, 0, 1, 0, 0, 0, 1), (-180.5, -160.25, -320.0), (0.7, 0.7, 2.5), (20, 17, 9)),
    # a flipped, permuted direction and odd origin: the conversion must use the full geometry
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.200": (0, (0, -1, 0, 1, 0, 0, 0, 0, -1), (95.0, -140.0, 12.5), (0.8, 0.6, 2.0), (30, 12, 15)),
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.300": (5, (-1, 0, 0, 0, -1, 0, 0, 0, 1), (170.0, 150.0, -250.0), (0.75, 0.75, 1.25), (12, 25, 6)),
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.400": (7, (1, 0, 0, 0, 1, 0, 0, 0, 1), (-150.0, -150.0, -300.0), (0.7, 0.7, 2.5), (25, 20, 12)),
}


def _scan(direction, origin, spacing, nodule) -> sitk.Image:
    hu = np.full(SIZE, -1000, np.int16)
    hu[4:44, 4:36, 2:22] = -850  # lung
    x, y, z = nodule
    hu[x - 2:x + 3, y - 2:y + 3, z - 1:z + 2] = 100  # a small nodule ...
    hu[x, y, z] = 600  # ... with a unique brightest centre voxel
    image = xyz_to_image(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


@pytest.fixture
def luna_tree(tmp_path) -> tuple[Path, dict]:
    src = tmp_path / "LUNA16"
    rows = []
    worlds = {}
    for uid, (subset, direction, origin, spacing, nodule) in SCANS.items():
        image = _scan(direction, origin, spacing, nodule)
        (src / f"subset{subset}").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(src / f"subset{subset}" / f"{uid}.mhd"))
        world = image.TransformIndexToPhysicalPoint(nodule)
        worlds[uid] = world
        rows.append([uid, *world, 1])
        rows.append([uid, *image.TransformIndexToPhysicalPoint((1, 1, 1)), 0])  # near a corner: padded cube
        rows.append([uid, *image.TransformIndexToPhysicalPoint((8, 30, 20)), 0])
        rows.append([uid, *image.TransformIndexToPhysicalPoint((40, 6, 4)), 0])
    rows.append(["1.2.3.not.downloaded", 0.0, 0.0, 0.0, 0])
    with open(src / "candidates_V2.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
        writer.writerows(rows)
    with open(src / "annotations.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        writer.writerows([[uid, *w, 4.5] for uid, w in worlds.items()])
    return src, worlds


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_luna16_volumes_cubes_and_datalists(luna_tree, tmp_path):
    src, worlds = luna_tree
    dst = tmp_path / "out"
    results = luna16.prepare(src, dst, progress=False)
    assert [r.status for r in results] == ["written"] * 4
    pre = json.loads((dst / "pretrain_datalist.json").read_text())
    assert {e["case_id"] for e in pre["training"]} == {u for u, s in SCANS.items() if s[0] == 0}
    assert [e["case_id"] for e in pre["validation"]] == ["1.3.6.1.4.1.14519.5.2.1.6279.6001.300"]
    assert [e["case_id"] for e in pre["test"]] == ["1.3.6.1.4.1.14519.5.2.1.6279.6001.400"]
    assert sorted(k for k in pre if k.startswith("subset")) == ["subset0", "subset5", "subset7"]
    assert pre["meta"]["window"] == [-1000, 1000] and pre["meta"]["orientation"] == "RAS"

    for entry in pre["training"]:
        vol = nib.load(dst / entry["image"])
        assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
        data = np.asarray(vol.dataobj)
        assert data.dtype == np.float32 and data.min() == 0.0 and data.max() == pytest.approx(0.8)  # 600 HU

    ncc = json.loads((dst / "ncc_datalist.json").read_text())
    assert ncc["meta"]["candidate_scans_not_found"] == 1
    split_ids = {name: {e["case_id"] for e in ncc[name]} for name in ("training", "validation", "test")}
    assert not (split_ids["training"] & split_ids["validation"]) and not (split_ids["training"] & split_ids["test"])
    assert not (split_ids["validation"] & split_ids["test"])
    positives = [e for name in ("training", "validation", "test") for e in ncc[name] if e["label"] == 1]
    assert len(positives) == 4 and sum(len(ncc[n]) for n in ("training", "validation", "test")) == 16
    for entry in positives:
        cube = _load(dst / entry["image"])
        assert cube.shape == (64, 64, 32)
        # the nodule's brightest voxel lands exactly at the cube's centre voxel, whatever the direction
        assert np.unravel_index(np.argmax(cube), cube.shape) == (32, 32, 16)
        assert cube[32, 32, 16] == pytest.approx(0.8) and entry["diameter_mm"] == 4.5
        # the cube keeps its place in the world: its centre voxel maps back to the candidate (RAS = -x, -y, z)
        affine = nib.load(dst / entry["image"]).affine
        ras = affine @ np.array([32, 32, 16, 1.0])
        assert np.allclose(ras[:3] * [-1, -1, 1], worlds[entry["case_id"]], atol=1e-3)
    corner, lung, _ = [e for e in ncc["training"] if e["label"] == 0][:3]
    assert np.all(_load(dst / corner["image"])[:, :, :15] == 0.0)  # 15 slices below the volume: padding (0 = air)
    assert _load(dst / lung["image"])[32, 32, 16] == pytest.approx(0.075)  # -850 HU lung at the centre

    again = luna16.prepare(src, dst, progress=False)
    assert [r.status for r in again] == ["skipped"] * 4


def test_luna16_negative_cap_and_resampling(luna_tree, tmp_path):
    src, _ = luna_tree
    dst = tmp_path / "capped"
    luna16.prepare(src, dst, spacing=(1.0, 1.0, 1.0), max_negatives_per_scan=1, seed=3,
                   splits={"training": [0, 5], "validation": [], "test": [7]}, progress=False)
    ncc = json.loads((dst / "ncc_datalist.json").read_text())
    entries = ncc["training"] + ncc["test"]
    per_scan = {}
    for e in entries:
        per_scan.setdefault(e["case_id"], []).append(e["label"])
    assert all(sorted(v) == [0, 1] for v in per_scan.values()) and len(per_scan) == 4
    for e in entries:
        if e["label"] == 1:
            cube = _load(dst / e["image"])
            bright = np.argwhere(cube > 0.5).mean(axis=0)
            assert np.allclose(bright, (32, 32, 16), atol=1.0)  # still centred after resampling to 1 mm
    vol = nib.load(dst / "volumes" / f"{ncc['training'][0]['case_id']}.nii.gz")
    assert np.allclose(vol.header.get_zooms(), (1.0, 1.0, 1.0))
    again = tmp_path / "capped2"
    luna16.prepare(src, again, max_negatives_per_scan=1, seed=3, progress=False)
    chosen = lambda d: sorted(e["candidate"] for n in ("training", "validation", "test")  # noqa: E731
                              for e in json.loads((d / "ncc_datalist.json").read_text())[n])
    assert chosen(dst) == chosen(again)  # the seeded choice does not depend on spacing or split


def test_luna16_bad_scans_reported_rest_written(luna_tree, tmp_path, capsys):
    src, _ = luna_tree
    image = _scan((1, 0, 0, 0, 1, 0, 0, 0, 1), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (10, 10, 10))
    sitk.WriteImage(image, str(src / "subset0" / "9.truncated.mhd"))
    raw = src / "subset0" / "9.truncated.raw"
    raw.write_bytes(raw.read_bytes()[:5000])
    sitk.WriteImage(image, str(src / "subset5" / "9.noraw.mhd"))
    (src / "subset5" / "9.noraw.raw").unlink()
    dst = tmp_path / "out"
    code = luna16.main(["--src", str(src), "--dst", str(dst), "--keep-going", "--max-negatives-per-scan", "0"])
    assert code == 0
    report = json.loads((dst / "report.json").read_text())
    status = {c["case_id"]: c for c in report["cases"]}
    assert status["9.truncated"]["status"] == "failed" and "9.truncated.raw" in status["9.truncated"]["reason"]
    assert "truncated" in status["9.truncated"]["reason"]
    assert status["9.noraw"]["status"] == "failed" and "9.noraw.raw" in status["9.noraw"]["reason"]
    assert report["summary"]["written"] == 4
    assert len(json.loads((dst / "pretrain_datalist.json").read_text())["training"]) == 2
    assert "FAILED 9.noraw" in capsys.readouterr().err
    # without --keep-going the failure gives a non-zero exit code
    assert luna16.main(["--src", str(src), "--dst", str(tmp_path / "strict"), "--no-cubes"]) == 1
    # dry run: nothing written
    assert luna16.main(["--src", str(src), "--dst", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert not (tmp_path / "dry").exists()


def test_luna16_layout_errors(tmp_path, capsys):
    assert luna16.main(["--src", str(tmp_path), "--dst", str(tmp_path / "o")]) == 2
    assert "subset0" in capsys.readouterr().err
    (tmp_path / "subset0").mkdir()
    (tmp_path / "subset0" / "1.2.3.mhd").write_text("")  # listed, not read, before the CSV is
    (tmp_path / "candidates.csv").write_text("seriesuid,x,y,z,class\n")
    with pytest.raises(ValueError, match=r"candidates\.csv.*coordX"):
        luna16.prepare(tmp_path, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="disjoint"):
        luna16.prepare(tmp_path, tmp_path / "o", splits={"training": [0, 1], "validation": [1]}, progress=False)


def test_luna16_src_without_scans_is_refused_naming_what_to_do(luna_tree, tmp_path, capsys):
    """A missing --src, or subset folders without scans (each zip extracted into its own subsetN/,
    giving subsetN/subsetN/*.mhd), stop at once (exit 2): they used to give 'no cases', exit 0, and
    empty datalists with the visual-words command to run next."""
    src, _ = luna_tree
    assert luna16.main(["--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "o")]) == 2
    assert "nowhere: is not a folder" in capsys.readouterr().err
    nested = tmp_path / "nested"
    for folder in sorted(src.glob("subset*")):
        (nested / folder.name).mkdir(parents=True)
        folder.rename(nested / folder.name / folder.name)
    assert luna16.main(["--src", str(nested), "--dst", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hold no .mhd scans" in err
    assert f"one level deeper, in {nested / 'subset0' / 'subset0'}" in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "empty" / "subset3").mkdir(parents=True)
    assert luna16.main(["--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "o")]) == 2
    assert "(subset3) hold no .mhd scans; extract the subset zips" in capsys.readouterr().err


def test_written_volume_matches_source_voxels(luna_tree, tmp_path):
    src, _ = luna_tree
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.200"
    luna16.prepare(src, tmp_path / "o", cubes=False, progress=False)
    source = read_image(src / "subset0" / f"{uid}.mhd")
    written = read_image(tmp_path / "o" / "volumes" / f"{uid}.nii.gz")
    # same anatomy at the same world point: voxel (30, 12, 15) was the 600 HU nodule centre
    point = source.TransformIndexToPhysicalPoint((30, 12, 15))
    index = written.TransformPhysicalPointToIndex(point)
    assert image_to_xyz(written)[index] == pytest.approx(0.8)


def test_luna16_bad_csv_row_is_one_failed_case(luna_tree, tmp_path, capsys):
    """A malformed candidate row used to stop the whole batch even with --keep-going."""
    src, _ = luna_tree
    lines = (src / "candidates_V2.csv").read_text().splitlines()
    uid = lines[2].split(",")[0]
    lines[2] = f"{uid},abc,1.0,2.0,0"  # data row 2
    lines.append(f"{uid},1.0,2.0,3.0,7")  # data row 18: class 7
    (src / "candidates_V2.csv").write_text("\n".join(lines) + "\n")
    dst = tmp_path / "out"
    assert luna16.main(["--src", str(src), "--dst", str(tmp_path / "strict")]) == 1  # still stops without it
    assert luna16.main(["--src", str(src), "--dst", str(dst), "--keep-going"]) == 0
    err = capsys.readouterr().err
    assert "FAILED candidates_V2.csv data row 2:" in err and "non-numeric" in err and "abc" in err
    assert "candidate 1 in the datalist" in err  # the id the row would have had (0-based, as cubes/ names it)
    assert "FAILED candidates_V2.csv data row 18:" in err and "class '7'" in err
    report = json.loads((dst / "report.json").read_text())
    assert report["summary"]["failed"] == 2 and report["summary"]["written"] == 4
    ncc = json.loads((dst / "ncc_datalist.json").read_text())
    candidates = sorted(e["candidate"] for part in ("training", "validation", "test") for e in ncc[part])
    assert candidates == [r for r in range(16) if r != 1]  # every good row of every scan, row index 1 left out


def test_luna16_scan_in_two_subsets_fails_that_scan_only(luna_tree, tmp_path):
    """A seriesuid found in two subsets used to stop the whole batch."""
    src, _ = luna_tree
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.300"
    for suffix in (".mhd", ".raw"):
        (src / "subset7" / f"{uid}{suffix}").write_bytes((src / "subset5" / f"{uid}{suffix}").read_bytes())
    results = {r.case_id: r for r in luna16.prepare(src, tmp_path / "out", cubes=False, keep_going=True, progress=False)}
    assert results[uid].status == "failed" and "subset5" in results[uid].reason and "subset7" in results[uid].reason
    assert sum(r.status == "written" for r in results.values()) == 3


def test_luna16_relative_paths_are_recorded_absolute(luna_tree, tmp_path, monkeypatch):
    """A datalist made from relative --src/--candidates must still name the CSV from any folder."""
    src, _ = luna_tree
    monkeypatch.chdir(src.parent)
    assert luna16.main(["--src", src.name, "--candidates", f"{src.name}/candidates_V2.csv",
                        "--dst", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "ncc_datalist.json").read_text())["meta"]
    assert Path(meta["candidates_csv"]) == (src / "candidates_V2.csv").resolve()
    assert Path(meta["source"]) == src.resolve()


def test_a_positive_candidate_takes_the_diameter_of_the_nodule_it_lies_in():
    """Within the nodule's radius + 1 mm (not its diameter + 1 mm), the nearest nodule when several qualify."""
    candidate = ("c", 10.0, 20.0, 30.0, 1)
    assert luna16._diameter(candidate, [(13.0, 20.0, 30.0, 4.0)]) == 4.0  # 3 mm = radius 2 + 1
    assert luna16._diameter(candidate, [(13.5, 20.0, 30.0, 4.0)]) is None  # 3.5 mm: outside
    assert luna16._diameter(candidate, [(14.0, 20.0, 30.0, 8.0), (11.0, 20.0, 30.0, 6.0)]) == 6.0


def test_an_empty_split_names_the_subsets_asked_for_and_found(luna_tree, tmp_path, capsys):
    """The warning said 'e.g. --train-subsets ..., --val-fraction, --test-fraction' (generic's options) without the
    subsets each split asked for and those on disk."""
    src, _ = luna_tree
    luna16.prepare(src, tmp_path / "out", splits={"training": [0, 5], "validation": [1], "test": [7]}, progress=False)
    err = capsys.readouterr().err
    assert "WARNING pretrain_datalist.json: its 'validation' list is empty" in err
    assert "(training 0 5, validation 1, test 7) against the subsets found (subset0, subset5, subset7)" in err
    assert "fraction" not in err
    # the candidate cubes are for fine-tuning, which holds out its own patients; the volumes are for pretraining
    pretrain, ncc = (next(line for line in err.splitlines() if line.startswith(f"WARNING {name}"))
                     for name in ("pretrain_datalist.json", "ncc_datalist.json"))
    assert "fine-tuning does not need the 'validation' list" in ncc and "fine-tuning" not in pretrain



def test_a_split_given_no_subset_is_a_note_not_a_warning(luna_tree, tmp_path, capsys):
    """`--val-subsets` with no subset asks for no 'validation' list; it was warned about as a partial download."""
    src, _ = luna_tree
    luna16.prepare(src, tmp_path / "out", splits={"training": [0, 5], "validation": [], "test": [7]}, progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "'validation'" in line]
    assert lines == [f"note {name}: its 'validation' list is empty, as asked: --val-subsets lists no subset"
                     for name in ("pretrain_datalist.json", "ncc_datalist.json")], lines