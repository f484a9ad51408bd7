"""Data preparation against the house rule: bad input is a clear error naming the file, a batch goes
on with the good cases, nothing the user had is overwritten or lost.

Each test here failed before its fix: ITK's NIfTI reader zero-fills truncated files, reads NaN as 0
and repairs a zero pixdim; ``generic`` dropped one of two inputs with the same case id, re-ingested
its own outputs when ``--dst`` lies inside ``--src`` and missed DICOM folders whose first five files
are not DICOM; an unwritable ``--dst`` was a traceback; atomic writes left every output 0600;
``dira3d synthetic`` overwrote a user's candidates CSV; a rerun with another ``--src`` replaced the
datalist and ``--report`` any file; a mask without its image stopped the batch; a truncated DICOM
slice was reported only as a missing slice; a second DICOM series was dropped without a note."""

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
from conftest import write_dicom_series

from dira3d.data import generic
from dira3d.data.io import DataError, DataWarning, image_to_xyz, read_image


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
    # a failed case naming both files (the other cases go on with --keep-going)
    assert generic.main(["--src", str(src), "--dst", str(tmp_path / "strict")]) == 1
    code = generic.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--keep-going"])
    err = capsys.readouterr().err
    assert code == 0 and "FAILED a:" in err and "a.nii.gz" in err and "a.nrrd" in err and "same case id" in err
    assert json.loads((tmp_path / "out" / "pretrain_datalist.json").read_text())["training"] == []
    (src / "a.nrrd").unlink()

    # a DICOM series folder with notes sorted before the slices is still found
    write_dicom_series(src / "series", np.zeros((12, 10, 4), np.int16))
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
    assert "Traceback" not in err and str(blocker / "out") in err and "is not writable" in err
    assert err.startswith("dira3d prepare generic: error: ")  # as every dira3d command says it
    assert blocker.read_text() == "not a folder"
    if os.name == "posix" and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert generic.main(["--src", str(src), "--dst", str(locked), "--keep-going"]) == 2
            assert "is not writable" in capsys.readouterr().err
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


