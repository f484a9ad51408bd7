"""One context manager for the places that keep some records of a logger quiet for a while.

:func:`records_filtered` adds a filter to a logger while a block runs and removes it afterwards, also when the block
raises: what ``dira3d pretrain`` and the demo use to print the "already finished" line once in their own words
(``dira3d.engines.finished``), ``dira3d finetune`` to drop MONAI's ``logging_file=False`` warning
(``dira3d.evaluation.finetune_messages``), and ``LoadVolumed`` to hold MONAI's per-reader "unable to load" lines
(``dira3d.engines.inputs``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["records_filtered"]


@contextmanager
def records_filtered(logger_name: str, keep: Callable[[logging.LogRecord], bool]) -> Iterator[logging.Logger]:
    """While the block runs, the logger ``logger_name`` passes only the records for which ``keep`` is true (the
    logger's own filters, not its handlers'); yields the logger."""
    log = logging.getLogger(logger_name)
    log.addFilter(keep)
    try:
        yield log
    finally:
        log.removeFilter(keep)
