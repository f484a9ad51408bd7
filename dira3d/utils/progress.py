"""Whether to draw a progress bar: only for a person watching a terminal, never into a log file.

A tqdm bar redraws itself with carriage returns several times a second; written to a file (a CI log, SLURM's
``slurm-<id>.out``, ``python -m monai.bundle run ... > log``) that is thousands of partial lines. The bundles
show one where a person waits without other output (the validation of each fine-tuning epoch and the test
evaluation: ignite's ``ProgressBar`` over the cases; sliding-window inference over a whole CT and the caching of a
``CacheDataset``: MONAI's ``progress``) and ask :func:`show_progress` first. Under ``torchrun`` only rank 0 draws one
(every rank shares the terminal).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["PROGRESS_SECONDS", "ProgressLines", "show_progress"]

PROGRESS_SECONDS = 60.0  # a ProgressLines line at most this often


def show_progress(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default ``sys.stderr``, where tqdm draws) is a terminal and this process is rank 0
    (``RANK`` unset or 0); False for a file, a pipe, a closed stream, or another rank."""
    stream = sys.stderr if stream is None else stream
    try:
        terminal = bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        terminal = False
    return terminal and int(os.environ.get("RANK", "0") or 0) == 0


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class ProgressLines:
    """Where no bar is drawn (a log file, a pipe: :func:`show_progress` is False), one line
    ``<what>: <done>/<total> <unit> (<elapsed>; about <left> to go)`` on ``stream`` (default ``sys.stderr``) at most
    every :data:`PROGRESS_SECONDS`, so that a batch job's log shows it is alive (``dira3d prepare`` over hundreds of
    full CTs, about 17 s each on a 2-core CPU, printed nothing for hours). ``emit`` (e.g. ``logger.info``) takes the
    line instead of ``stream``; ``enabled=False`` prints nothing."""

    def __init__(self, what: str, total: int, unit: str = "cases", enabled: bool = True,
                 stream: TextIO | None = None, emit: Callable[[str], Any] | None = None) -> None:
        self.what, self.total, self.unit, self.enabled, self.stream = what, int(total), unit, enabled, stream
        self.emit = emit  # e.g. a logger's info; None: print to stream
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or self.done >= self.total or now - self.last < PROGRESS_SECONDS:
            return
        self.last, elapsed = now, now - self.start
        left = elapsed / max(self.done, 1) * (self.total - self.done)
        line = f"{self.what}: {self.done}/{self.total} {self.unit} ({_duration(elapsed)}; about {_duration(left)} to go)"
        if self.emit is not None:
            self.emit(line)
        else:
            print(line, file=self.stream or sys.stderr, flush=True)
