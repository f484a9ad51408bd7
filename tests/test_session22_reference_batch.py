"""Reference check of the in-flight detection of a batch inference (dira3d.evaluation.batch, session 22 mutation
audit): a rerun's prediction renamed over the earlier run's before an interrupt is ``written``, also when the two
files have the same size (the same model on the same scan writes the same bytes): the file there is another one."""

from __future__ import annotations

import pytest

from test_inference_batch import _report, _run  # the bundle run helpers, as test_inference_signals uses them
from test_inference_signals import _interrupt_after, _raw_ct

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]


def test_a_rerun_interrupted_after_a_same_size_prediction_was_renamed_reports_it_written(tmp_path, monkeypatch):
    scans = [_raw_ct(tmp_path / f"{name}.nii.gz") for name in ("a", "b")]
    datalist, out = [{"image": str(p)} for p in scans], tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, datalist, out) == [0]
    earlier = (out / "b_seg.nii.gz").stat()
    with monkeypatch.context() as patch:
        _interrupt_after(patch, "rename", "b")
        with pytest.raises(KeyboardInterrupt):
            _run("lits_liver_seg", tmp_path, datalist, out)
    now = (out / "b_seg.nii.gz").stat()
    assert now.st_size == earlier.st_size and now.st_ino != earlier.st_ino  # the premise: another file, same size
    assert [r["status"] for r in _report(out)["inputs"]] == ["written", "written"]


def test_four_bad_listed_entries_name_three_and_one_more():
    from dira3d.data.errors import DataError
    from dira3d.evaluation.batch import batch_entries

    with pytest.raises(DataError, match=r"entry 2 \(\{\}\) has no 'image' and 1 more; --datalist takes"):
        batch_entries([{}, {}, {}, {}])
