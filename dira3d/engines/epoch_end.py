"""An epoch's end that a killed run left undone: recorded in ``last.pt``, run first by the resume.

An epoch's end (ignite's ``EPOCH_COMPLETED``: the trainer's ``train_*`` means, the validation, the early-stopping
count, the ``best.pt`` decision, the epoch-end ``last.pt``, then the console and TensorBoard epoch values) runs after
the epoch's last iteration. ``last.pt`` can be written at that iteration before it: by ``save_every_iterations``, and
before the validation of a stop on the epoch's last step (:class:`~dira3d.engines.stopping.SignalStop`
``finish_epoch``). A SIGKILL (SLURM's grace period, an OOM kill, a crash) during that validation left a ``last.pt``
at "the end of epoch N", and the resume started epoch N + 1: epoch N was never validated, its ``val_*`` / ``train_*``
epoch values were missing and ``best.pt`` could differ from an uninterrupted run's.

Such a ``last.pt`` now says so (``trainer`` key ``epoch_end_pending``: True), and its running sums of the epoch's
outputs are kept, not cleared by the resume. The resume then runs that epoch's end first (:func:`run_pending_epoch_end`,
the trainer's last ``STARTED`` handler, after the checkpoint handler's resume): ``EPOCH_COMPLETED`` fires for epoch N
with every handler of the event, as in the uninterrupted run, and the checkpoint handler writes ``last.pt`` again
(atomically) without the record, whatever ``save_every_epochs``. A second kill before that rewrite resumes from the
same record and runs the epoch end again; one after it resumes at the start of epoch N + 1. TensorBoard gets the epoch's
values once: the killed run logs them after that rewrite only. A checkpoint without the key (dira3d before it) resumes
as before: at the next epoch.

The resumed run's log has the lines of an uninterrupted run's for that epoch: ignite's ``Epoch[N] Complete`` line, which
its loop logs after an epoch's end (and not after an end that ended the run), is logged here too. Early stopping that
fires in that end ends the run there (ignite looks at ``terminate()`` right after ``STARTED``), as in an uninterrupted
run. A SIGTERM / Ctrl-C during that end (its validation can take minutes) ends the run right after it, before the next
epoch trains a step, as a stop deferred to an epoch's end does
(:meth:`~dira3d.engines.stopping.SignalStop.after_epoch_end`, the last handler of the event, as after any epoch's end;
the ranks agree first under DDP): ``last.pt`` at that end, exit 143 / 130. It stopped after the next epoch's first
step.

:class:`EpochEndRecord` is the checkpoint handler's bookkeeping of whether the epoch that the last iteration
completed has reached the handler's ``EPOCH_COMPLETED`` (the same on every rank under DDP: the same events, the same
iterations).
"""

from __future__ import annotations

import time

from ignite.engine import Engine, Events

__all__ = ["at_epoch_end", "EpochEndRecord", "run_pending_epoch_end"]


def at_epoch_end(engine: Engine) -> bool:
    """Whether the iteration just completed is its epoch's last (:meth:`DiRATrainer.epoch_position`, else the count)."""
    position = getattr(engine, "epoch_position", None)
    if callable(position):
        return position()[1] == 0 and engine.state.iteration > 0
    length = engine.state.epoch_length or 0
    return bool(length) and engine.state.iteration > 0 and engine.state.iteration % length == 0


class EpochEndRecord:
    """Whether a checkpoint written now must say ``epoch_end_pending`` (:class:`~dira3d.engines.DiRACheckpoint`'s).

    ``ended_iteration``: the iteration whose epoch end reached the checkpoint handler (or that a resume found ended);
    ``on_disk``: the latest ``last.pt`` holds the record, so the epoch's end must write it again.
    """

    def __init__(self) -> None:
        self.ended_iteration: int | None = None
        self.on_disk = False

    def pending(self, engine: Engine) -> bool:
        """True at an epoch's last iteration whose epoch end has not reached the checkpoint handler yet."""
        return at_epoch_end(engine) and self.ended_iteration != int(engine.state.iteration)

    def saved(self, pending: bool) -> None:
        """``last.pt`` was written (on rank 0; recorded on every rank) with ``epoch_end_pending=pending``."""
        self.on_disk = bool(pending)

    def end(self, engine: Engine) -> bool:
        """The checkpoint handler's ``EPOCH_COMPLETED``: the epoch has ended; returns whether ``last.pt`` holds the
        record (it must then be written again, whatever ``save_every_epochs``)."""
        self.ended_iteration = int(engine.state.iteration)
        return self.on_disk

    def resumed(self, engine: Engine, pending: bool) -> None:
        """A resume from a checkpoint with ``epoch_end_pending=pending``: without it, the epoch (if the checkpoint is at
        an epoch's end) has ended; with it, the end runs first (:func:`run_pending_epoch_end`)."""
        self.ended_iteration = None if pending else int(engine.state.iteration)
        self.on_disk = bool(pending)


def run_pending_epoch_end(engine: Engine) -> None:
    """``STARTED``, after every other handler's (the checkpoint handler's resume included): when the resume found
    ``epoch_end_pending`` (``engine.state.epoch_end_pending``, set by
    :func:`~dira3d.engines.checkpoint.restore_checkpoint`), run that epoch's end now, before the next epoch starts:
    ``EPOCH_COMPLETED`` for ``state.epoch``, every handler of the event, as the killed run would have.

    Then, as after an epoch's end in ignite's loop: ignite's ``Epoch[N] Complete. Time taken: ...`` line (its time:
    that of the end run here; the epoch's steps ran in the killed run), left out when the end ended the run (early
    stopping, as in an uninterrupted run, or a signal). A SIGTERM / Ctrl-C that came during that end ends the run right
    after it (:meth:`~dira3d.engines.stopping.SignalStop.after_epoch_end`, a handler of the event), as after any epoch's
    end, instead of after the next epoch's first step; a second Ctrl-C during it stops at once (``last.pt`` as it
    was: the end is still pending there, or was written again)."""
    if not getattr(engine.state, "epoch_end_pending", False):
        return
    engine.state.epoch_end_pending = False
    engine.logger.info(f"epoch {engine.state.epoch}'s end (validation, best.pt, epoch means) did not complete before "
                       "the run was killed: running it now")
    started = time.time()
    # ignite's public way to run an event's handlers; the last, DiRATrainer's SignalStop.after_epoch_end, stops the run
    # now (before the next epoch) when a SIGTERM / Ctrl-C came during that end (its validation)
    engine.fire_event(Events.EPOCH_COMPLETED)
    if not engine.should_terminate:  # ignite's line after an epoch's end, left out when that end ended the run
        minutes, seconds = divmod(time.time() - started, 60)
        engine.logger.info(f"Epoch[{engine.state.epoch}] Complete. Time taken: "
                           f"{int(minutes // 60):02d}:{int(minutes % 60):02d}:{seconds:06.3f}")
