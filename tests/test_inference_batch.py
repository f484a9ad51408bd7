"""A batch of inputs at inference (``--datalist``) accounts for every input: a report next to the outputs and an
exit status a script can test.

Before, the inputs left out at the input check were only named in warnings among the log lines of an overnight
run, nothing was written to say what was done, and ``python -m monai.bundle run`` exited 0 whether 200 or 199
masks were written; an error of one input in the model run or while its mask was written (out of GPU memory on
one large scan, an I/O error) stopped the whole batch, and a classification batch then wrote no probabilities at
all. Tiny untrained networks: the inputs only need to run.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dira3d.evaluation.finetune import bundle_path
from dira3d.evaluation.outputs import is_own_prediction
from test_inference_inputs import SEG3D, _grey_png, _models, _nifti, _raw_ct

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]  # tests/conftest.py


def _run(bundle: str, tmp_path: Path, datalist: list[dict], out: Path, **overrides):
    """Run ``bundle``'s inference.json on ``datalist`` into ``out``; returns what ``run`` returned."""
    from monai.bundle import ConfigWorkflow

    models, configs, settings = _models(tmp_path, bundle)
    target = {"output_path": str(out / "prob.json")} if bundle.endswith(("_cls", "_fpr")) else {"output_dir": str(out)}
    folder = bundle_path(bundle) / "configs"
    flow = ConfigWorkflow(config_file=[str(folder / c) for c in configs], meta_file=str(folder / "metadata.json"),
                          logging_file=False, workflow_type=None, ckpt_dir=str(models), device="cpu", datalist=datalist,
                          **{**settings, **target, **overrides})
    flow.initialize()
    try:
        return flow.run()
    finally:
        flow.finalize()


def _report(out: Path) -> dict:
    path = out / "inference_report.json"
    assert is_own_prediction(path), "the report is marked as dira3d's own (a rerun may replace it)"
    return json.loads(path.read_text())


def _scans(tmp_path: Path, names: list[str]) -> list[Path]:
    return [_raw_ct(tmp_path / f"{name}.nii.gz") for name in names]


def _failing_write(monkeypatch, name: str, code: int) -> None:
    """Writing the mask of ``name`` fails with ``code`` (as a full disk or an I/O error would)."""
    from dira3d.evaluation import outputs

    saved = outputs._GuardedSaveImage.__call__

    def call(self, img, meta_data=None, filename=None):
        source = str(img.meta.get("filename_or_obj", ""))
        if Path(source).name == f"{name}.nii.gz":
            raise outputs.write_error(f"{name}_seg.nii.gz", OSError(code, os.strerror(code)))
        return saved(self, img, meta_data, filename)

    monkeypatch.setattr(outputs._GuardedSaveImage, "__call__", call)


def test_a_segmentation_batch_reports_each_input_and_goes_on_after_a_failed_write(tmp_path, monkeypatch):
    a, b, c = _scans(tmp_path, ["a", "b", "c"])
    mask = _nifti(tmp_path / "a_seg_manual.nii.gz", np.random.default_rng(0).random((32, 32, 16)) > 0.5, np.uint8)
    _failing_write(monkeypatch, "b", errno.EIO)  # one input's write fails: the batch stopped there before
    out = tmp_path / "out"
    result = _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in (a, mask, b, c)], out, **SEG3D)
    assert result == [3]  # run returns the exit status (python -m monai.bundle run exits with it)
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "c_seg.nii.gz", "inference_report.json"]
    report = _report(out)
    assert report["summary"] == {"inputs": 4, "written": 2, "left out": 1, "failed": 1, "not run": 0}
    assert report["exit_status"] == 3 and report["stopped"] is None
    rows = report["inputs"]
    assert [(r["image"], r["status"]) for r in rows] == [(str(a), "written"), (str(mask), "left out"),
                                                         (str(b), "failed"), (str(c), "written")]
    assert rows[0]["output"] == str(out / "a_seg.nii.gz") and rows[3]["output"] == str(out / "c_seg.nii.gz")
    assert rows[1]["reason"].startswith(f"{mask}: has only 2 distinct values")
    assert "could not write the prediction b_seg.nii.gz" in rows[2]["reason"]


