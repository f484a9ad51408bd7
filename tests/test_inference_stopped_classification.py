"""A classification batch in one process that is stopped keeps the rows of the inputs it ran (session 28's walk).

The classification bundles write one ``_prob.json`` of every input, and one process wrote it only when the batch
ended: ``python -m monai.bundle run ... luna16_nodule_fpr/configs/inference.json --datalist`` (49 prepared cubes)
stopped by SIGTERM after 11 of them wrote no file, reported the 11 as ``failed`` ("the batch stopped before
prob.json was written"), and the rerun with ``--skip_written True`` kept none of them and ran all 49 again. The stopped
batch now writes the file with the rows of the inputs it ran (and kept), so the rerun runs only the others and its
file equals a run in one go (:func:`dira3d.evaluation.batch_resume.write_stopped_rows`); an earlier file holding rows
this stopped run did not reach is left as it was. Tiny untrained networks, as in ``tests/test_inference_batch.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from dira3d.evaluation import ProbabilityWriter
from dira3d.evaluation.outputs import is_own_prediction
from test_inference_batch import _report, _run
from test_inference_inputs import CLS3D, _nifti
from test_inference_skip_written import _run_on

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]  # tests/conftest.py

BUNDLE = "luna16_nodule_fpr"


def _cubes(tmp_path: Path, names: str) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": str(_nifti(tmp_path / f"{name}.nii.gz", rng.random((16, 16, 8))))} for name in names]


def _stop_at(monkeypatch, stem: str, before_row: bool) -> None:
    """Ctrl-C when the writer takes the row of ``<stem>.nii.gz``: after it took it, or just before (the model has run on
    the input and the batch recorded it, but the row is not in the writer yet)."""
    collect = ProbabilityWriter._collect

    def collected(self, engine):
        mine = any(Path(source).name == f"{stem}.nii.gz" for source, _ in self.output_transform(engine.state.output))
        if mine and before_row:
            raise KeyboardInterrupt
        collect(self, engine)
        if mine:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProbabilityWriter, "_collect", collected)


def _names(out: Path) -> list[str]:
    return [Path(p["image"]).name for p in json.loads((out / "prob.json").read_text())["predictions"]]


@pytest.mark.parametrize(("before_row", "written"), [(False, ["a", "b"]), (True, ["a"])])
def test_a_stopped_classification_batch_writes_the_rows_it_ran_and_a_rerun_keeps_them(tmp_path, monkeypatch, caplog,
                                                                                      before_row, written):
    datalist, out, whole = _cubes(tmp_path, "abcde"), tmp_path / "out", tmp_path / "whole"
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="dira3d"):
        _stop_at(patch, "b", before_row)
        with pytest.raises(KeyboardInterrupt):
            _run(BUNDLE, tmp_path, datalist, out, **CLS3D)
    assert is_own_prediction(out / "prob.json") and _names(out) == [f"{n}.nii.gz" for n in written]
    report = _report(out)
    assert [r["status"] for r in report["inputs"]] == ["written"] * len(written) + ["not run"] * (5 - len(written))
    assert all(r["output_state"] for r in report["inputs"][:len(written)])
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("inference interrupted")][-1]
    assert f"{out / 'prob.json'} holds the rows of the {len(written)} input(s) written" in line
    assert "--skip_written True" in line
    seen = _run_on(monkeypatch)
    assert _run(BUNDLE, tmp_path, datalist, out, skip_written=True, **CLS3D) == [0]
    assert seen == [f"{verb} {n}.nii.gz" for verb in ("read", "run") for n in "abcde" if n not in written]
    assert _run(BUNDLE, tmp_path, datalist, whole, **CLS3D) == [0]
    resumed, one_go = (json.loads((d / "prob.json").read_text()) for d in (out, whole))
    assert resumed["predictions"] == one_go["predictions"]
    assert [r.get("skipped", False) for r in _report(out)["inputs"]] == [n in written for n in "abcde"]


def test_a_skip_written_rerun_stopped_again_keeps_the_earlier_rows_and_its_own(tmp_path, monkeypatch):
    datalist, out = _cubes(tmp_path, "abcde"), tmp_path / "out"
    for stem, skip in (("b", False), ("d", True)):
        with monkeypatch.context() as patch:
            _stop_at(patch, stem, before_row=False)
            with pytest.raises(KeyboardInterrupt):
                _run(BUNDLE, tmp_path, datalist, out, skip_written=skip, **CLS3D)
    assert _names(out) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"]
    assert [(r["status"], r.get("skipped", False)) for r in _report(out)["inputs"]] == [
        ("written", True), ("written", True), ("written", False), ("written", False), ("not run", False)]
    seen = _run_on(monkeypatch)
    assert _run(BUNDLE, tmp_path, datalist, out, skip_written=True, **CLS3D) == [0]
    assert seen == ["read e.nii.gz", "run e.nii.gz"] and len(_names(out)) == 5


@pytest.mark.parametrize("earlier_settings", [{}, {"intensity_range": None}])
def test_a_stopped_rerun_leaves_an_earlier_file_with_rows_it_did_not_reach(tmp_path, monkeypatch, caplog,
                                                                         earlier_settings):
    """A rerun without --skip_written (every input run again) stopped after b: writing the rows of a and b would lose
    the earlier run's rows of c, d and e. The earlier file stays, byte for byte. Made by the same model and settings
    (the earlier report says so, read before the new one replaces it), its rows are kept in the new report (written,
    skipped), and the stop line says the file holds them: a rerun with --skip_written True runs no input. The new
    report said a and b failed and the others not run, so that rerun ran every input again though the file held their
    rows. Made with other settings (intensity_range), the rows are not this run's: nothing is kept."""
    datalist, out = _cubes(tmp_path, "abcde"), tmp_path / "out"
    assert _run(BUNDLE, tmp_path, datalist, out, **{**CLS3D, **earlier_settings}) == [0]
    earlier = (out / "prob.json").read_bytes()
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="dira3d"):
        _stop_at(patch, "b", before_row=False)
        with pytest.raises(KeyboardInterrupt):
            _run(BUNDLE, tmp_path, datalist, out, **CLS3D)
    assert (out / "prob.json").read_bytes() == earlier
    lines = [r.getMessage() for r in caplog.records]
    assert any("is left as it was: it holds rows of inputs that this stopped run did not reach" in m for m in lines)
    stop = [m for m in lines if m.startswith("inference interrupted")][-1]
    if earlier_settings:
        assert [r["status"] for r in _report(out)["inputs"]] == ["failed", "failed", "not run", "not run", "not run"]
        assert stop.endswith(f"nothing was written to {out / 'prob.json'}; report: {out / 'inference_report.json'}; run "
                             "the same command again for every input (it replaces dira3d's own earlier predictions)")
        return
    assert [(r["status"], r.get("skipped")) for r in _report(out)["inputs"]] == [("written", True)] * 5
    assert (f"nothing was written to {out / 'prob.json'}; it still holds the rows of the 5 input(s) written, by an "
            "earlier run with the same model and settings, which the report keeps; report: ") in stop
    assert stop.endswith("run the same command again with --skip_written True to run only the inputs not written "
                         "(without it, every input is run again)")
    assert any(m.startswith("inference: 5 of 5 inputs written, 5 of them kept from the earlier run") for m in lines)
    seen = _run_on(monkeypatch)
    assert _run(BUNDLE, tmp_path, datalist, out, skip_written=True, **CLS3D) == [0]
    assert seen == [] and json.loads((out / "prob.json").read_text())["predictions"] == json.loads(earlier)["predictions"]


