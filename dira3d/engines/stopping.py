"""How a pretraining run ends before ``max_epochs``: on SIGTERM or Ctrl-C (SIGINT), and by early stopping.

**Signals** (:class:`SignalStop`): finish the step, write ``last.pt``, exit.

SLURM (preemption, ``scancel``, the time limit), Kubernetes evictions and ``torchrun`` send SIGTERM,
then SIGKILL after a grace period (SLURM's ``KillWait`` and Kubernetes' default: 30 s; ``torchrun``
kills its workers 30 s after it forwards the signal). While :class:`DiRATrainer` runs,
:class:`SignalStop` catches both signals; its handler only records the first one. The trainer looks
at the record on ``ITERATION_COMPLETED`` (a Python attribute test, nothing in the step) and ends the run
with ``engine.terminate()``: ignite then fires ``COMPLETED``, where :class:`~dira3d.engines.DiRACheckpoint`
writes ``last.pt`` at that iteration (the atomic mid-epoch checkpoint) and releases its lock.

- One process: the run stops after the step in progress. On an epoch's last step (``SignalStop(finish_epoch=True)``,
  :class:`DiRATrainer`'s) the epoch's end runs first (its validation, ``best.pt``, ``train_*`` means, epoch-end
  ``last.pt``), as in a run not stopped: ignite skips ``EPOCH_COMPLETED`` after ``terminate()`` and the resume starts
  the next epoch, so that epoch was never validated (``best.pt`` could differ from an uninterrupted run's).
  :class:`~dira3d.engines.DiRACheckpoint` writes ``last.pt`` before that validation (a SIGKILL during it, SLURM's
  grace period, loses no training; that ``last.pt`` records the epoch's end as pending, and the resume runs it first:
  :mod:`dira3d.engines.epoch_end`) and again after it. A signal while such a resume runs that pending end (before
  the first step) ends the run right after it in the same way, not after the next epoch's first step.
- A signal that comes during an epoch's end, after its last step (in its validation, which can take minutes), ends
  the run right after that end (:meth:`SignalStop.after_epoch_end`, the trainer's last ``EPOCH_COMPLETED`` handler):
  validation done, ``best.pt`` decided, the epoch-end ``last.pt`` written, then ``last.pt`` at that end again on
  ``COMPLETED``; the resume starts the next epoch as an uninterrupted run does. It stopped after the next epoch's first
  step. Under DDP the ranks agree there in one all-reduce per epoch end.
- Under DDP every rank must stop at the same iteration (a rank that left would leave the others
  waiting in an all-reduce): the ranks agree in the all-reduce the non-finite check already makes every
  ``check_every`` iterations (:meth:`dira3d.engines.NonFiniteGuard.periodic_check`), and stop when a signal
  reached any of them. The stop comes up to ``check_every`` iterations after the signal.
- Once the stop is decided, further signals are ignored (``last.pt`` is being written). Before that, and during
  the epoch end of a stop on its last step (or a resume's pending one), a second Ctrl-C in a one-process run does
  what Ctrl-C did before the run (``KeyboardInterrupt``: stop now, ``last.pt`` stays the last one written); a second
  SIGTERM is ignored, and so is a second SIGINT under ``torchrun`` (which forwards the Ctrl-C it gets to workers that
  had it from the terminal already).
- The handlers are installed only while the engine runs, in the main thread, and the previous ones are
  put back afterwards; a signal set to be ignored (``SIG_IGN``) stays ignored.

After such a stop ``trainer.run()`` returns with ``trainer.state.stopped_by`` set to ``"SIGTERM"`` or
``"SIGINT"`` (None after a full run); :func:`exit_if_stopped` (the bundle's last ``finalize`` step) then
raises :class:`StoppedBySignal`, a ``SystemExit`` with code 143 (SIGTERM) or 130 (SIGINT).

**Before training** (:func:`stop_before_training`, the last ``initialize`` step of the pretraining and task bundles'
``train.json`` / ``multi_gpu_train.json``): building the trainer loads and caches the data (MONAI's ``CacheDataset``),
minutes before :class:`SignalStop` is installed, and a SIGTERM then ended ``python -m monai.bundle run`` at once
without a word (exit -15), a Ctrl-C with a traceback. Until the engine runs, the first signal now logs one line
(``<what> stopped by SIGTERM before training started (...)``) and raises :class:`StoppedBySignal` (exit 143 / 130);
:meth:`SignalStop.installed` puts the handlers it replaced back when the training starts, and
:func:`end_stop_before_training` (the bundles' first ``finalize`` step) when no training started. The exit waits for
the items a cache's thread pool is still loading (:func:`dira3d.utils.threads.wait_for_pool_threads_at_exit`). A
process that handles SIGTERM itself (``dira3d pretrain`` / ``finetune`` / ``experiment``: their one line on how to go
on) is left as it is.

**Early stopping** (:class:`FinalStageEarlyStop`, opt-in: ``DiRACheckpoint(early_stop_patience=N)``, the bundle's
``early_stop_patience``): the run ends, with exit code 0, after the ``N``-th validation in a row that does not
lower the criterion (``val_selection_loss``, the ``best.pt`` criterion) below its best **in the final stage**.
Earlier stages always run to their bound, so no stage is skipped; the count starts afresh at the final stage's
first validation, which sets its first best (a stage's losses are not comparable with another's: adding a term
changes the scale). Ties count as no improvement. The counting is ignite's :class:`~ignite.handlers.EarlyStopping`;
its state (count, best value, best epoch, final stage, stop epoch, patience, criterion) goes into every checkpoint (``trainer`` key
``early_stop``), so a resumed run stops at the epoch an uninterrupted one does. Under DDP every rank takes rank 0's
validation value (one broadcast per validation in the final stage), so all ranks stop after the same epoch.
"""

