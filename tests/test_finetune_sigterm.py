"""SIGTERM (SLURM preemption, ``scancel``) to ``dira3d finetune`` / ``dira3d experiment``: the Ctrl-C line, exit 143.

Fine-tuning has no resume: the process used to die at once without a word (SIGTERM's default), leaving the user to
find out from the missing metrics.json. Now SIGTERM takes the Ctrl-C path (``dira3d.utils.interrupts``): one line
saying the output folder holds an unfinished run and how to start it again, and 128 + 15.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from test_bundles_finetune import make_classification

REPO = Path(__file__).resolve().parents[1]

# `python -m dira3d.cli ...` with each training step announced ("STEP <epoch>"); the first step of epoch PAUSE_AT
# waits a little so that the test's signal arrives inside it
RUNNER = textwrap.dedent('''
    import os, runpy, sys, time
    from monai.engines import SupervisedTrainer

    step, pause_at, paused = SupervisedTrainer._iteration, int(os.environ["STEP_PAUSE_AT"]), []

    def announced(self, engine, batchdata):
        os.write(1, f"STEP {engine.state.epoch}\\n".encode())
        if engine.state.epoch == pause_at and not paused:
            paused.append(True)
            time.sleep(2.0)
        return step(self, engine, batchdata)

    SupervisedTrainer._iteration = announced
    sys.argv = ["dira3d"] + sys.argv[1:]
    runpy.run_module("dira3d.cli", run_name="__main__")
''')


def test_dira3d_finetune_stopped_by_sigterm_prints_the_unfinished_run_line_and_exits_143(tmp_path):
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP_PAUSE_AT": "2",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", RUNNER, "finetune", "--bundle", "luna16_nodule_fpr", "--datalist", str(datalist),
           "--output-dir", str(out), "--tiny", "--set", "max_epochs=2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # SIGTERM in epoch 2: epoch 1's validation wrote model.pt
            if line.strip() == "STEP 2":
                model = (out / "models" / "model.pt").read_bytes()
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (proc.returncode, err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith("dira3d finetune:")]
    assert lines == [f"dira3d finetune: stopped by SIGTERM; {out.resolve()} holds an unfinished run (no test metrics); "
                     "rerun with --overwrite to start it again"], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert (out / "models" / "model.pt").read_bytes() == model  # epoch 1's model, whole
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert not (out / "metrics.json").exists()  # an unfinished run: the next one needs --overwrite
    assert not [p.name for p in (out / "models").iterdir() if p.name.startswith(".model.pt")]  # no temporary file


def test_dira3d_experiment_takes_sigterm_as_ctrl_c_and_exits_143(tmp_path, monkeypatch, capsys):
    """Between and inside its fine-tuning runs (a pretraining stops gently on its own: StoppedBySignal)."""
    from dira3d.evaluation import experiment

    def terminated(config):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises in this frame
        raise AssertionError("SIGTERM was not taken")

    # main reads the config (read_config), checks the lock, then the bundle (check_config_bundle)
    monkeypatch.setattr(experiment, "read_config", lambda path: {"output_dir": str(tmp_path / "grid")})
    monkeypatch.setattr(experiment, "check_config_bundle", lambda config, path: config)
    monkeypatch.setattr(experiment, "run_experiment", terminated)
    before = signal.signal(signal.SIGTERM, _not_taken)  # SIGTERM's default would end pytest itself
    try:
        assert experiment.main(["--config", "grid.yaml"]) == 143
        assert signal.getsignal(signal.SIGTERM) is _not_taken  # put back
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err.strip()
    # it said "interrupted", as after a Ctrl-C (found 2026-11-27): the signal is named, as the other commands do
    assert err == (f"dira3d experiment: stopped by SIGTERM; the finished runs are in {tmp_path / 'grid' / 'results.csv'}; "
                   "rerun the same command to go on from there"), err


def _not_taken(signum, frame):
    raise AssertionError("SIGTERM reached the handler from before the command")


@pytest.mark.parametrize("ignored", [True, False])
def test_sigterm_as_interrupt_keeps_an_ignored_sigterm_ignored_and_puts_the_handler_back(ignored):
    from dira3d.utils.interrupts import TerminatedBySignal, interrupt_exit_code, sigterm_as_interrupt

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN if ignored else _not_taken)
    try:
        with pytest.raises(TerminatedBySignal) if not ignored else _nothing():
            with sigterm_as_interrupt():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5 if ignored else 30)
        assert signal.getsignal(signal.SIGTERM) == (signal.SIG_IGN if ignored else _not_taken)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert interrupt_exit_code(TerminatedBySignal()) == 143 and interrupt_exit_code(KeyboardInterrupt()) == 130


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