def test_a_full_disk_stops_the_batch_and_the_report_says_what_was_not_run(tmp_path, monkeypatch):
    """Every later mask would fail the same way: the batch stops (exit 1), the report still lists each input."""
    a, b, c = _scans(tmp_path, ["a", "b", "c"])
    _failing_write(monkeypatch, "b", errno.ENOSPC)
    out = tmp_path / "out"
    with pytest.raises(Exception) as raised:
        _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in (a, b, c)], out, **SEG3D)
    error = raised.value
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__
    assert error is not None and error.errno == errno.ENOSPC, repr(raised.value)
    report = _report(out)
    assert [r["status"] for r in report["inputs"]] == ["written", "failed", "not run"]
    assert report["exit_status"] is None and "No space left on device" in report["stopped"]
    assert "No space left on device" in report["inputs"][2]["reason"]


def test_a_classification_batch_writes_the_others_when_the_model_fails_on_one(tmp_path, monkeypatch):
    """An error in the model run (e.g. out of GPU memory on one input) stopped the batch, and no _prob.json was
    written at all."""
    from monai.engines import SupervisedEvaluator

    rng = np.random.default_rng(0)
    cubes = [_nifti(tmp_path / f"cand{i}.nii.gz", rng.random((16, 16, 8))) for i in range(3)]
    iteration = SupervisedEvaluator._iteration

    def fails_on_cand1(self, engine, batchdata):
        if any(Path(str(f)).name == "cand1.nii.gz" for f in batchdata["image"].meta["filename_or_obj"]):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return iteration(self, engine, batchdata)

    monkeypatch.setattr(SupervisedEvaluator, "_iteration", fails_on_cand1)
    out = tmp_path / "out"
    out.mkdir()
    result = _run("luna16_nodule_fpr", tmp_path, [{"image": str(p)} for p in cubes], out, width=0.125, roi_size=[16, 16, 8])
    assert result == [3]
    probabilities = json.loads((out / "prob.json").read_text())
    assert [Path(p["image"]).name for p in probabilities["predictions"]] == ["cand0.nii.gz", "cand2.nii.gz"]
    rows = _report(out)["inputs"]
    assert [r["status"] for r in rows] == ["written", "failed", "written"]
    assert rows[0]["output"] == str(out / "prob.json")
    assert rows[1]["reason"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.mark.parametrize("bundle", ["siim_pneumothorax_seg", "chexpert_cls"])
def test_a_2d_batch_reports_each_input(bundle, tmp_path):
    good = [_grey_png(tmp_path / f"cxr{i}.png") for i in range(2)]
    volume = _raw_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    assert _run(bundle, tmp_path, [{"image": str(good[0])}, {"image": str(volume)}, {"image": str(good[1])}], out) == [3]
    rows = _report(out)["inputs"]
    assert [r["status"] for r in rows] == ["written", "left out", "written"]
    outputs = [out / "cxr0_seg.png", out / "cxr1_seg.png"] if bundle.endswith("_seg") else [out / "prob.json"] * 2
    assert [rows[0]["output"], rows[2]["output"]] == [str(o) for o in outputs] and all(o.is_file() for o in outputs)
    assert "loaded as a 3D volume" in rows[1]["reason"]


def test_a_report_file_dira3d_did_not_write_is_kept_and_nothing_runs(tmp_path):
    a, b = _scans(tmp_path, ["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "inference_report.json").write_text("my notes\n")
    with pytest.raises(Exception) as raised:
        _run("lits_liver_seg", tmp_path, [{"image": str(a)}, {"image": str(b)}], out, **SEG3D)
    error = raised.value
    while error is not None and not isinstance(error, FileExistsError):
        error = error.__cause__ or error.__context__
    assert "inference_report.json exists and is not a prediction written by dira3d" in str(error), repr(raised.value)
    assert "--report_path" in str(error) and "--overwrite True" in str(error)
    assert sorted(p.name for p in out.iterdir()) == ["inference_report.json"]
    assert (out / "inference_report.json").read_text() == "my notes\n"
    assert _run("lits_liver_seg", tmp_path, [{"image": str(a)}, {"image": str(b)}], out, overwrite=True, **SEG3D) == [0]
    assert _report(out)["summary"]["written"] == 2
    # a rerun replaces its own report (and masks)
    assert _run("lits_liver_seg", tmp_path, [{"image": str(a)}, {"image": str(b)}], out, **SEG3D) == [0]


def test_a_single_image_writes_no_report(tmp_path):
    (a,) = _scans(tmp_path, ["a"])
    out = tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, [{"image": str(a)}], out, image=str(a), **SEG3D) == [0]
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz"]


def test_python_m_monai_bundle_run_exits_3_when_an_input_was_left_out_and_0_when_all_were_written(tmp_path, repo_root):
    rng = np.random.default_rng(0)
    cubes = [_nifti(tmp_path / f"cand{i}.nii.gz", rng.random((16, 16, 8))) for i in range(2)]
    mask = _nifti(tmp_path / "cand_seg.nii.gz", rng.random((16, 16, 8)) > 0.5, np.uint8)
    models, _, _ = _models(tmp_path, "luna16_nodule_fpr")
    folder = bundle_path("luna16_nodule_fpr")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}

    def run(datalist, out):
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(folder / "configs" / "inference.json"),
               "--meta_file", str(folder / "configs" / "metadata.json"), "--bundle_root", str(folder),
               "--ckpt_dir", str(models), "--device", "$torch.device('cpu')", "--width", "0.125",
               "--roi_size", "[16, 16, 8]", "--output_path", str(out / "prob.json"),
               "--datalist", json.dumps([{"image": str(p)} for p in datalist])]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    done = run(cubes + [mask], tmp_path / "some")
    assert done.returncode == 3, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "inference: 2 of 3 inputs written (1 left out)" in log and "Traceback" not in log
    assert f"left out: {mask}: has only 2 distinct values" in log
    assert _report(tmp_path / "some")["exit_status"] == 3
    done = run(cubes, tmp_path / "all")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _report(tmp_path / "all")["summary"] == {"inputs": 2, "written": 2, "left out": 0, "failed": 0, "not run": 0}


