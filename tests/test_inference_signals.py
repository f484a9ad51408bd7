"""Ctrl-C / SIGTERM to a batch of ``inference.json`` (found 2026-11-27, interruption walkthrough).

SIGTERM (``kill``, ``scancel``, a SLURM time limit) ended ``python -m monai.bundle run`` at once without a word and
without ``inference_report.json``: nothing said which inputs had their prediction. Ctrl-C wrote the report but then
printed about 200 lines of tracebacks. Both now write the report (the stopped inputs ``not run``), end with one line on
what was kept and how to go on, and exit with 143 / 130 (``dira3d.evaluation.InferenceBatch``); the predictions
written before the signal stay whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dira3d.evaluation.finetune import bundle_path
from dira3d.evaluation.outputs import is_own_prediction
from test_inference_inputs import _models, _raw_ct

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# `python -m monai.bundle run ...` whose evaluator announces each input ("STEP <n>") and waits on the second one, so
# that the test's signal arrives in the middle of the batch
RUNNER = textwrap.dedent('''
    import os, runpy, sys, time
    from monai.engines import SupervisedEvaluator

    step = SupervisedEvaluator._iteration

    def announced(self, engine, batchdata):
        os.write(1, f"STEP {engine.state.iteration}\\n".encode())
        if engine.state.iteration == 2:
            time.sleep(3.0)
        return step(self, engine, batchdata)

    SupervisedEvaluator._iteration = announced
    sys.argv = ["monai.bundle"] + sys.argv[1:]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
''')


def _default_sigint() -> None:  # a SIGINT ignored by the test run (a background job) would be inherited as ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(("signum", "code", "word", "reason"), [
    (signal.SIGTERM, 143, "stopped by SIGTERM", "stopped by SIGTERM"),
    (signal.SIGINT, 130, "interrupted", "interrupted (Ctrl-C)")])
def test_a_signal_mid_batch_writes_the_report_says_what_was_kept_and_exits_with_its_code(tmp_path, repo_root, signum,
                                                                                         code, word, reason):
    scans = [_raw_ct(tmp_path / f"{name}.nii.gz") for name in ("a", "b", "c", "d")]
    models, _, _ = _models(tmp_path, "lits_liver_seg")
    folder, out = bundle_path("lits_liver_seg"), tmp_path / "out"
    cmd = [sys.executable, "-c", RUNNER, "run", "--config_file", str(folder / "configs" / "inference.json"),
           "--meta_file", str(folder / "configs" / "metadata.json"), "--bundle_root", str(folder),
           "--ckpt_dir", str(models), "--device", "$torch.device('cpu')", "--width", "0.125",
           "--roi_size", "[32, 32, 16]", "--sw_batch_size", "1", "--output_dir", str(out),
           "--datalist", json.dumps([{"image": str(p)} for p in scans])]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        for line in proc.stdout:  # in the second input: the first one's mask is written
            if line.strip() == "STEP 2":
                time.sleep(0.5)
                proc.send_signal(signum)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    report_path = out / "inference_report.json"
    assert is_own_prediction(report_path)
    report = json.loads(report_path.read_text())
    assert report["exit_status"] is None and report["stopped"] == reason
    assert [r["status"] for r in report["inputs"]] == ["written", "not run", "not run", "not run"]
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "inference_report.json"]  # no hidden temporary
    assert is_own_prediction(out / "a_seg.nii.gz")
    log = rest + err  # the logging goes to stdout or stderr depending on the bundle's logging set-up
    assert "Traceback" not in log
    last = [line for line in log.splitlines() if " - dira3d.evaluation.batch - " in line][-1]
    assert last.endswith(f"inference {word}; the 1 prediction(s) written are kept, each whole; report: {report_path}; "
                         "run the same command again with --skip_written True to run only the inputs not written "
                         "(without it, every input is run again)"), last


def _sigterm_while_screening(tmp_path, monkeypatch) -> dict:
    """Run a 2-input LiTS batch in-process with SIGTERM sent to this process as its inputs are checked (a handler
    that fails the test stands in for the one from before the run, whose default would end pytest itself); check the
    interrupt is raised after the report and that handler is put back; return the report."""
    from dira3d.evaluation import inputs
    from dira3d.utils.interrupts import TerminatedBySignal
    from test_inference_batch import _run

    def _not_taken(signum, frame):
        raise AssertionError("a SIGTERM reached the handler from before the run")

    screen = inputs.screen_inputs

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the main thread, before the next bytecode
        return screen(*args, **kwargs)

    monkeypatch.setattr(inputs, "screen_inputs", terminated)
    scans = [_raw_ct(tmp_path / f"{name}.nii.gz") for name in ("a", "b")]
    out = tmp_path / "out"
    previous = signal.signal(signal.SIGTERM, _not_taken)
    try:
        with pytest.raises(TerminatedBySignal):
            _run("lits_liver_seg", tmp_path, [{"image": str(p)} for p in scans], out)
        assert signal.getsignal(signal.SIGTERM) is _not_taken
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in out.iterdir()) == ["inference_report.json"]
    return json.loads((out / "inference_report.json").read_text())


def test_sigterm_while_the_inputs_are_checked_writes_the_report_and_raises_the_interrupt_in_process(tmp_path,
                                                                                                    monkeypatch):
    """Screening reads every input before the model runs (0.6 s a CT: minutes for a large batch). Called in-process
    the interrupt is raised after the report, as a Ctrl-C; the SIGTERM handler from before is put back."""
    report = _sigterm_while_screening(tmp_path, monkeypatch)
    assert report["stopped"] == "stopped by SIGTERM while the inputs were checked"
    assert report["summary"] == {"inputs": 2, "written": 0, "left out": 0, "failed": 0, "not run": 2}


def test_a_second_sigterm_while_the_report_is_written_is_ignored(tmp_path, monkeypatch):
    """Found in session 25: SLURM signals every process of a job step and torchrun forwards the SIGTERM it got, so a
    rank may get a second one right after the first. Once the first had ended the run, SIGTERM's handler from before
    was back (its default action ends the process) while the report was written: no report. A second SIGTERM then is
    now ignored, and the handler from before is back after the report."""
    from dira3d.evaluation import InferenceBatch

    finish = InferenceBatch._finish

    def terminated_again(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the second, as the report is about to be written
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(InferenceBatch, "_finish", terminated_again)
    report = _sigterm_while_screening(tmp_path, monkeypatch)
    assert report["stopped"] == "stopped by SIGTERM while the inputs were checked"
    assert report["summary"]["not run"] == 2


def _interrupt_after(monkeypatch, where: str, stem: str) -> None:
    """Raise ``KeyboardInterrupt`` (as a Ctrl-C arriving then would) right after the prediction of ``<stem>.nii.gz`` is
    renamed into place (``where="rename"``) or right after the model's iteration that wrote it returned, before the
    batch records the input (``where="record"``)."""
    from monai.engines import SupervisedEvaluator

    from dira3d.utils import atomic

    if where == "rename":
        replace = os.replace

        def replaced(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if os.path.basename(str(dst)) == f"{stem}_seg.nii.gz":
                raise KeyboardInterrupt

        monkeypatch.setattr(atomic.os, "replace", replaced)
        return
    step = SupervisedEvaluator._iteration

    def stepped(self, engine, batchdata):
        output = step(self, engine, batchdata)
        if os.path.basename(str(batchdata["image"].meta["filename_or_obj"][0])) == f"{stem}.nii.gz":
            raise KeyboardInterrupt
        return output

    monkeypatch.setattr(SupervisedEvaluator, "_iteration", stepped)


@pytest.mark.parametrize("where", ["rename", "record"])
def test_an_interrupt_between_a_predictions_rename_and_its_record_reports_it_written_and_a_rerun_replaces_it(
        tmp_path, monkeypatch, where):
    """A Ctrl-C or SIGTERM landing after ``b_seg.nii.gz`` was renamed into place, before the batch recorded ``b`` as
    done, reported ``b`` as ``not run`` next to its whole prediction (and "the 1 prediction(s) written are kept")."""
    from test_inference_batch import _report, _run

    scans = [_raw_ct(tmp_path / f"{name}.nii.gz") for name in ("a", "b", "c")]
    datalist, out = [{"image": str(p)} for p in scans], tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, where, "b")
        with pytest.raises(KeyboardInterrupt):
            _run("lits_liver_seg", tmp_path, datalist, out)
    report = _report(out)
    assert [r["status"] for r in report["inputs"]] == ["written", "written", "not run"]
    assert report["inputs"][1]["output"] == str(out / "b_seg.nii.gz")
    assert report["summary"] == {"inputs": 3, "written": 2, "left out": 0, "failed": 0, "not run": 1}
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz", "inference_report.json"]
    assert is_own_prediction(out / "b_seg.nii.gz")
    # the rerun replaces dira3d's own predictions of the stopped run, as the stop's last line says, and writes all
    assert _run("lits_liver_seg", tmp_path, datalist, out) == [0]
    assert [r["status"] for r in _report(out)["inputs"]] == ["written", "written", "written"]


def test_an_interrupt_before_a_predictions_rename_leaves_the_earlier_file_and_reports_not_run(tmp_path, monkeypatch):
    """The other side of the boundary: an earlier run's prediction of ``b`` that is still in place when the stop comes
    (this run's was not renamed over it) is not taken for this run's."""
    from dira3d.utils import atomic
    from test_inference_batch import _report, _run

    scans = [_raw_ct(tmp_path / f"{name}.nii.gz") for name in ("a", "b")]
    datalist, out = [{"image": str(p)} for p in scans], tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, datalist, out) == [0]
    earlier = (out / "b_seg.nii.gz").stat()
    replace = os.replace

    def stopped_before(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == "b_seg.nii.gz":
            raise KeyboardInterrupt
        return replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(atomic.os, "replace", stopped_before)
        with pytest.raises(KeyboardInterrupt):
            _run("lits_liver_seg", tmp_path, datalist, out)
    assert [r["status"] for r in _report(out)["inputs"]] == ["written", "not run"]
    assert (out / "b_seg.nii.gz").stat().st_ino == earlier.st_ino and is_own_prediction(out / "b_seg.nii.gz")
