"""A failed batch of several inputs (``--dataloader#batch_size`` above 1) runs its inputs not written yet again one at a
time (found in session 22, closed in session 23).

One input failing failed the whole collated batch: every input of it not written yet was ``failed`` with the failing
input's reason, though the others would have run. Now only the input that fails on its own is ``failed``, with its own
reason, and the others are ``written``, with the prediction a batch of one gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_inference_batch import _report, _run, _scans
from test_inference_inputs import SEG3D, _nifti

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]  # tests/conftest.py


def _model_fails_on(monkeypatch, errors: dict[str, str]) -> list[list[str]]:
    """The model run fails on a batch holding an input named in ``errors`` (``{file name: message}``), with the message
    of the first such input: as out of GPU memory on one large scan fails its whole batch. Returns the batches run (the
    file names of each)."""
    from monai.engines import SupervisedEvaluator

    iteration, seen = SupervisedEvaluator._iteration, []

    def run(self, engine, batchdata):
        names = [Path(str(f)).name for f in batchdata["image"].meta["filename_or_obj"]]
        seen.append(names)
        for name in names:
            if name in errors:
                raise RuntimeError(errors[name])
        return iteration(self, engine, batchdata)

    monkeypatch.setattr(SupervisedEvaluator, "_iteration", run)
    return seen


def test_only_the_failing_input_of_a_batch_fails_with_its_own_reason(tmp_path, monkeypatch):
    scans = _scans(tmp_path, ["a", "b", "c", "d", "e"])
    entries = [{"image": str(p)} for p in scans]
    alone = tmp_path / "alone"  # each input as a batch of one, for the masks to compare with
    assert _run("lits_liver_seg", tmp_path, entries, alone, **SEG3D) == [0]
    seen = _model_fails_on(monkeypatch, {"a.nii.gz": "CUDA out of memory on a", "d.nii.gz": "CUDA out of memory on d"})
    out = tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, entries, out, **SEG3D, **{"dataloader#batch_size": 2}) == [3]
    rows = _report(out)["inputs"]
    assert [r["status"] for r in rows] == ["failed", "written", "written", "failed", "written"], rows
    assert rows[0]["reason"] == "RuntimeError: CUDA out of memory on a"
    assert rows[3]["reason"] == "RuntimeError: CUDA out of memory on d", "its own reason, not its batch's first"
    # the batches as loaded, then each input of a failed batch alone
    assert seen == [["a.nii.gz", "b.nii.gz"], ["a.nii.gz"], ["b.nii.gz"], ["c.nii.gz", "d.nii.gz"], ["c.nii.gz"],
                    ["d.nii.gz"], ["e.nii.gz"]]
    assert sorted(p.name for p in out.iterdir()) == ["b_seg.nii.gz", "c_seg.nii.gz", "e_seg.nii.gz",
                                                     "inference_report.json"]
    for name in ("b_seg.nii.gz", "c_seg.nii.gz", "e_seg.nii.gz"):  # the mask of the input run alone: inverted as well
        written, expected = nib.load(str(out / name)), nib.load(str(alone / name))
        assert np.array_equal(written.get_fdata(), expected.get_fdata()), name
        assert np.allclose(written.affine, expected.affine), name


def test_a_batch_that_fails_again_for_each_input_stops_after_the_repeated_failures(tmp_path, monkeypatch):
    """A model that does not fit the inputs fails every batch and every input alone: the stop after 3 inputs in a row
    counts the inputs run alone (the failed batch is not counted twice), and the input of a failed batch not tried alone
    is ``not run``."""
    scans = _scans(tmp_path, ["a", "b", "c", "d", "e"])
    wrong = "expected input[1, 2, 32, 32, 16] to have 1 channels"
    seen = _model_fails_on(monkeypatch, {p.name: wrong for p in scans})
    out = tmp_path / "out"
    from dira3d.evaluation.batch import RepeatedFailureError

    with pytest.raises(Exception) as raised:
        _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in scans], out, **SEG3D,
             **{"dataloader#batch_size": 2})
    error = raised.value
    while error is not None and not isinstance(error, RepeatedFailureError):
        error = error.__cause__
    assert error is not None and str(error).startswith("the batch stops: 3 inputs in a row failed"), repr(raised.value)
    assert seen == [["a.nii.gz", "b.nii.gz"], ["a.nii.gz"], ["b.nii.gz"], ["c.nii.gz", "d.nii.gz"], ["c.nii.gz"]]
    report = _report(out)
    assert [r["status"] for r in report["inputs"]] == ["failed"] * 3 + ["not run"] * 2
    assert "the other 2 inputs are not run" in report["stopped"]


def test_a_classification_batch_writes_the_probabilities_of_the_others(tmp_path, monkeypatch):
    """The probabilities of the inputs run alone reach the bundle's ``_prob.json`` as a batch's do."""
    rng = np.random.default_rng(0)
    cubes = [_nifti(tmp_path / f"cand{i}.nii.gz", rng.random((16, 16, 8))) for i in range(4)]
    entries, settings = [{"image": str(p)} for p in cubes], {"width": 0.125, "roi_size": [16, 16, 8]}
    alone = tmp_path / "alone"
    alone.mkdir()
    assert _run("luna16_nodule_fpr", tmp_path, entries, alone, **settings) == [0]
    _model_fails_on(monkeypatch, {"cand1.nii.gz": "CUDA out of memory"})
    out = tmp_path / "out"
    out.mkdir()
    assert _run("luna16_nodule_fpr", tmp_path, entries, out, **settings, **{"dataloader#batch_size": 2}) == [3]
    assert [r["status"] for r in _report(out)["inputs"]] == ["written", "failed", "written", "written"]
    expected = json.loads((alone / "prob.json").read_text())["predictions"]
    written = json.loads((out / "prob.json").read_text())["predictions"]
    assert [p["image"] for p in written] == [str(cubes[i]) for i in (0, 2, 3)]
    assert np.allclose([p["probabilities"] for p in written], [expected[i]["probabilities"] for i in (0, 2, 3)],
                       rtol=1e-5, atol=0)


def test_a_batch_that_fails_after_writing_all_its_inputs_runs_none_again(tmp_path, monkeypatch, caplog):
    """A failure after the predictions of every input of the batch were written (a handler after the saver): each is
    ``written`` (its file is whole), none is run again, and no line says "its 0 input(s) not written are run again"."""
    import logging

    from monai.engines import SupervisedEvaluator

    scans = _scans(tmp_path, ["a", "b", "c"])
    iteration, seen = SupervisedEvaluator._iteration, []

    def run(self, engine, batchdata):
        names = [Path(str(f)).name for f in batchdata["image"].meta["filename_or_obj"]]
        seen.append(names)
        output = iteration(self, engine, batchdata)  # the saver wrote the batch's masks
        if "a.nii.gz" in names:
            raise RuntimeError("a handler after the saver failed")
        return output

    monkeypatch.setattr(SupervisedEvaluator, "_iteration", run)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in scans], out, **SEG3D,
                    **{"dataloader#batch_size": 2}) == [0]
    assert [r["status"] for r in _report(out)["inputs"]] == ["written"] * 3
    assert seen == [["a.nii.gz", "b.nii.gz"], ["c.nii.gz"]]  # nothing run again
    assert "run again one at a time" not in caplog.text
