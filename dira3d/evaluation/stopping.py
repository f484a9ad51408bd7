"""How a fine-tuning run ends on SIGTERM or Ctrl-C (SIGINT): one line, exit 143 / 130, nothing that looks finished.

SLURM (preemption, ``scancel``, the time limit), Kubernetes and ``torchrun`` (which passes the signal on to its
workers) send SIGTERM, then SIGKILL after a grace period. A fine-tuning ``train.json`` used to die at once without a
word (exit -15; under ``torchrun`` every worker silently), and a Ctrl-C printed MONAI's traceback. The task bundles
now run their trainer through :func:`run_training` (``run``) and end ``finalize`` with :func:`exit_if_training_stopped`:
the pretraining mechanism (:class:`dira3d.engines.stopping.SignalStop`) on MONAI's ``SupervisedTrainer``:

- The signal is recorded; the run stops after the training step in progress. In one process a signal that comes
  during a validation stops that validation after its step in progress instead: a validation cut short computes no
  metric, so it neither saves ``model.pt`` nor counts for early stopping or the learning-rate schedule.
- Under DDP every rank must stop at the same iteration: the ranks agree after every training step (one all-reduce
  of one number; the gradients take one per step already). A signal during a validation (which has no common step
  count: the ranks' shares differ) lets it finish, and the ranks agree again at the epoch's end, after the validation
  and ``model.pt`` (the trainer's last ``EPOCH_COMPLETED`` handler: one all-reduce per epoch): the run stops right
  there, before the next epoch's first step (it stopped after that step). So does a one-process run whose signal came
  after the validation's last step.
- A signal that comes after the last check (the last validation's end) still ends the run as stopped (one last
  agreement after the run), so ``dira3d finetune`` does not go on to the test evaluation.
- Rank 0 logs one line: the signal, the epoch and iteration, what ``model.pt`` holds (the model of this run's
  best validation so far, an earlier run's, or nothing) and that fine-tuning does not resume: start it again with
  ``--overwrite True``. ``finalize`` releases ``ckpt_dir`` and leaves the process group, then
  :func:`exit_if_training_stopped` exits with 143 (SIGTERM) or 130 (SIGINT). ``model.pt`` is written atomically, so it
  is never half-written; ``dira3d finetune`` writes no ``metrics.json`` for a stopped run.

A signal before the training starts, while building the trainer loads and caches the data, ends the run with one
line (``fine-tuning stopped by SIGTERM before training started ...``) and the same exit status:
:func:`stop_before_training` (:mod:`dira3d.engines.stopping`), the last ``initialize`` step of ``train.json``; the first
``finalize`` step, :func:`end_stop_before_training`, puts the handlers it replaced back in a workflow whose training
never started (``initialize()`` then ``finalize()`` in a notebook).

The stop is kept for :func:`exit_if_training_stopped` in this module (one per process), not read from the trainer:
``finalize`` naming ``@train#trainer`` would build the trainer, and cache its training data, in a workflow that never
ran it (``initialize`` then ``finalize``; ``train.json`` + ``evaluate.json``, which keeps ``train.json``'s ``finalize``).

``dira3d finetune`` handles SIGTERM itself (as Ctrl-C); :class:`BeforeTraining` tells its line whether the training had
started: a run stopped before (while its data were loaded and cached) saved nothing, and a plain rerun starts it (it
said the folder held an unfinished run to restart with ``--overwrite``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from dira3d.engines.distributed import all_ranks_min, is_main_process
from dira3d.engines.stopping import SignalStop, end_stop_before_training, stop_before_training
from dira3d.utils.interrupts import StoppedBySignal

__all__ = ["BeforeTraining", "run_training", "exit_if_training_stopped", "stop_message", "stop_before_training",
           "end_stop_before_training", "stopped_before_training", "stopped_before_training_of"]

_STOPPED: list[StoppedBySignal] = []  # the stop of this process's last run_training, until it is raised


def _mtime(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


def _agreed_signal(stop: SignalStop, engine: Engine) -> int:
    """The largest signal number any rank has recorded (0: none): one all-reduce under DDP."""
    return -all_ranks_min([-(stop.requested or 0)], getattr(engine.state, "device", None) or "cpu")[0]


def _poll_training(engine: Engine, stop: SignalStop) -> None:
    """``ITERATION_COMPLETED`` of the trainer: stop after this step when a signal came (to any rank)."""
    if stop.single_process:
        stop.poll(engine)
        return
    signum = _agreed_signal(stop, engine)
    if signum:
        stop.stop(engine, signum)


def _poll_validation(validator: Engine, stop: SignalStop, trainer: Engine, cut: dict[str, Any]) -> None:
    """``ITERATION_COMPLETED`` of the validator, one process only: end the validation after this step (its
    ``EPOCH_COMPLETED`` handlers, the model saver among them, do not run) and the trainer after it."""
    if stop.single_process and stop.requested is not None and not stop.stopping:
        stop.stop(trainer, stop.requested)
        cut["validation"] = True
        validator.terminate()


def _poll_epoch_end(engine: Engine, stop: SignalStop, cut: dict[str, Any]) -> None:
    """``EPOCH_COMPLETED`` of the trainer, its last handler (after the validation and ``model.pt``): a signal that came
    during this epoch's end (under DDP in its validation; in one process after the validation's last step) ends the run
    now (:meth:`SignalStop.after_epoch_end`; the ranks agree in one all-reduce). It stopped after the next epoch's first
    step."""
    if stop.stopping:  # a validation cut short (one process): the trainer is terminating already
        return
    stop.after_epoch_end(engine)
    if stop.stopping:
        cut["finished" if engine.state.epoch >= (engine.state.max_epochs or 0) else "epoch_end"] = True


def run_training(trainer: Engine, validator: Engine | None = None, ckpt_dir: str | os.PathLike | None = None) -> None:
    """``trainer.run()`` that SIGTERM and Ctrl-C end cleanly (see the module docstring); the bundles' ``run``.

    Args:
        trainer: the fine-tuning ``SupervisedTrainer``.
        validator: its validation ``SupervisedEvaluator`` (one process: a signal during a validation ends it there).
        ckpt_dir: where the bundle saves ``model.pt`` (named in the line of a stopped run).

    After a stop ``trainer.state.stopped_by`` is ``"SIGTERM"`` or ``"SIGINT"`` (None after a whole run), and the
    bundle's last ``finalize`` step, :func:`exit_if_training_stopped`, exits with 143 or 130. However the run ends
    (finished, stopped, an error), the TensorBoard writers that the two engines' handlers opened are closed
    (:func:`dira3d.engines.summary.close_writers`).
    """
    _STOPPED.clear()
    stop = SignalStop()
    model = Path(ckpt_dir) / "model.pt" if ckpt_dir else None
    before, cut = _mtime(model), {"validation": False}
    handles = [trainer.add_event_handler(Events.ITERATION_COMPLETED, _poll_training, stop),
               trainer.add_event_handler(Events.EPOCH_COMPLETED, _poll_epoch_end, stop, cut)]  # after the bundle's
    if validator is not None:
        handles.append(validator.add_event_handler(Events.ITERATION_COMPLETED, _poll_validation, stop, trainer, cut))
    try:
        with stop.installed(trainer):
            trainer.run()
            if not stop.stopping:  # a signal after the last check (the last validation's end): stopped all the same
                signum = _agreed_signal(stop, trainer)
                if signum:
                    trainer.state.stopped_by = signal.Signals(signum).name
                    cut["finished"] = True
    finally:
        for handle in handles:
            handle.remove()
        # the TensorBoard writers that the handlers of both engines opened (MONAI's TensorBoardStatsHandler without a
        # summary_writer) end with the run, whichever way it ends; a second run opens new event files
        from dira3d.engines.summary import close_writers  # (imports tensorboard)

        close_writers(trainer, validator)
    if trainer.state.stopped_by:
        _STOPPED.append(StoppedBySignal(trainer.state.stopped_by, trainer.state.iteration))
        if is_main_process():
            trainer.logger.warning(stop_message(trainer, validator, model, _mtime(model) != before, cut))


def exit_if_training_stopped() -> None:
    """Raise :class:`~dira3d.utils.interrupts.StoppedBySignal` (a ``SystemExit``, code 143 or 130) when this process's
    last :func:`run_training` was stopped by a signal; a no-op otherwise, and after it has raised once.

    The bundles call it as the last ``finalize`` step, after ``ckpt_dir`` is released and the process group left, so
    that ``python -m monai.bundle run`` / ``torchrun`` exit with 143 (SIGTERM) or 130 (SIGINT) without a traceback.
    """
    if _STOPPED:
        raise _STOPPED.pop()


def stop_message(trainer: Engine, validator: Engine | None, model: Path | None, saved: bool,
                 cut: dict[str, Any] | None = None) -> str:
    """The one line of a stopped fine-tuning run: signal, where it stopped, what ``model`` holds, what to do.

    Args:
        trainer: the stopped trainer (``state.stopped_by``, ``epoch``, ``max_epochs``, ``iteration``).
        validator: the validator (its best metric so far), or None.
        model: the ``model.pt`` path, or None when not known.
        saved: whether this run wrote ``model`` (it changed since the run started).
        cut: ``{"validation": True}`` when a validation was cut short, ``{"epoch_end": True}`` when the run stopped
            right after an epoch's end, ``{"finished": True}`` when the signal came after the training had ended (or
            in the last epoch's end).
    """
    cut = cut or {}
    state = trainer.state
    if cut.get("finished"):
        where = f"after its last epoch ({state.epoch} of {state.max_epochs}): the training had ended"
    elif cut.get("validation"):
        where = f"in the validation after epoch {state.epoch} of {state.max_epochs}, which was left unfinished"
    elif cut.get("epoch_end"):
        where = f"at the end of epoch {state.epoch} of {state.max_epochs} (iteration {state.iteration})"
    else:
        where = f"in epoch {state.epoch} of {state.max_epochs} (iteration {state.iteration})"
    if model is None:
        what = "a model.pt it saved is that of the best validation so far, not that of a finished run"
    elif saved:
        best = ""
        vstate = getattr(validator, "state", None)
        epoch = getattr(vstate, "best_metric_epoch", -1)
        if isinstance(epoch, int) and epoch > 0:
            best = f" ({getattr(vstate, 'key_metric_name', 'metric')} {float(vstate.best_metric):.4g} at epoch {epoch})"
        what = f"{model} holds the model of this run's best validation so far{best}, not that of a finished run"
    elif model.is_file():
        what = f"no validation of this run finished: {model} is an earlier run's"
    else:
        what = "no validation finished, so no model.pt was written"
    return (f"fine-tuning stopped by {state.stopped_by} {where}; {what}; fine-tuning does not resume: start it "
            "again with --overwrite True (dira3d finetune: --overwrite)")


class BeforeTraining:
    """Whether a fine-tuning run's training has started (:meth:`started`, called just before the workflow's ``run``)."""

    def __init__(self) -> None:
        self.training = False

    def started(self) -> None:
        self.training = True


@contextmanager
def stopped_before_training(output_dir: str | os.PathLike) -> Iterator[BeforeTraining]:
    """Around a ``dira3d finetune`` run: a Ctrl-C / SIGTERM that comes before :meth:`BeforeTraining.started` is marked
    (``err.before_training = True``, :func:`stopped_before_training_of`), and the TensorBoard event files this run
    created in ``output_dir`` (empty: no step was logged) are removed, so that the folder is as it was and the same
    command starts the run again (the next run took them for an earlier run's and asked for ``--overwrite``). Event
    files that were there before are never touched."""
    output_dir = Path(output_dir)
    earlier = set(output_dir.glob("events.out.tfevents.*"))
    watch = BeforeTraining()
    try:
        yield watch
    except (KeyboardInterrupt, StoppedBySignal) as err:
        if not watch.training:
            for path in output_dir.glob("events.out.tfevents.*"):
                if path not in earlier:
                    path.unlink(missing_ok=True)
            err.before_training = True  # type: ignore[attr-defined]
        raise


def stopped_before_training_of(err: BaseException) -> bool:
    """Whether ``err`` (a Ctrl-C / SIGTERM) stopped a run before its training started (:func:`stopped_before_training`)."""
    return bool(getattr(err, "before_training", False))
