"""Stop a pretraining run cleanly on SIGTERM or Ctrl-C (SIGINT): finish the step, write ``last.pt``, exit.

SLURM (preemption, ``scancel``, the time limit), Kubernetes evictions and ``torchrun`` send SIGTERM,
then SIGKILL after a grace period (SLURM's ``KillWait`` and Kubernetes' default: 30 s; ``torchrun``
kills its workers 30 s after it forwards the signal). While :class:`DiRATrainer` runs,
:class:`SignalStop` catches both signals; its handler only records the first one. The trainer looks
at the record on ``ITERATION_COMPLETED`` (a Python attribute test, nothing in the step) and ends the run
with ``engine.terminate()``: ignite then fires ``COMPLETED``, where :class:`~dira3d.engines.DiRACheckpoint`
writes ``last.pt`` at that iteration (the atomic mid-epoch checkpoint) and releases its lock.

- One process: the run stops after the step in progress.
- Under DDP every rank must stop at the same iteration (a rank that left would leave the others
  waiting in an all-reduce): the ranks agree in the all-reduce the non-finite check already makes every
  ``check_every`` iterations (:meth:`dira3d.engines.NonFiniteGuard.periodic_check`), and stop when a signal
  reached any of them. The stop comes up to ``check_every`` iterations after the signal.
- Once the stop is decided, further signals are ignored (``last.pt`` is being written). Before that, a
  second Ctrl-C in a one-process run does what Ctrl-C did before the run (``KeyboardInterrupt``: stop
  now, ``last.pt`` stays the last one written); a second SIGTERM is ignored, and so is a second SIGINT
  under ``torchrun`` (which forwards the Ctrl-C it gets to workers that had it from the terminal already).
- The handlers are installed only while the engine runs, in the main thread, and the previous ones are
  put back afterwards; a signal set to be ignored (``SIG_IGN``) stays ignored.

After such a stop ``trainer.run()`` returns with ``trainer.state.stopped_by`` set to ``"SIGTERM"`` or
``"SIGINT"`` (None after a full run); :func:`exit_if_stopped` (the bundle's last ``finalize`` step) then
raises :class:`StoppedBySignal`, a ``SystemExit`` with code 143 (SIGTERM) or 130 (SIGINT).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ignite.engine import Engine

from dira3d.engines.distributed import get_world_size
from dira3d.utils.interrupts import StoppedBySignal

__all__ = ["STOP_SIGNALS", "SignalStop", "StoppedBySignal", "exit_if_stopped"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalStop:
    """Record SIGTERM / SIGINT while an engine runs and end the run at an iteration boundary.

    ``requested`` (the first signal's number, or None) is all the handler sets. :meth:`poll` runs on
    every ``ITERATION_COMPLETED`` and stops a one-process run; under DDP ``requested`` feeds the periodic
    joint decision (:meth:`~dira3d.engines.faults.NonFiniteGuard.periodic_check`), whose result goes to :meth:`stop`.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self.stopping = False
        self.single_process = True
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is None:
            self.requested = signum
            return
        previous = self._previous.get(signum)
        if signum == signal.SIGINT and self.single_process and not self.stopping and callable(previous):
            previous(signum, frame)  # Ctrl-C twice: what Ctrl-C did before the run (KeyboardInterrupt)
        # otherwise ignored: the run is already stopping (and last.pt may be being written)

    @contextmanager
    def installed(self, engine: Engine) -> Iterator[None]:
        """Catch the signals while the body (the engine's run) lasts; put the previous handlers back after."""
        self.requested, self.stopping = None, False
        self.single_process = get_world_size() == 1
        engine.state.stopped_by = None
        if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
            yield
            return
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
        engine.terminate()


def exit_if_stopped(engine: Engine) -> None:
    """Raise :class:`StoppedBySignal` when ``engine``'s last run was stopped by a signal (a no-op otherwise).

    The bundles call it as the last ``finalize`` step, after the TensorBoard writer is closed and the
    process group left, so that ``python -m monai.bundle run`` / ``torchrun`` exit with 143 (SIGTERM) or 130 (SIGINT).
    """
    name = getattr(engine.state, "stopped_by", None)
    if name:
        raise StoppedBySignal(name, engine.state.iteration)
