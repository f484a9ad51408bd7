"""Bad files fed to a batch of inference (``--datalist``): each is named in one line, and nothing else is lost.

Each test failed before its fix: nibabel's message for a truncated NIfTI holds a newline, which broke the log line and
``inference_report.json``'s reason across lines; an entry listing two files for a one-channel bundle was refused as
"a 4D file?" naming the first file only; a file of random bytes came with six MONAI ``LoadImage - INFO ... unable to
load`` lines before dira3d's own; and in a batch of several inputs (``batch_size`` > 1) an input whose mask was written
before another input of its batch failed was reported ``failed`` next to its whole mask. A truncated NIfTI was named
with nibabel's rawer ``cannot be loaded (OSError: Expected ... bytes ...)``, the last reader MONAI tried, not with the
``is truncated or corrupt ...; download or copy the file again`` of dira3d's reader, which MONAI tried first.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import Compose

from dira3d.data.errors import DataError
from dira3d.engines.inputs import LoadVolumed
from dira3d.evaluation import SimpleITKReader, screen_inputs
from test_inference_batch import _failing_write, _report, _run, _scans
from test_inference_inputs import SEG3D, _nifti

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]  # tests/conftest.py


def _cut_nifti(path: Path, source: Path) -> Path:
    """``source``'s voxels cut to a quarter, in a whole gzip stream: nibabel reads the header and then finds
    the data short ("Expected ... bytes, got ... bytes from \\n - could the file be damaged?")."""
    raw = gzip.decompress(source.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 4]))
    return path


def _one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text


def test_a_truncated_nifti_is_left_out_with_a_one_line_reason(tmp_path, caplog):
    a, b = _scans(tmp_path, ["a", "b"])
    cut = _cut_nifti(tmp_path / "cut.nii.gz", b)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="dira3d.evaluation.batch"):
        assert _run("lits_liver_seg", tmp_path, [{"image": str(a)}, {"image": str(cut)}], out, **SEG3D) == [3]
    row = _report(out)["inputs"][1]
    assert row["status"] == "left out" and "could the file be damaged?" in row["reason"], row
    assert row["reason"].startswith(f"{cut}: is truncated or corrupt (") and "download or copy the file again" in row["reason"]
    assert _one_line(row["reason"]), row["reason"]
    lines = [r.getMessage() for r in caplog.records if r.name == "dira3d.evaluation.batch"]
    logged = [line for line in lines if str(cut) in line]
    assert logged and all(_one_line(line) for line in logged), logged


def test_the_loader_names_a_truncated_nifti_in_one_line(tmp_path):
    """The single input's ``error:`` line (no report) comes from this message: dira3d's own reader's, with its advice,
    not the ``cannot be loaded (OSError: Expected ... bytes ...)`` of nibabel, the reader MONAI tried last."""
    cut = _cut_nifti(tmp_path / "cut.nii.gz", _scans(tmp_path, ["a"])[0])
    with pytest.raises(DataError) as raised:
        LoadVolumed("image", reader=SimpleITKReader(), image_only=True)({"image": str(cut)})
    message = str(raised.value)
    assert message.startswith(f"{cut}: is truncated or corrupt (") and "could the file be damaged?" in message
    assert message.endswith("; download or copy the file again"), message
    assert _one_line(message), message
    assert raised.value.__cause__ is not None  # MONAI's own failure stays in the traceback


def test_a_file_no_reader_takes_keeps_the_loaders_message(tmp_path):
    """dira3d's reader gives no clearer error for random bytes: the loader's own message is kept."""
    noise = tmp_path / "noise.nii.gz"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError, match="cannot be read as an image by any reader"):
        LoadVolumed("image", reader=SimpleITKReader(), image_only=True)({"image": str(noise)})


class _Refuses:
    """A transform refusing every input with a reason of two lines, as a reader's message may be."""

    def __call__(self, data):
        raise DataError(data["image"], "got 32592 bytes from \n - could the file be damaged?")


