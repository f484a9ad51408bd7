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
from typing import TextIO

__all__ = ["show_progress"]


def show_progress(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default ``sys.stderr``, where tqdm draws) is a terminal and this process is rank 0
    (``RANK`` unset or 0); False for a file, a pipe, a closed stream, or another rank."""
    stream = sys.stderr if stream is None else stream
    try:
        terminal = bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        terminal = False
    return terminal and int(os.environ.get("RANK", "0") or 0) == 0
