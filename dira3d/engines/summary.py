"""A TensorBoard ``SummaryWriter`` whose event file appears with the first thing written to it.

torch's ``SummaryWriter`` creates ``events.out.tfevents.*`` (a file-version header, 88 bytes) as it is
constructed. A bundle builds its writer while it sets up, before the data are cached, the folder
lock is taken or the distributed group has formed, so a run that fails there (a second run into
the same folder, a bad torchrun setting, a broken datalist) left an empty event file that TensorBoard
lists as an empty run. :class:`LazySummaryWriter` defers it: torch already creates its file writer
on demand (every ``add_*`` goes through ``_get_file_writer``, and ``flush`` / ``close`` do nothing
without one), so only the eager call in ``__init__`` is skipped.
"""

from __future__ import annotations

from typing import Any

from torch.utils.tensorboard import SummaryWriter

__all__ = ["LazySummaryWriter", "purge_from"]


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