def test_rerun_with_another_src_or_onto_a_user_file_is_refused(tmp_path, capsys):
    """A rerun into the same --dst with another --src used to replace the datalist (and list the old
    source's volumes as 'skipped'); --report PATH replaced whatever file was at PATH."""
    first, second, dst = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    for src in (first, second):
        src.mkdir()
        _ct(src / "a.nii.gz")
    datalist = dst / "pretrain_datalist.json"
    assert generic.main(["--src", str(first), "--dst", str(dst)]) == 0
    assert generic.main(["--src", str(first), "--dst", str(dst)]) == 0  # same source: incremental
    assert "1 skipped" in capsys.readouterr().out
    before = datalist.read_bytes()
    assert generic.main(["--src", str(second), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert str(datalist) in err and str(first.resolve()) in err and "--overwrite" in err and "another --dst" in err
    assert datalist.read_bytes() == before
    assert generic.main(["--src", str(second), "--dst", str(dst), "--overwrite"]) == 0
    meta = json.loads(datalist.read_text())["meta"]
    assert meta["source"] == str(second.resolve())

    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert generic.main(["--src", str(second), "--dst", str(dst), "--report", str(notes)]) == 2
    assert str(notes) in capsys.readouterr().err and notes.read_text() == '{"mine": 1}'
    assert generic.main(["--src", str(second), "--dst", str(dst), "--report", str(dst / "report.json")]) == 0

    # an earlier run that stopped before its datalist is recognised by its report
    broken = tmp_path / "broken"
    broken.mkdir()
    _truncate(_ct(broken / "a.nii.gz"))
    _ct(broken / "b.nii.gz")  # cancelled: no datalist is written
    assert generic.main(["--src", str(broken), "--dst", str(tmp_path / "out2")]) == 1
    assert not (tmp_path / "out2" / "pretrain_datalist.json").exists()
    assert generic.main(["--src", str(first), "--dst", str(tmp_path / "out2")]) == 2
    assert "report.json" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    """A rerun into the same --dst with another --spacing / --modality / --window skipped every case
    (outputs exist) and rewrote the datalist, whose meta then claimed settings its volumes were not made with."""
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _ct(src / "a.nii.gz")
    datalist = dst / "pretrain_datalist.json"
    assert generic.main(["--src", str(src), "--dst", str(dst), "--spacing", "3", "3", "5"]) == 0
    assert generic.main(["--src", str(src), "--dst", str(dst), "--spacing", "3.0", "3", "5"]) == 0  # same: incremental
    capsys.readouterr()
    before = datalist.read_bytes()
    for other in (["--spacing", "2", "2", "5"], [], ["--spacing", "3", "3", "5", "--modality", "mr"],
                  ["--spacing", "3", "3", "5", "--window", "-1350", "150"]):
        assert generic.main(["--src", str(src), "--dst", str(dst), *other]) == 2, other
        err = capsys.readouterr().err
        assert str(datalist) in err and "--overwrite" in err and "another --dst" in err, err
        assert datalist.read_bytes() == before
        if other == ["--spacing", "2", "2", "5"]:
            assert "spacing [3.0, 3.0, 5.0] (now [2.0, 2.0, 5.0])" in err
    assert generic.main(["--src", str(src), "--dst", str(dst), "--spacing", "2", "2", "5", "--overwrite"]) == 0
    assert json.loads(datalist.read_text())["meta"]["spacing"] == [2.0, 2.0, 5.0]
    assert sitk.ReadImage(str(dst / "volumes" / "a.nii.gz")).GetSpacing() == (2.0, 2.0, 5.0)
    # a run that stopped before its datalist is recognised by the settings in its report
    datalist.unlink()
    assert generic.main(["--src", str(src), "--dst", str(dst), "--spacing", "3", "3", "5"]) == 2
    assert "report.json" in capsys.readouterr().err


def test_generic_mask_without_image_fails_its_case_only(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _ct(src / "a.nii.gz")
    _ct(src / "b_label.nii.gz")  # no b.nii.gz: this used to stop the whole batch
    assert generic.main(["--src", str(src), "--dst", str(tmp_path / "strict"), "--label-suffix", "_label"]) == 1
    dst = tmp_path / "out"
    assert generic.main(["--src", str(src), "--dst", str(dst), "--label-suffix", "_label", "--keep-going"]) == 0
    assert "FAILED b:" in capsys.readouterr().err
    cases = {c["case_id"]: c for c in json.loads((dst / "report.json").read_text())["cases"]}
    assert cases["a"]["status"] == "written"
    assert cases["b"]["status"] == "failed" and "b_label.nii.gz" in cases["b"]["reason"]
    assert "no matching image" in cases["b"]["reason"]


def test_truncated_dicom_slice_is_named(tmp_path):
    """GDCM leaves an unreadable slice out of the series: the error said only 'a slice is missing'."""
    folder = tmp_path / "series"
    write_dicom_series(folder, np.zeros((16, 12, 6), np.int16))
    (folder / "notes.txt").write_text("not DICOM")
    cut = folder / "slice002.dcm"  # z = 104 mm
    cut.write_bytes(cut.read_bytes()[:400])
    with pytest.raises(DataError, match=r"104\.00 mm is missing; 1 file\(s\) .*series.*: slice002\.dcm;"):
        read_image(folder)
    # a truncated last slice leaves no gap: the volume is read, with a warning naming the file
    write_dicom_series(tmp_path / "end", np.zeros((16, 12, 6), np.int16))
    cut = tmp_path / "end" / "slice005.dcm"
    cut.write_bytes(cut.read_bytes()[:400])
    with pytest.warns(DataWarning, match=r"slice005\.dcm"):
        assert read_image(tmp_path / "end").GetSize() == (16, 12, 5)


def test_second_dicom_series_is_a_warning_in_the_report(tmp_path, capsys):
    """A smaller second series in the folder used to be dropped without a word."""
    src = tmp_path / "src"
    src.mkdir()
    folder = src / "ct"
    write_dicom_series(folder, np.zeros((16, 12, 6), np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, path in enumerate(sorted(folder.glob("slice*.dcm"))[:2]):  # a 2-file 'scout' series
        image = sitk.ReadImage(str(path))
        image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.9")
        image.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.9.{k + 1}")
        writer.SetFileName(str(folder / f"scout{k}.dcm"))
        writer.Execute(image)
    dst = tmp_path / "out"
    assert generic.main(["--src", str(src), "--dst", str(dst)]) == 0
    assert "WARNING ct:" in capsys.readouterr().err
    case = json.loads((dst / "report.json").read_text())["cases"][0]
    assert case["status"] == "written" and len(case["warnings"]) == 1
    assert "1.2.826.0.1.3680043.2.1125.9 (2 file(s))" in case["warnings"][0]
    assert "1.2.826.0.1.3680043.2.1125.2 (6 files)" in case["warnings"][0]
    assert sitk.ReadImage(str(dst / "volumes" / "ct.nii.gz")).GetSize()[2] == 6


def test_two_equally_large_dicom_series_say_which_was_read_and_how_to_choose(tmp_path):
    """Two reconstructions of one scan (same number of files): the warning said 'read the largest', which neither
    is, and which one was read followed GDCM's listing order. Now the first by series UID, said so, with the fix."""
    folder = tmp_path / "ct"
    write_dicom_series(folder, np.full((16, 12, 6), 7, np.int16), series_uid="1.2.826.0.1.3680043.2.1125.8")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, path in enumerate(sorted(folder.glob("slice*.dcm"))):  # a second kernel, UID sorting before the first
        image = sitk.ReadImage(str(path))
        image = sitk.Cast(image * 0 + 3, image.GetPixelID())
        for key in ("0008|0060", "0020|000d", "0020|0037", "0028|0030", "0020|0013", "0020|0032"):
            image.SetMetaData(key, sitk.ReadImage(str(path)).GetMetaData(key))
        image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.10")
        image.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.10.{k + 1}")
        writer.SetFileName(str(folder / f"lung{k}.dcm"))
        writer.Execute(image)
    with pytest.warns(DataWarning) as caught:
        image = read_image(folder)
    text = str(caught[0].message)
    assert "2 series have 6 files each" in text and "read the first by series UID, 1.2.826.0.1.3680043.2.1125.10" in text
    assert "left out 1.2.826.0.1.3680043.2.1125.8 (6 file(s))" in text and "put each series in its own folder" in text
    assert "the largest" not in text
    assert np.all(image_to_xyz(image) == 3)  # the series named, not the other


def test_a_mask_among_the_scans_is_named_not_normalised(tmp_path, capsys):
    """Without --label-suffix a mask is just another input: it used to become a flat 'scan'."""
    src = tmp_path / "src"
    src.mkdir()
    _ct(src / "a.nii.gz")
    mask = np.zeros((8, 12, 12), np.uint8)
    mask[2:5, 3:7, 3:7] = 1
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(src / "a_seg.nii.gz"))
    assert generic.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--keep-going"]) == 0
    err = capsys.readouterr().err
    assert "a_seg.nii.gz" in err and "2 distinct values (0, 1): it looks like a mask" in err and "--label-suffix" in err, err
    assert [p.name for p in (tmp_path / "out" / "volumes").iterdir()] == ["a.nii.gz"]


def test_a_volume_itk_writes_only_in_part_fails_its_case_and_is_redone(tmp_path, monkeypatch, capsys):
    """On a full disk ITK's NIfTI writer prints "NWAD: wrote only 0 of N bytes" and returns without an
    error: the short file was renamed into place, so the case counted as written and every rerun skipped it."""
    from dira3d.data import io

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        _ct(src / f"{name}.nii.gz", shape=(8, 40, 40))
    real_write = io.sitk.WriteImage

    def full_disk(image, path, *args, **kwargs):  # what ITK leaves behind on ENOSPC
        real_write(image, path, *args, **kwargs)
        if Path(path).name.startswith(".b.nii.gz."):
            _truncate(Path(path))

    monkeypatch.setattr(io.sitk, "WriteImage", full_disk)
    dst = tmp_path / "out"
    assert generic.main(["--src", str(src), "--dst", str(dst), "--keep-going"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"FAILED b: \S*b\.nii\.gz could not be written completely .*disk is probably full.*free space", err), err
    assert (dst / "volumes" / "a.nii.gz").is_file() and not (dst / "volumes" / "b.nii.gz").exists()
    assert not [p.name for p in (dst / "volumes").iterdir() if p.name.startswith(".")]  # no temporary file left
    monkeypatch.setattr(io.sitk, "WriteImage", real_write)  # space freed: the rerun writes b, keeps a
    assert generic.main(["--src", str(src), "--dst", str(dst)]) == 0
    assert "1 written, 1 skipped" in capsys.readouterr().out
    assert read_image(dst / "volumes" / "b.nii.gz").GetSize() == (40, 40, 8)


def test_a_rerun_removes_the_temporary_files_a_killed_run_left_and_nothing_else(tmp_path, capsys):
    """A process killed inside an atomic write leaves its hidden temporary file (a whole CT volume, for a
    volume); reruns skipped them forever. Under the --dst lock a rerun removes them, and only them."""
    import subprocess

    src, dst = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 16, 16), 500, np.float32)), str(src / "case0.nii.gz"))
    generic.prepare(src, dst, modality="mr", val_fraction=0.0, progress=False)
    killed = (  # as SIGKILL inside a write: no exception handler runs, the temporary file stays
        "import os, sys\nfrom dira3d.utils.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1], suffix=sys.argv[2]) as tmp:\n    tmp.write_bytes(b'half')\n    os._exit(9)\n"
    )
    for target, suffix in ((dst / "volumes" / "case1.nii.gz", ".nii.gz"), (dst / "pretrain_datalist.json", ".tmp")):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        assert subprocess.run([sys.executable, "-c", killed, str(target), suffix], env=env).returncode == 9
    left = sorted(p.name for p in dst.rglob(".*.*.*"))
    assert [re.sub(r"\.[a-z0-9_]{8}\.", ".XXXXXXXX.", name) for name in left] == [
        ".case1.nii.gz.XXXXXXXX.nii.gz", ".pretrain_datalist.json.XXXXXXXX.tmp"]
    (dst / ".my_notes.txt").write_text("the user's")  # hidden files of the user's own are kept
    (dst / "volumes" / ".case0.nii.gz.backup").write_text("the user's")
    capsys.readouterr()
    generic.prepare(src, dst, modality="mr", val_fraction=0.0, progress=False)
    assert "removed 2 half-written temporary file(s) an interrupted run left in" in capsys.readouterr().err
    assert sorted(p.name for p in dst.rglob(".*") if p.name != ".dira3d.lock") == [".case0.nii.gz.backup", ".my_notes.txt"]


def _fails_in_two_lines(case):
    raise RuntimeError("Exception thrown in SimpleITK Execute:\n sitk::ERROR: the resampler failed")


def test_a_failed_case_reason_is_one_line_in_the_report(tmp_path):
    """A library's message may hold line breaks (SimpleITK's, nibabel's "...\\n - could the file be damaged?"): the
    report's reason and the FAILED line were split across lines."""
    from dira3d.data.runner import Case, run_cases

    out = tmp_path / "out"
    results = run_cases([Case("a", [out / "a.nii.gz"], {})], _fails_in_two_lines, out_dir=out, keep_going=True,
                        progress=False)
    reason = json.loads((out / "report.json").read_text())["cases"][0]["reason"]
    assert results[0].status == "failed" and reason == results[0].reason
    assert reason == "RuntimeError: Exception thrown in SimpleITK Execute: sitk::ERROR: the resampler failed"