@pytest.mark.parametrize("bundle", ["lits_liver_seg", "luna16_nodule_fpr", "chexpert_cls"])
def test_a_batch_without_an_output_setting_writes_into_the_current_folder(tmp_path, monkeypatch, bundle):
    # the default output came from the empty --image, taken for the current folder itself: the masks, the
    # probabilities and the report went to its parent (the 2D classification bundles: "<parent>/work_prob.json")
    from monai.bundle import ConfigWorkflow

    work = tmp_path / "parent" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    if bundle == "lits_liver_seg":
        inputs, settings = _scans(tmp_path, ["a", "b"]), SEG3D
    elif bundle == "chexpert_cls":
        inputs, settings = [_grey_png(tmp_path / f"{n}.png") for n in ("a", "b")], {}
    else:
        rng = np.random.default_rng(0)  # candidate cubes as prepared: in [0, 1]
        inputs, settings = [_nifti(tmp_path / f"{n}.nii.gz", rng.random((16, 16, 8))) for n in ("a", "b")], {}
    models, configs, defaults = _models(tmp_path, bundle)
    folder = bundle_path(bundle) / "configs"
    flow = ConfigWorkflow(config_file=[str(folder / c) for c in configs], meta_file=str(folder / "metadata.json"),
                          logging_file=False, workflow_type=None, ckpt_dir=str(models), device="cpu",
                          datalist=[{"image": str(p)} for p in inputs], **{**defaults, **settings})
    flow.initialize()
    try:
        assert flow.run() == [0]
    finally:
        flow.finalize()
    expected = (["a_seg.nii.gz", "b_seg.nii.gz", "inference_report.json"] if bundle == "lits_liver_seg"
                else ["inference_prob.json", "inference_report.json"])
    assert sorted(p.name for p in work.iterdir()) == expected
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == ["work"]


