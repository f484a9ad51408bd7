"""The worker processes of ``dira3d prepare --workers N``: they end when the command's process is gone.

A ``ProcessPoolExecutor`` worker waits for its next case on a pipe whose write end it holds itself (a forked
worker inherits both ends), so it never learns that the process that started it died. When that process was
killed (SIGKILL, the OOM killer, a ``kill`` of a ``nohup`` job) its workers stayed, idle, for good, and they held
the lock on ``--dst`` (:mod:`dira3d.utils.folder_lock`: a forked worker shares the lock's open file): the rerun
that the command's message recommends was refused (``output folder (--dst) ... is in use by process N``, N being
the dead process) until the user found and killed them. Each worker now watches its parent and ends
(``os._exit``) within :data:`WATCH_INTERVAL` seconds of its death; a case it was writing leaves only a hidden
temporary file, which the rerun removes (:func:`dira3d.utils.atomic.stale_temporaries`).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

__all__ = ["WATCH_INTERVAL", "case_pool"]

WATCH_INTERVAL = 0.5  # seconds between a worker's checks that its parent is still there


def case_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes that end when the calling process is gone (see the module docstring)."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_end_with_parent, initargs=(os.getpid(),))


def _end_with_parent(parent: int) -> None:
    """The workers' initializer: a daemon thread that ends the worker once ``parent`` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_INTERVAL)
        os._exit(1)  # no cleanup that could wait for the dead parent (queues, the pool's pipes)

    threading.Thread(target=watch, name="dira3d-end-with-parent", daemon=True).start()