def test_screened_reasons_are_one_line_whatever_the_error_holds(tmp_path):
    from dira3d.evaluation import CheckInferenceInputd

    left_out: dict[int, str] = {}
    good = _scans(tmp_path, ["good"])[0]

    class _RefusesBad(_Refuses):
        def __call__(self, data):
            return data if data["image"] == str(good) else super().__call__(data)

    head = Compose([_RefusesBad(), CheckInferenceInputd("absent", allow_missing_keys=True)])
    with pytest.warns(Warning) as warned:
        kept = screen_inputs([{"image": "bad.nii.gz"}, {"image": str(good)}], head, left_out=left_out)
    assert kept == [{"image": str(good)}]
    assert left_out == {0: "bad.nii.gz: got 32592 bytes from - could the file be damaged?"}
    assert all(_one_line(str(w.message)) for w in warned)


def test_an_entry_listing_two_files_for_a_one_channel_bundle_says_so(tmp_path):
    a, b, c = _scans(tmp_path, ["a", "b", "c"])
    out = tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, [{"image": str(a)}, {"image": [str(b), str(c)]}], out, **SEG3D) == [3]
    row = _report(out)["inputs"][1]
    assert row["status"] == "left out" and row["image"] == [str(b), str(c)]
    assert row["reason"].startswith(f"{b}: is the first of 2 files its entry lists")
    assert "this bundle takes 1 channel: list one file in each entry" in row["reason"]
    assert "4D" not in row["reason"], row["reason"]


def test_a_4d_file_is_still_asked_whether_it_is_one(tmp_path):
    """A single file of two channels is not an entry of two files: its advice is kept."""
    from dira3d.evaluation import check_inference_input

    from monai.transforms import EnsureChannelFirstd

    ct = np.random.default_rng(0).normal(0, 300, (32, 32, 16, 2))
    ct[:4] = -1024
    four = _nifti(tmp_path / "four.nii.gz", ct)
    loaded = EnsureChannelFirstd("image")(LoadVolumed("image", reader=SimpleITKReader(), image_only=True)(
        {"image": str(four)}))
    with pytest.raises(DataError, match="has 2 channels .* a 4D file"):
        check_inference_input(loaded["image"], four, channels=1, takes="ct")


def _unable_to_load(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "LoadImage" and "unable to load" in r.getMessage()]


def test_a_file_of_random_bytes_is_named_once_without_monai_reader_lines(tmp_path, caplog):
    noise = tmp_path / "noise.nii.gz"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    load = LoadVolumed("image", reader=SimpleITKReader(), image_only=True)
    with caplog.at_level(logging.INFO, logger="LoadImage"), pytest.raises(DataError, match=f"{noise}: cannot be read"):
        load({"image": str(noise)})
    assert _unable_to_load(caplog) == []
    assert not logging.getLogger("LoadImage").filters, "the logger is left as it was"


def test_reader_lines_stay_when_a_later_reader_loads_the_file(tmp_path, caplog):
    """Nothing dira3d does not replace is hidden: a file SimpleITK cannot read but MONAI's NumpyReader can."""
    volume = tmp_path / "volume.npy"
    np.save(volume, np.zeros((4, 4, 4), np.float32))
    with caplog.at_level(logging.INFO, logger="LoadImage"):
        loaded = LoadVolumed("image", reader=SimpleITKReader(), image_only=True)({"image": str(volume)})
    assert tuple(loaded["image"].shape) == (4, 4, 4)
    assert any(line.startswith("SimpleITKReader: unable to load") for line in _unable_to_load(caplog))


def test_in_a_batch_of_two_an_input_written_before_the_other_failed_is_written(tmp_path, monkeypatch):
    a, b, c, d = _scans(tmp_path, ["a", "b", "c", "d"])
    _failing_write(monkeypatch, "b", errno.EIO)  # a's mask is written, then b's write fails in the same batch
    out = tmp_path / "out"
    result = _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in (a, b, c, d)], out,
                  **SEG3D, **{"dataloader#batch_size": 2})
    assert result == [3]
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "c_seg.nii.gz", "d_seg.nii.gz",
                                                     "inference_report.json"]
    rows = _report(out)["inputs"]
    assert [r["status"] for r in rows] == ["written", "failed", "written", "written"], rows
    assert rows[0]["output"] == str(out / "a_seg.nii.gz")
    assert os.path.getsize(out / "a_seg.nii.gz") > 0