from __future__ import annotations

import logging
import numbers
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers.early_stopping import EarlyStopping

from dira3d.engines.distributed import all_ranks_min, get_world_size, is_main_process, main_process_value
from dira3d.engines.epoch_end import at_epoch_end
from dira3d.utils.interrupts import StoppedBySignal
from dira3d.utils.overrides import as_bool
from dira3d.utils.threads import wait_for_pool_threads_at_exit

__all__ = ["STOP_SIGNALS", "SignalStop", "StoppedBySignal", "exit_if_stopped", "stop_before_training",
           "end_stop_before_training", "FinalStageEarlyStop", "check_early_stop_patience"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


_BEFORE_TRAINING: dict[int, Any] = {}  # the handlers stop_before_training replaced, until the training starts


def stop_before_training(what: str = "training") -> None:
    """A bundle's ``initialize`` step: until the training starts (the data are loaded and cached while the trainer
    is built, in ``run``), SIGTERM / Ctrl-C end the run with one line and :class:`StoppedBySignal` (exit 143 / 130)
    instead of killing it without a word.

    Args:
        what: the run's name in the line (``"pretraining"``, ``"fine-tuning"``).

    Only in the main thread, and only when the process has its default handlers (``python -m monai.bundle run``,
    ``torchrun``): a command that handles SIGTERM itself says what to do in its own line. Idempotent.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    if any(signal.getsignal(s) is not defaults[s] for s in STOP_SIGNALS if s not in _BEFORE_TRAINING):
        return

    def handle(signum: int, frame: Any) -> None:
        end_stop_before_training()  # a second signal while this one unwinds: the default (stop now)
        name = signal.Signals(signum).name
        if is_main_process():  # every rank of a torchrun gets the signal: one line
            logging.getLogger("dira3d.stopping").warning(
                f"{what} stopped by {name} before training started (while the data were loaded and cached); nothing "
                "was trained or saved; run the same command again to start it")
        # a CacheDataset's pool, terminated on the way out, may still load an item in native code: the exit waits for
        # it (it aborted the process, SIGABRT, after this line); the signal may have reached one of those threads,
        # and Python runs this handler only when the main thread next runs Python code: after the pool's next item
        wait_for_pool_threads_at_exit()
        raise StoppedBySignal(name, 0)

    for signum in STOP_SIGNALS:
        _BEFORE_TRAINING.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, handle)


def end_stop_before_training() -> None:
    """Put back the handlers :func:`stop_before_training` replaced (a no-op when it replaced none).

    The training puts them back when it starts (:meth:`SignalStop.installed`); the bundles' first ``finalize`` step
    calls this too, for a workflow that was initialised and never ran, or whose ``run`` failed before the training
    started (a notebook's ``workflow.initialize()`` then ``workflow.finalize()``): Ctrl-C there then interrupts the
    cell again instead of raising :class:`StoppedBySignal` with a line about a training that never started."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in _BEFORE_TRAINING.items():
        signal.signal(signum, previous)
    _BEFORE_TRAINING.clear()


class SignalStop:
    """Record SIGTERM / SIGINT while an engine runs and end the run at an iteration boundary.

    ``requested`` (the first signal's number, or None) is all the handler sets. :meth:`poll` runs on
    every ``ITERATION_COMPLETED`` and stops a one-process run; under DDP ``requested`` feeds the periodic
    joint decision (:meth:`~dira3d.engines.faults.NonFiniteGuard.periodic_check`), whose result goes to :meth:`stop`.
    :meth:`after_epoch_end`, the last ``EPOCH_COMPLETED`` handler, ends the run after an epoch's end in which a signal
    came (or to which a stop on its last step was deferred).
    """

    def __init__(self, finish_epoch: bool = False) -> None:
        self.requested: int | None = None
        self.stopping = False
        self.single_process = True
        self.finish_epoch = bool(finish_epoch)
        self.deferred = False  # a stop on an epoch's last step, waiting for that epoch's end (finish_epoch)
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is None:
            self.requested = signum
            return
        previous = self._previous.get(signum)
        waiting = not self.stopping or self.deferred  # (a deferred stop: its epoch end, a validation, still runs)
        if signum == signal.SIGINT and self.single_process and waiting and callable(previous):
            previous(signum, frame)  # Ctrl-C twice: what Ctrl-C did before the run (KeyboardInterrupt)
        # otherwise ignored: the run is already stopping (and last.pt may be being written)

    @contextmanager
    def installed(self, engine: Engine) -> Iterator[None]:
        """Catch the signals while the body (the engine's run) lasts; put the previous handlers back after."""
        self.requested, self.stopping, self.deferred = None, False, False
        engine.state.stop_deferred = False
        self.single_process = get_world_size() == 1
        engine.state.stopped_by = None
        if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
            yield
            return
        end_stop_before_training()  # the handlers of the data loading: this one takes over, and puts back theirs
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous in (signal.SIG_IGN, None):  # ignored on purpose, or set outside Python: leave it
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        try:
            yield
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous = {}

    def poll(self, engine: Engine) -> None:
        """``ITERATION_COMPLETED``: a one-process run stops after this step when a signal came."""
        if self.requested is not None and self.single_process:
            self.stop(engine, self.requested)

    def stop(self, engine: Engine, signum: int | None = None) -> None:
        """End the run after this iteration (every rank calls it at the same one under DDP)."""
        if self.stopping:
            return
        self.stopping = True
        signum = signum or self.requested or signal.SIGTERM  # another rank's signal: this one may have had none yet
        engine.state.stopped_by = signal.Signals(signum).name
        if self.finish_epoch and at_epoch_end(engine):  # the same decision on every rank: the same iteration
            # the epoch's last step: its end (validation, best.pt, the epoch-end last.pt) runs before the run ends,
            # as in a run not stopped (ignite skips EPOCH_COMPLETED after terminate(), and the resume, which starts
            # the next epoch, never ran it); the checkpoint handler writes last.pt first (state.stop_deferred)
            self.deferred = engine.state.stop_deferred = True
            return
        engine.terminate()

    def after_epoch_end(self, engine: Engine) -> None:
        """``EPOCH_COMPLETED``, the trainer's last handler of the event (after its validation, ``best.pt``, the
        epoch-end ``last.pt``): end the run right after this epoch's end when a stop waits for it (``finish_epoch``),
        or when a signal came since the last check, during that end (its validation can take minutes; the run stopped
        after the next epoch's first step). ignite then fires ``COMPLETED`` (``last.pt`` at this epoch's end) and no
        step of the next epoch runs: a resume starts it as an uninterrupted run does. The same after the epoch end that
        a resume runs first (:func:`~dira3d.engines.epoch_end.run_pending_epoch_end` fires the event). Under DDP the
        ranks agree first, in one all-reduce at every epoch end (every rank runs every epoch end, and ``stopping`` is
        the same on all: joint decisions set it), so all stop after the same epoch and none waits for another."""
        if self.stopping:  # decided (by every rank alike): a deferred stop ends here, any other has terminated already
            if self.deferred:
                engine.terminate()
            return
        signum = self.requested or 0
        if not self.single_process:
            signum = -all_ranks_min([-signum], getattr(engine.state, "device", None) or "cpu")[0]
        if signum:
            self.stopping = True  # further signals are ignored (last.pt is being written), as after any decided stop
            engine.state.stopped_by = signal.Signals(signum).name
            engine.terminate()


def exit_if_stopped(engine: Engine) -> None:
    """Raise :class:`StoppedBySignal` when ``engine``'s last run was stopped by a signal (a no-op otherwise).

    The bundles call it as the last ``finalize`` step, after the TensorBoard writer is closed and the
    process group left, so that ``python -m monai.bundle run`` / ``torchrun`` exit with 143 (SIGTERM) or 130 (SIGINT).
    """
    name = getattr(engine.state, "stopped_by", None)
    if name:
        raise StoppedBySignal(name, engine.state.iteration)


def check_early_stop_patience(patience: Any, validation: Any = True) -> int | None:
    """``early_stop_patience`` as an int, or None (off); the bundles call it in ``initialize``, before any data is cached,
    with their ``validation`` setting (False: no validation set, so no loss to stop on).

    Raises:
        DataError: (a ``ValueError``; one ``error:`` line under ``python -m monai.bundle run``, as the other settings'
            checks) not a whole number >= 1 (a negative, zero, fractional, infinite, NaN, boolean or text value), naming
            the setting; a patience with ``validation`` false, naming both settings; a ``validation`` that is not a
            boolean.
    """
    from dira3d.data.errors import DataError

    validation = as_bool(validation, "validation")
    if patience is None:
        return None
    if isinstance(patience, bool) or not isinstance(patience, numbers.Real) or not float(patience).is_integer() or patience < 1:
        raise DataError(None, f"early_stop_patience={patience!r} must be a whole number >= 1: the validations in a row "
                        "without a lower validation loss in the final stage after which pretraining stops (null: "
                        "no early stopping, the run goes to max_epochs)")
    if not validation:
        raise DataError(None, f"early_stop_patience={patience!r} stops on the validation loss, but validation is false "
                        "(no validation set, e.g. a `dira3d visual-words` output without validation words): set "
                        "early_stop_patience to null to train for max_epochs, or validation to true with a validation "
                        "set (docs: bundles/dira_pretrain/docs/README.md, 'Without validation')")
    return int(patience)


class FinalStageEarlyStop:
    """Stop pretraining when ``metric_name`` has not improved for ``patience`` validations in the final stage.

    Made and attached by :class:`~dira3d.engines.DiRACheckpoint` (``early_stop_patience``), which writes
    :meth:`state_dict` into each checkpoint and restores it on resume; see the module docstring.

    Args:
        patience: validations in a row without improvement (:func:`check_early_stop_patience`).
        metric_name: the validation metric, lower is better.
        summary_writer: TensorBoard writer for the text ``early_stop`` when the run stops (None: none); written
            on rank 0 alone.
        best_path: the ``best.pt`` file, named in the message.

    Raises:
        ValueError: a bad ``patience``; when attached, no :class:`~dira3d.engines.DiRAEvaluator` attached
            to the trainer before it (no validation loss to stop on); in the run, ``metric_name`` missing
            from the validation metrics.
    """

    def __init__(self, patience: int, metric_name: str = "val_selection_loss", summary_writer: Any = None,
                 best_path: Any = None) -> None:
        checked = check_early_stop_patience(patience)
        if checked is None:
            raise ValueError("early_stop_patience is None: do not create FinalStageEarlyStop (early stopping is off)")
        self.patience, self.metric_name = checked, metric_name
        self.summary_writer, self.best_path = summary_writer, best_path
        self.stopper: EarlyStopping | None = None  # ignite's counter, made at attach (it needs the trainer)
        self.stage = ""  # the final stage the count belongs to
        self.best_epoch = -1
        self.stopped_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        """Check that a validation runs before this handler; count on ``EPOCH_COMPLETED``, resume on ``STARTED``."""
        if getattr(engine, "evaluator", None) is None:
            raise ValueError(
                f"early_stop_patience={self.patience} stops on the validation loss, but no DiRAEvaluator is attached "
                "before the checkpoint handler: list a DiRAEvaluator before DiRACheckpoint in train_handlers (in the "
                "dira_pretrain bundle: keep '@validate#evaluator' first in train#handlers), or set "
                "early_stop_patience to null to train for max_epochs")
        self.stopper = EarlyStopping(self.patience, self._score, engine, mode="min")
        self.stopper.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain numbers and text: loadable with ``weights_only=True``)."""
        stopper = self.stopper
        return {"counter": int(stopper.counter) if stopper else 0,
                "best_score": None if stopper is None or stopper.best_score is None else float(stopper.best_score),
                "best_epoch": int(self.best_epoch), "stage": self.stage, "stopped_epoch": self.stopped_epoch,
                "patience": self.patience, "metric": self.metric_name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after ``attach``). A count below this run's patience (a larger
        ``early_stop_patience`` given to a run that had stopped) goes on counting."""
        self.stopper.load_state_dict({"counter": int(state["counter"]), "best_score": state["best_score"],
                                      "threshold_mode": "abs"})
        self.best_epoch, self.stage = int(state["best_epoch"]), str(state["stage"])
        self.stopped_epoch = state.get("stopped_epoch")

    def _score(self, engine: Engine) -> float:
        value = engine.state.metrics.get(self.metric_name)
        if value is None:
            known = sorted(k for k in engine.state.metrics if k.startswith("val_"))
            raise ValueError(f"early stopping: the validation gave no {self.metric_name!r} (it gave {known}); set the "
                             "checkpoint handler's metric_name to one of them, or early_stop_patience to null")
        return main_process_value(value, engine.state.device)  # every rank decides on rank 0's value

    def _in_final_stage(self, engine: Engine) -> bool:
        schedule = engine.schedule
        return schedule.index(engine.current_stage()) == len(schedule.stages) - 1

    def __call__(self, engine: Engine) -> None:
        """``EPOCH_COMPLETED``, before the checkpoint is written: count this epoch's validation in the final stage."""
        if getattr(engine.state, "val_epoch", None) != engine.state.epoch or not self._in_final_stage(engine):
            return  # no validation this epoch, or an earlier stage (which runs to its bound)
        stage = engine.current_stage().name
        if stage != self.stage:  # the final stage's first validation (or the stages were renamed): count afresh
            self.stopper.reset()
            self.stage, self.best_epoch, self.stopped_epoch = stage, -1, None
        self.stopper(engine)  # ignite's EarlyStopping: terminate() once the count reaches the patience
        if self.stopper.counter == 0:
            self.best_epoch = int(engine.state.epoch)
        engine.state.metrics["early_stop_wait"] = float(self.stopper.counter)  # console and TensorBoard, each epoch
        if self.stopper.counter >= self.patience:
            self.stopped_epoch = int(engine.state.epoch)
            self._report(engine, self.message(engine.state.epoch, engine.state.max_epochs))

    def message(self, epoch: int, max_epochs: int | None) -> str:
        """Why and when the run stopped, in one line."""
        best = "" if self.stopper.best_score is None else f" ({self.stopper.best_score:.5f})"
        where = f"; {self.best_path} holds that epoch" if self.best_path else ""
        return (f"early stop after epoch {epoch} of max_epochs {max_epochs}: {self.metric_name} has not improved for "
                f"{self.stopper.counter} validation(s) in the final stage '{self.stage}' (early_stop_patience="
                f"{self.patience}); its best{best} was at epoch {self.best_epoch}{where}")

    def _report(self, engine: Engine, message: str, tensorboard: bool = True) -> None:
        engine.state.early_stopped = message  # DiRATrainer.run repeats it as the run's last line
        engine.logger.info(message)
        # rank 0 alone writes TensorBoard (the other ranks of multi_gpu_train.json hold a writer that stays unused)
        if tensorboard and self.summary_writer is not None and is_main_process():
            self.summary_writer.add_text("early_stop", message, int(engine.state.epoch))
            self.summary_writer.flush()

    def started(self, engine: Engine) -> None:
        """``STARTED``, after the checkpoint handler's resume: a run whose count already reaches the patience
        (it stopped early, or this run's patience is smaller) stops at once."""
        if (self.stopper.counter >= self.patience and self._in_final_stage(engine)
                and engine.current_stage().name == self.stage):
            self.stopped_epoch = self.stopped_epoch or int(engine.state.epoch)
            message = (f"{self.message(self.stopped_epoch, engine.state.max_epochs)}; resumed from there: nothing to do "
                       "(a larger early_stop_patience, or null, trains on)")
            self._report(engine, message, tensorboard=False)
            engine.terminate()
