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

__all__ = ["LazySummaryWriter"]


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
