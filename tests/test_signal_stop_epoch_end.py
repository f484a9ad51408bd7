"""A pretraining stopped (SIGTERM / Ctrl-C) on an epoch's last step (found 2026-11-27, interruption walkthrough
follow-up).

ignite skips ``EPOCH_COMPLETED`` after ``terminate()``: that epoch's validation, its ``best.pt`` decision, its
``train_*`` means and its epoch-end ``last.pt`` never ran, and the resume (which starts the next epoch) did not run
them either, so ``best.pt`` could differ from an uninterrupted run's and the epoch's ``val_*`` values were missing. A
stop there now lets the epoch end first (``SignalStop(finish_epoch=True)``, DiRATrainer's), writing ``last.pt``
before the validation (a SIGKILL during it loses no training) and again after it.
"""

from __future__ import annotations

import signal

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset

from dira3d.engines import DiRACheckpoint, DiRAEvaluator, RandPatchPaird
from test_engine import PATCH3, make_trainer, smooth_volumes
from test_signal_stop import kill_self_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGES = [{"name": "dis_res", "losses": ["dis", "res"]}]


def _run(ckpt_dir, metrics: dict, stop_at: int | None = None, signum=signal.SIGTERM):
    """A tiny pretraining with validation: 3 epochs of 2 iterations; ``metrics[epoch]``: its val_* and train_*."""
    val_loader = DataLoader(Dataset(smooth_volumes(2, seed=1), RandPatchPaird("image", PATCH3)), batch_size=2)
    trainer = make_trainer("visual_words", 3, stages=STAGES, max_epochs=3, volumes=4, batch=2,
                           handlers=[DiRAEvaluator("cpu", val_loader, seed=7), DiRACheckpoint(ckpt_dir)])
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: metrics.setdefault(e.state.epoch, {
        k: v for k, v in e.state.metrics.items() if k.startswith(("val_", "train_"))}))
    if stop_at:
        kill_self_at(trainer, stop_at, signum)
    trainer.run()
    return trainer


def _weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["trainer"], ckpt["encoder"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_on_an_epochs_last_step_validates_that_epoch_as_an_uninterrupted_run(tmp_path, signum):
    full: dict = {}
    _run(tmp_path / "full", full)
    assert sorted(full) == [1, 2, 3] and all("val_loss" in m for m in full.values())

    stopped: dict = {}
    saves = []
    run = _run(tmp_path / "stopped", stopped, stop_at=4, signum=signum)  # epoch 2's last step
    assert run.state.stopped_by == signal.Signals(signum).name and run.state.iteration == 4
    assert stopped == {1: full[1], 2: full[2]}  # epoch 2 validated (and its train_* means) before the stop
    saves.append(_weights(tmp_path / "stopped" / "last.pt")[0])
    assert (saves[0]["iteration"], saves[0]["epoch"], saves[0]["epoch_iteration"]) == (4, 2, 0)
    assert saves[0]["epoch_sums"]["count"] == 0  # the epoch-end last.pt: its means were taken

    resumed: dict = {}
    _run(tmp_path / "stopped", resumed)
    assert resumed == {3: full[3]}  # the resume starts epoch 3, as it should: epoch 2 ran whole
    for name in ("best.pt", "last.pt"):
        (a, wa), (b, wb) = _weights(tmp_path / "full" / name), _weights(tmp_path / "stopped" / name)
        assert (a["best_metric"], a["best_epoch"], a["iteration"]) == (b["best_metric"], b["best_epoch"], b["iteration"])
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_last_pt_is_written_before_the_epoch_end_validation(tmp_path, monkeypatch):
    """SLURM sends SIGKILL 30 s after SIGTERM: a validation cut off by it must not lose the epoch's training."""
    from dira3d.engines import evaluator as evaluator_module

    seen = []
    validate = evaluator_module.DiRAEvaluator._validate

    def recording(self, trainer):
        last = tmp_path / "last.pt"
        seen.append(torch.load(last, weights_only=True)["trainer"]["iteration"] if last.is_file() else None)
        return validate(self, trainer)

    monkeypatch.setattr(evaluator_module.DiRAEvaluator, "_validate", recording)
    _run(tmp_path, {}, stop_at=4)
    assert seen == [None, 4]  # epoch 1: no last.pt yet (it follows the validation); epoch 2: the one of the stop


def _signal_in_validation(monkeypatch, epoch: int, signum: int):
    """Send ``signum`` to this process as the validation after ``epoch`` starts (its last step long done); returns
    the original ``DiRAEvaluator._validate``."""
    import os

    from dira3d.engines import evaluator as evaluator_module

    validate = evaluator_module.DiRAEvaluator._validate

    def signalled(self, trainer):
        if trainer.state.epoch == epoch:
            os.kill(os.getpid(), signum)
        return validate(self, trainer)

    monkeypatch.setattr(evaluator_module.DiRAEvaluator, "_validate", signalled)
    return validate


def test_ctrl_c_again_during_that_validation_stops_at_once_with_last_pt_of_the_stop(tmp_path, monkeypatch):
    """The deferred epoch end may take a while: a second Ctrl-C there does what Ctrl-C did before the run
    (KeyboardInterrupt), and last.pt, written before the validation, holds the stop's iteration."""
    _signal_in_validation(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, {}, stop_at=4, signum=signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["trainer"]
    assert (saved["iteration"], saved["epoch"], saved["epoch_iteration"]) == (4, 2, 0)


def test_a_signal_during_an_epochs_validation_stops_right_after_that_epochs_end(tmp_path, monkeypatch):
    """A SIGTERM in epoch 2's validation (its last step long done) let the validation finish and stopped the run
    only after epoch 3's first step (SignalStop.poll runs after steps). It now stops right after epoch 2's end:
    validated, best.pt decided, last.pt at that end (not pending), exit 143; the resume trains epoch 3 as an
    uninterrupted run does, bit for bit."""
    from dira3d.engines import StoppedBySignal, exit_if_stopped

    full: dict = {}
    _run(tmp_path / "full", full)
    validate = _signal_in_validation(monkeypatch, 2, signal.SIGTERM)
    stopped: dict = {}
    run = _run(tmp_path / "stopped", stopped)
    assert run.state.stopped_by == "SIGTERM" and run.state.iteration == 4  # no step of epoch 3 (it stopped at 5)
    assert stopped == {1: full[1], 2: full[2]}
    saved = _weights(tmp_path / "stopped" / "last.pt")[0]
    where = (saved["iteration"], saved["epoch"], saved["epoch_iteration"], saved["epoch_end_pending"])
    assert where == (4, 2, 0, False)
    with pytest.raises(StoppedBySignal) as stop:
        exit_if_stopped(run)
    assert stop.value.code == 143
    from dira3d.engines import evaluator as evaluator_module

    monkeypatch.setattr(evaluator_module.DiRAEvaluator, "_validate", validate)  # no signal in the resume

    resumed: dict = {}
    _run(tmp_path / "stopped", resumed)
    assert resumed == {3: full[3]}
    for name in ("best.pt", "last.pt"):
        (a, wa), (b, wb) = _weights(tmp_path / "full" / name), _weights(tmp_path / "stopped" / name)
        assert (a["best_metric"], a["best_epoch"], a["iteration"]) == (b["best_metric"], b["best_epoch"], b["iteration"])
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