def _failing_model(monkeypatch, error_for):
    """The model run on an input fails with ``error_for(its path)`` unless that is None; returns the list of the
    file names the model was run on."""
    from monai.engines import SupervisedEvaluator

    iteration, seen = SupervisedEvaluator._iteration, []

    def run(self, engine, batchdata):
        source = str(batchdata["image"].meta["filename_or_obj"][0])
        seen.append(Path(source).name)
        error = error_for(source)
        if error is not None:
            raise error
        return iteration(self, engine, batchdata)

    monkeypatch.setattr(SupervisedEvaluator, "_iteration", run)
    return seen


def test_the_same_error_on_the_first_inputs_stops_the_batch_with_one_error(tmp_path, monkeypatch, caplog):
    """A bad setting, a model that does not fit the inputs or a lost GPU failed every input in turn: a batch of
    1,000 scans ran for hours failing the same way, then exited 3."""
    from dira3d.evaluation.batch import REPEATED_FAILURES, RepeatedFailureError

    scans = _scans(tmp_path, ["a", "b", "c", "d", "e"])
    wrong = "expected input[1, 2, 32, 32, 16] to have 1 channels"  # e.g. a model of another in_channels
    seen = _failing_model(monkeypatch, lambda source: RuntimeError(f"{wrong} (reading {source})"))  # each named
    out = tmp_path / "out"
    with pytest.raises(Exception) as raised:
        _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in scans], out, **SEG3D)
    error = raised.value
    while error is not None and not isinstance(error, RepeatedFailureError):
        error = error.__cause__
    assert error is not None, repr(raised.value)
    message = str(error)
    assert REPEATED_FAILURES == 3 and seen == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert message.startswith("the batch stops: 3 inputs in a row failed with the same error and none was written")
    assert f"RuntimeError: {wrong}" in message
    assert "check the settings" in message and "the other 2 inputs are not run" in message
    report = _report(out)
    assert report["exit_status"] is None and report["stopped"].startswith("RepeatedFailureError: the batch stops")
    assert [r["status"] for r in report["inputs"]] == ["failed"] * 3 + ["not run"] * 2
    assert report["inputs"][1]["reason"] == f"RuntimeError: {wrong} (reading {scans[1]})"
    assert sorted(p.name for p in out.iterdir()) == ["inference_report.json"]
    not_run = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not run:")]
    assert len(not_run) == 1 and not_run[0].startswith(f"not run: 2 inputs ({scans[3]}, {scans[4]}): the batch stopped")
    # the stop can be turned off: every input is tried, and the batch finishes with exit status 3
    seen.clear()
    assert _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in scans], out,
                **{"inference_batch#repeated_failures": 0}, **SEG3D) == [3]
    assert len(seen) == 5 and [r["status"] for r in _report(out)["inputs"]] == ["failed"] * 5


def test_failures_after_an_input_was_written_or_of_different_errors_do_not_stop_the_batch(tmp_path, monkeypatch):
    """Out of GPU memory on a few large scans once the batch has written a mask is those scans' failure, and
    different errors are the inputs' own: the batch goes on with the others."""
    scans = _scans(tmp_path, ["a", "b", "c", "d", "e"])
    seen = _failing_model(monkeypatch, lambda source: None if source.endswith("a.nii.gz") else
                          RuntimeError(f"CUDA out of memory (reading {source})"))
    out = tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in scans], out, **SEG3D) == [3]
    assert len(seen) == 5
    assert [r["status"] for r in _report(out)["inputs"]] == ["written"] + ["failed"] * 4
    # another message, another type: not the same error (c and d are, but only 2 in a row)
    errors = {"a": TypeError("x"), "b": TypeError("y"), "c": RuntimeError("y"), "d": RuntimeError("y")}
    monkeypatch.undo()
    seen = _failing_model(monkeypatch, lambda source: errors.get(Path(source).name[0]))
    assert _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in scans], out, **SEG3D) == [3]
    assert len(seen) == 5 and [r["status"] for r in _report(out)["inputs"]] == ["failed"] * 4 + ["written"]