@pytest.mark.parametrize(("stop_at", "code", "fix"), [
    ("c", errno.ENOSPC, "free space on that disk or raise your quota"),  # Ctrl-C in c, then a full disk
    (None, errno.EROFS, "make {folder} writable"),  # every input run, the folder made read-only meanwhile
])
def test_rows_a_stopped_batch_cannot_write_are_said_lost_in_one_line(tmp_path, monkeypatch, caplog, stop_at, code, fix):
    """The batch's prob.json cannot be written (a full disk, a folder made read-only: the writer fails; we run as root,
    so a chmod would not stop the write): the summary printed one ``failed:`` line per input run, each saying "the batch
    stopped before prob.json was written: interrupted (Ctrl-C)", without the error. Now one line says how many rows
    were lost, the error naming the file and what to do; the report's rows name the error too."""
    datalist, out = _cubes(tmp_path, "abcde"), tmp_path / "out"
    target = out / "prob.json"
    error = OSError(code, os.strerror(code), str(target))

    def write(self, rows):
        raise error

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="dira3d"):
        if stop_at:
            _stop_at(patch, stop_at, before_row=False)
        patch.setattr(ProbabilityWriter, "write", write)
        with pytest.raises(KeyboardInterrupt if stop_at else RuntimeError):  # (MONAI wraps the OSError)
            _run(BUNDLE, tmp_path, datalist, out, **CLS3D)
    assert not target.exists()
    run = "abc" if stop_at else "abcde"
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed:")]
    assert len(failed) == 1, failed
    names = ", ".join(str(tmp_path / f"{n}.nii.gz") for n in run[:3]) + ("" if stop_at else f", ... {tmp_path / 'e.nii.gz'}")
    assert failed[0].startswith(f"failed: the rows of {len(run)} inputs run ({names}) are lost, not in {target}: "), failed
    assert f"OSError: [Errno {code}] {os.strerror(code)}: '{target}'" in failed[0]
    assert failed[0].endswith(f"; {fix.format(folder=out)}, or pass --output_path with another file; then run the same "
                              "command again to run them again")
    report = _report(out)["inputs"]
    assert [r["status"] for r in report] == ["failed"] * len(run) + ["not run"] * (5 - len(run))
    assert all(f"[Errno {code}]" in r["reason"] for r in report[:len(run)])
    if stop_at:
        line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("inference interrupted")][-1]
        assert f"nothing was written to {target} (OSError: [Errno {code}]" in line
