"""Data preparation against the house rule: bad input is a clear error naming the file, a batch goes
on with the good cases, nothing the user had is overwritten or lost.

Each test here failed before its fix: ITK's NIfTI reader zero-fills truncated files, reads NaN as 0
and repairs a zero pixdim; ``generic`` dropped one of two inputs with the same case id, re-ingested
its own outputs when ``--dst`` lies inside ``--src`` and missed DICOM folders whose first five files
are not DICOM; an unwritable ``--dst`` was a traceback; atomic writes left every output 0600;
``dira3d synthetic`` overwrote a user's candidates CSV."""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data import generic
from dira3d.data.io import DataError, read_image

sys.path.insert(0, str(Path(__file__).parent))
from test_data_core import _write_dicom_series  # noqa: E402


def _ct(path: Path, shape=(8, 12, 12), dtype=np.int16, nan: bool = False) -> Path:
    array = (np.random.default_rng(0).random(shape) * 2000 - 1000).astype(dtype)
    if nan:
        array[2, 3, 4] = np.nan
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(path))
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_read_image_rejects_what_itk_hides_in_nifti(tmp_path):
    for name in ("cut.nii", "cut.nii.gz"):
        path = _truncate(_ct(tmp_path / name))
        with pytest.raises(DataError, match=re.escape(name) + ".*truncated or corrupt"):
            read_image(path)
    with pytest.raises(DataError, match=r"nan\.nii\.gz.*1 NaN/Inf voxels"):
        read_image(_ct(tmp_path / "nan.nii.gz", dtype=np.float32, nan=True))
    # NaN is only an error where asked for
    assert read_image(tmp_path / "nan.nii.gz", check_finite=False).GetSize() == (12, 12, 8)

    path = _ct(tmp_path / "flat.nii.gz")
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[76 + 4 * 3: 80 + 4 * 3] = struct.pack("<f", 0.0)  # pixdim[3] (z spacing) = 0
    raw[252:256] = struct.pack("<hh", 0, 0)  # no qform / sform: pixdim is the spacing
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"flat\.nii\.gz.*non-positive.*pixdim"):
        read_image(path)
    assert read_image(_ct(tmp_path / "ok.nii.gz")).GetSpacing() == pytest.approx((1.0, 1.0, 2.0))


def test_prepare_generic_never_drops_or_reingests_inputs(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _ct(src / "a.nii.gz")
    _ct(src / "a.nrrd")  # same case id 'a': one of them used to vanish without a word
    code = generic.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--keep-going"])
    err = capsys.readouterr().err
    assert code == 2 and "a.nii.gz" in err and "a.nrrd" in err and "same case id" in err
    (src / "a.nrrd").unlink()

    # a DICOM series folder with notes sorted before the slices is still found
    _write_dicom_series(src / "series", np.zeros((12, 10, 4), np.int16))
    for n in range(6):
        (src / "series" / f"0_note{n}.txt").write_text("scanner notes")

    dst = src / "prepared"  # --dst inside --src: a rerun must not prepare its own outputs again
    for _ in range(2):
        assert generic.main(["--src", str(src), "--dst", str(dst), "--keep-going"]) == 0
    names = sorted(p.name for p in (dst / "volumes").iterdir())
    assert names == ["a.nii.gz", "series.nii.gz"], names
    entries = json.loads((dst / "pretrain_datalist.json").read_text())["training"]
    assert sorted(e["case_id"] for e in entries) == ["a", "series"]


def test_unwritable_dst_is_one_clear_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _ct(src / "a.nii.gz")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert generic.main(["--src", str(src), "--dst", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(blocker / "out") in err and "cannot be written" in err
    assert blocker.read_text() == "not a folder"
    if os.name == "posix" and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert generic.main(["--src", str(src), "--dst", str(locked), "--keep-going"]) == 2
            assert "cannot be written" in capsys.readouterr().err
        finally:
            locked.chmod(0o755)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_prepared_files_follow_the_umask(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _ct(src / "a.nii.gz")
    old = os.umask(0o022)
    os.umask(old)
    generic.prepare(src, tmp_path / "out", progress=False)
    expected = 0o666 & ~old
    for path in (tmp_path / "out" / "volumes" / "a.nii.gz", tmp_path / "out" / "pretrain_datalist.json"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))


def test_synthetic_keeps_a_users_luna16_files(tmp_path):
    from dira3d.data.synthetic import write_luna16_phantoms

    out = tmp_path / "LUNA16"
    out.mkdir()
    mine = "seriesuid,coordX,coordY,coordZ,class\nmine,1,2,3,0\n"
    (out / "candidates_V2.csv").write_text(mine)
    with pytest.raises(FileExistsError, match="candidates_V2.csv"):
        write_luna16_phantoms(out, count=1, size=(48, 48, 24))
    assert (out / "candidates_V2.csv").read_text() == mine and not list(out.glob("subset*"))