def test_a_failure_key_leaves_out_the_file_names():
    from dira3d.evaluation.batch import failure_key

    def key(text, names=()):
        return failure_key(RuntimeError(text), names)

    assert key("cannot read /data/a b/case1.nii.gz", ["/data/a b/case1.nii.gz"]) == key(
        "cannot read /data/a b/case2.nii.gz", ["/data/a b/case2.nii.gz"]) == "RuntimeError: cannot read <file>"
    assert key("could not write the prediction case1_seg.nii.gz: [Errno 5] I/O error: '/out/x'") == key(
        "could not write the prediction case2_seg.nii.gz: [Errno 5] I/O error: '/out/y'")
    assert key("C:\\data\\a.nrrd failed") == key("C:\\data\\b.nrrd failed")
    assert key("expected 1 channels") != key("expected 3 channels")
    assert failure_key(ValueError("x")) != failure_key(RuntimeError("x"))


def test_a_report_path_that_cannot_be_written_stops_the_batch_before_any_input_is_read(tmp_path):
    """A --report_path in a folder that cannot be created or written failed at the end, after every prediction,
    with one logged line, and the batch exited 0 without its report."""
    from dira3d.utils.atomic import FolderNotWritableError

    a, b = _scans(tmp_path, ["a", "b"])
    blocker = tmp_path / "blocker"  # a file where the folder should be: not writable, also for root
    blocker.write_text("mine\n")
    out = tmp_path / "out"
    with pytest.raises(Exception) as raised:
        _run("lits_liver_seg", tmp_path, [{"image": str(a)}, {"image": str(b)}], out,
             report_path=str(blocker / "report.json"), **SEG3D)
    error = raised.value
    while error is not None and not isinstance(error, FolderNotWritableError):
        error = error.__cause__ or error.__context__
    assert error is not None, repr(raised.value)
    assert str(error).startswith(f"report_path folder {blocker} is not writable") and "pass --report_path" in str(error)
    assert not out.exists() or not any(out.iterdir()), "no input was run"
    assert blocker.read_text() == "mine\n"
    # a folder that does not exist yet is created
    report = tmp_path / "new" / "reports" / "batch.json"
    assert _run("lits_liver_seg", tmp_path, [{"image": str(a)}, {"image": str(b)}], out, report_path=str(report),
                **SEG3D) == [0]
    assert json.loads(report.read_text())["summary"]["written"] == 2


def test_a_failure_key_leaves_out_short_input_names_only_where_they_stand_as_a_name():
    """DICOM series folders named 1, 2, 3 (a common export): the name of each input was taken out of the message
    wherever it stood, e.g. in `groups=1` and `[32, 1, 3, ...]`, so the same wrong-model error gave another key on
    every input and the batch never stopped."""
    from dira3d.evaluation.batch import failure_key

    message = ("Given groups=1, weight of size [32, 1, 3, 3, 3], expected input[1, 2, 96, 96, 96] to have 1 channels, "
               "but got 2 channels instead")
    keys = {failure_key(RuntimeError(message), [f"/data/dicom/{n}"]) for n in ("1", "2", "3", "32")}
    assert keys == {f"RuntimeError: {message}"}
    # a name that stands as a name is still left out, and only there
    assert failure_key(RuntimeError("series s1 failed (s10 ok)"), ["/d/s1"]) == "RuntimeError: series <file> failed (s10 ok)"
    assert failure_key(RuntimeError("cannot read /d/s1: bad"), ["/d/s1"]) == "RuntimeError: cannot read <file>: bad"


