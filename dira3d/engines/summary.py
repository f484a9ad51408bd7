"""A TensorBoard ``SummaryWriter`` whose event file appears with the first thing written to it, and the closing of a
run's writers when its engine's run ends (:class:`WriterCloser`, :func:`close_writers`).

torch's ``SummaryWriter`` creates ``events.out.tfevents.*`` (a file-version header, 88 bytes) as it is
constructed. A bundle builds its writer while it sets up, before the data are cached, the folder
lock is taken or the distributed group has formed, so a run that fails there (a second run into
the same folder, a bad torchrun setting, a broken datalist) left an empty event file that TensorBoard
lists as an empty run. :class:`LazySummaryWriter` defers it: torch already creates its file writer
on demand (every ``add_*`` goes through ``_get_file_writer``, and ``flush`` / ``close`` do nothing
without one), so only the eager call in ``__init__`` is skipped.

A writer that is never closed keeps its ``_AsyncWriterThread`` (and its open event file) until the process ends:
MONAI's ``TensorBoardStatsHandler`` opens one of its own when given no ``summary_writer`` and never closes it. A
closed ``SummaryWriter`` opens a new event file at its next ``add_*``, so an engine run again in the same process (a
notebook) logs its values all the same (TensorBoard reads every event file of the folder as one run).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

__all__ = ["LazySummaryWriter", "WriterCloser", "close_writers", "purge_from"]


class LazySummaryWriter(SummaryWriter):
    """``torch.utils.tensorboard.SummaryWriter`` (same arguments) that creates its event file at the
    first ``add_*`` call, not when it is constructed: a run that fails before logging anything leaves
    no event file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._constructing = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            self._constructing = False

    def _get_file_writer(self) -> Any:
        if self._constructing:
            return None
        return super()._get_file_writer()


def purge_from(writer: Any, step: int) -> None:
    """Tell TensorBoard that a run goes on from ``step`` (a resume from a checkpoint): the values that an earlier
    event file of the same folder holds at ``step`` or later (logged after that checkpoint by a run that was then
    killed) are hidden, so every step shows once. torch's ``purge_step`` (a ``SessionLog.START`` event): written as
    the writer's event file is created, or at once when it exists already. ``writer`` None: nothing to do."""
    if writer is None or not hasattr(writer, "purge_step"):
        return
    if getattr(writer, "file_writer", None) is None:
        writer.purge_step = int(step)  # LazySummaryWriter: with the event file, at the first value logged
        return
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=int(step), session_log=SessionLog(status=SessionLog.START)))


def _writer_owners(engine: Engine) -> list[Any]:
    """The handlers attached to ``engine`` that own a TensorBoard writer (MONAI's ``TensorBoardHandler`` subclasses and
    :class:`~dira3d.engines.RestorationImageHandler`; each one's ``close()`` closes the writer only if it made it)."""
    from monai.handlers import TensorBoardHandler

    from dira3d.engines.handlers import RestorationImageHandler

    owners: list[Any] = []
    for handlers in engine._event_handlers.values():  # ignite's lists of (handler, args, kwargs)
        for handler, _, _ in handlers:
            owner = getattr(inspect.unwrap(handler), "__self__", None)  # an event filter wraps the bound method
            if isinstance(owner, (TensorBoardHandler, RestorationImageHandler)) and all(o is not owner for o in owners):
                owners.append(owner)
    return owners


def close_writers(*engines: Engine | None, writers: Iterable[Any] = ()) -> None:
    """Close ``writers`` and the writers that the handlers attached to ``engines`` (None: left out) made for themselves.

    A writer given by the config (``summary_writer``) is not closed by its handler: pass it in ``writers``. Each
    closed writer's values are on disk; its next ``add_*`` starts a new event file."""
    for engine in engines:
        if engine is not None:
            for owner in _writer_owners(engine):
                owner.close()
    for writer in writers:
        if writer is not None:
            writer.close()


class WriterCloser:
    """Closes TensorBoard writers when the run of the engine it is attached to ends: at ``COMPLETED`` (which a run
    terminated by a signal or an early stop fires too) and at ``EXCEPTION_RAISED``.

    Closes ``writers`` and the writers of the handlers attached to ``engines`` that made their own
    (:func:`close_writers`). Attach it after the handlers that write at ``COMPLETED``. The exception
    handler goes before the engine's others (MONAI's ``StatsHandler`` raises the exception again, so no later handler
    would run) and raises the exception itself only when it is the engine's one exception handler, as ignite does
    when there is none (as :class:`dira3d.evaluation.ClosingProgressBar`).

    Args:
        writers: writers to close (a bundle's shared ``SummaryWriter``); None entries are left out.
        engines: engines (this one, a validator) whose handlers' own writers are closed.
    """

    def __init__(self, writers: Iterable[Any] = (), engines: Iterable[Engine | None] = ()) -> None:
        self.writers, self.engines = list(writers), list(engines)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close_on_exception)
        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]  # ignite's list, run in order
        handlers.insert(0, handlers.pop())

    def close(self, engine: Engine | None = None) -> None:
        close_writers(*self.engines, writers=self.writers)

    def _close_on_exception(self, engine: Engine, err: BaseException) -> None:
        self.close(engine)
        if len(engine._event_handlers[Events.EXCEPTION_RAISED]) == 1:
            raise err
