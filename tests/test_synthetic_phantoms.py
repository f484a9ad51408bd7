import csv

import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data.synthetic import make_phantom, write_luna16_phantoms


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("luna")
    return write_luna16_phantoms(out, count=3, size=(64, 64, 32), spacing=(5.0, 5.0, 10.0), subsets=2, seed=7)


def test_luna16_layout_and_csv_headers(tree):
    assert sorted(p.name for p in tree.iterdir()) == [
        "annotations.csv", "candidates.csv", "candidates_V2.csv", "subset0", "subset1"]
    assert len(list(tree.glob("subset0/*.mhd"))) == 2 and len(list(tree.glob("subset1/*.raw"))) == 1
    assert list(_rows(tree / "annotations.csv")[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert list(_rows(tree / "candidates.csv")[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "class"]


def test_nodules_at_their_world_coordinates(tree):
    """Every annotation, mapped world → voxel through the image header, hits nodule tissue, not lung."""
    images = {p.stem: sitk.ReadImage(str(p)) for p in tree.glob("subset*/*.mhd")}
    annotations = _rows(tree / "annotations.csv")
    assert annotations
    for row in annotations:
        image = images[row["seriesuid"]]
        index = image.TransformPhysicalPointToIndex([float(row[k]) for k in ("coordX", "coordY", "coordZ")])
        assert image[index] > -650, (row, image[index])  # solid ≈ 10 HU, ground-glass ≈ −500 HU; lung ≈ −850
    positives = [r for r in _rows(tree / "candidates.csv") if r["class"] == "1"]
    assert len(positives) == len(annotations)


def test_anatomy_intensities():
    case = make_phantom(np.random.default_rng(0), size=(64, 64, 32), spacing=(5.0, 5.0, 10.0))
    hu = case.volume
    assert hu.dtype == np.int16 and hu.shape == (64, 64, 32)
    lung = (hu > -950) & (hu < -750)
    assert 0.1 < lung.mean() < 0.5  # two lungs fill a good part of the chest
    assert np.median(hu[lung]) == pytest.approx(-850, abs=30)
    assert (hu > 500).any()  # bone
    assert np.mean(hu[:2] < -900) > 0.95  # air at the border


def test_seeded(tmp_path):
    a = write_luna16_phantoms(tmp_path / "a", count=1, size=(48, 48, 24), spacing=(6.5, 6.5, 13.0), seed=3)
    b = write_luna16_phantoms(tmp_path / "b", count=1, size=(48, 48, 24), spacing=(6.5, 6.5, 13.0), seed=3)
    c = write_luna16_phantoms(tmp_path / "c", count=1, size=(48, 48, 24), spacing=(6.5, 6.5, 13.0), seed=4)
    raw = lambda root: next(root.glob("subset0/*.raw")).read_bytes()  # noqa: E731
    assert raw(a) == raw(b) and raw(a) != raw(c)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_luna16_phantoms(tmp_path / "a", count=1, size=(48, 48, 24), seed=3)


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_a_file_is_one_line_error_and_kept(tmp_path, capsys, overwrite):
    """`dira3d synthetic --out FILE`: a usage error naming the file (not a NotADirectoryError traceback), file kept."""
    from dira3d.data.synthetic import main

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(target), "--count", "1", "--size", "32", "32", "16"] + (["--overwrite"] if overwrite else []))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(target) in err and "is a file" in err, err
    assert target.read_text() == "mine"


def test_out_not_writable_is_one_line_error_naming_it(tmp_path, capsys):
    """`dira3d synthetic --out` in a folder that cannot be made (under a file here; /proc/x alike) ended in a
    FileNotFoundError / NotADirectoryError traceback; now a usage error naming the folder and what to do."""
    from dira3d.data.synthetic import main

    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--count", "1", "--size", "32", "32", "16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dira3d synthetic: error: output folder (--out) ") and str(out) in err, err
    assert "not writable" in err and "choose another --out" in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine"