@pytest.mark.parametrize("value", ["three", 2.5, -1, True])
def test_a_bad_repeated_failures_setting_is_named(value):
    """`--inference_batch#repeated_failures three` stopped with int()'s "invalid literal for int() with base 10", naming
    no setting, and 2.5 was taken as 2 without a word."""
    from dira3d.evaluation import InferenceBatch

    with pytest.raises(ValueError, match=rf"^repeated_failures={value!r}: pass the number of inputs"):
        InferenceBatch([{"image": "a.nii.gz"}], repeated_failures=value)


def test_repeated_failures_takes_a_whole_number_as_text():
    from dira3d.evaluation import InferenceBatch

    assert InferenceBatch([{"image": "a.nii.gz"}], repeated_failures="5").repeated_failures == 5
    assert InferenceBatch([{"image": "a.nii.gz"}], repeated_failures=0).repeated_failures == 0


class _FailingEngine:
    """An evaluator whose own iteration fails every time, with the same error."""

    @staticmethod
    def _iteration(engine, batchdata):
        raise RuntimeError("expected input to have 1 channels, but got 2 channels instead")


def test_the_repeated_failure_count_is_per_input_and_starts_again_with_each_run():
    """A failed batch of 2 inputs is run again one input at a time, and each counts (a model of another in_channels on a
    batch_size 2 loader failed 6 inputs before the stop of 3; the failed batch itself is not counted: it would count its
    inputs twice), and a run of the same record counts from 0 again."""
    import torch
    from monai.transforms import Compose

    from dira3d.evaluation import InferenceBatch
    from dira3d.evaluation.batch import RepeatedFailureError

    batch = InferenceBatch([{"image": f"/data/case{i}.nii.gz"} for i in range(6)])
    two, one = {"image": torch.zeros(2, 1, 4, 4, 4)}, {"image": torch.zeros(1, 1, 4, 4, 4)}
    batch.screen(Compose([]))
    assert batch.iteration(_FailingEngine, two) == []  # inputs 0 and 1, then each alone
    with pytest.raises(RepeatedFailureError, match=r"^the batch stops: 3 inputs in a row failed .*\(the other 3 "
                                                   r"inputs are not run;"):
        batch.iteration(_FailingEngine, two)  # inputs 2 and 3, then 2 alone: 3 not tried alone is not run
    assert sorted(batch.failed) == [0, 1, 2]
    # the same record run again (the workflow's run called once more): its first failures do not stop it at once
    batch.screen(Compose([]))
    assert batch.iteration(_FailingEngine, one) == [] and batch.iteration(_FailingEngine, one) == []
    with pytest.raises(RepeatedFailureError, match=r"^the batch stops: 3 inputs in a row"):
        batch.iteration(_FailingEngine, one)


def test_the_summary_names_each_file_once(caplog):
    """Found by a 2D walkthrough: the end of a batch logged `left out: /x/bad.png: /x/bad.png: cannot be read ...`,
    the refusal's reason naming its file after the line had; a failure's reason (an exception) still gets the name."""
    import logging

    from dira3d.evaluation import InferenceBatch

    batch = InferenceBatch([{"image": "/x/a.png"}, {"image": "/x/bad.png"}, {"image": "/x/c.png"}], report_path=None)
    batch.left_out[1] = "/x/bad.png: is empty (0 bytes): a copy or download that did not finish? copy it again"
    batch.failed[2] = "RuntimeError: out of memory"
    batch.done.add(0)

    class _Evaluator:
        def run(self):
            pass

    with caplog.at_level(logging.WARNING, logger="dira3d.evaluation.batch"):
        assert batch.run(_Evaluator()) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert "left out: /x/bad.png: is empty (0 bytes): a copy or download that did not finish? copy it again" in lines
    assert "failed: /x/c.png: RuntimeError: out of memory" in lines
    assert not any("/x/bad.png: /x/bad.png" in line for line in lines)
