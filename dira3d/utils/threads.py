"""Let the worker threads of a failed thread pool finish their item before the interpreter exits.

MONAI's ``CacheDataset`` loads its items in a ``multiprocessing.pool.ThreadPool``. When one item
fails (a raw-HU scan that the pretraining bundle refuses, a truncated file), the pool is terminated
and the error reaches the command, which prints it and returns while the pool's other threads are
still loading their items in native code (SimpleITK, torch). At exit, CPython ends such a daemon
thread when it takes the GIL back, with ``pthread_exit``; the forced unwind through C++ frames
aborts the process (``FATAL: exception not rethrown`` or ``terminate called without an active
exception``, exit code 134) after the command's one-line error. A terminated pool's workers end
after their current item, so waiting for them gives the command's own exit code.

``dira3d.cli.main`` waits for them when a command fails; for an uncaught error (``python -m
monai.bundle run`` of a bundle whose data fail to load) an ``atexit`` hook, registered when
``dira3d`` is imported, does, and so after a SIGTERM / Ctrl-C while the data were cached
(:func:`dira3d.engines.stop_before_training` calls :func:`wait_for_pool_threads_at_exit`: its
``StoppedBySignal`` is a ``SystemExit``, no uncaught error; the exit aborted, SIGABRT after the stop's line).

:func:`block_stop_signals_in_pool_thread` keeps SIGTERM and SIGINT off those worker threads. The kernel hands a
process-directed signal to any thread that does not block it, and CPython runs the Python handler in the main thread
only when that thread next runs Python code: a signal taken by a worker thread waited until the pool's next item in
order was loaded, while the main thread waited for it in the pool (seconds to minutes for a big CT; a SLURM
preemption gives 30 to 90 s before SIGKILL). Blocked in the workers, the signals are never handed to a thread that
is loading an item; the kernel hands them to the main thread (its first choice), whose wait they interrupt at once.
(The pool's three bookkeeping threads, made by ``ThreadPool`` in the calling thread before any item, are not
covered; neither are native threads such as OpenMP's, which the kernel rarely picks either.) The bundles' memory
cache (:class:`dira3d.engines.diskcache.SignalSafeCacheDataset`, made by :func:`dira3d.engines.cached_dataset`) calls
it in each worker before its first item.
"""

from __future__ import annotations

import atexit
import signal
import sys
import threading
import time
from multiprocessing.dummy import DummyProcess

__all__ = ["block_stop_signals_in_pool_thread", "finish_pool_threads", "install_exit_hook",
           "wait_for_pool_threads_at_exit"]

_AT_EXIT = {"wait": False}  # set by wait_for_pool_threads_at_exit
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_THIS_THREAD = threading.local()  # .blocked: block_stop_signals_in_pool_thread ran in this thread


def block_stop_signals_in_pool_thread() -> bool:
    """Block SIGTERM and SIGINT in the calling thread when it is a ``ThreadPool`` worker (once per thread; a
    ``CacheDataset`` calls it before each item it loads), so that the kernel delivers them to the main thread, whose
    handler then runs at once (see the module docstring). Any other thread, the main thread above all, is left as it
    is, and so is a platform without ``pthread_sigmask`` (Windows).

    Returns:
        Whether the signals are blocked in this thread.
    """
    thread = threading.current_thread()
    if (not isinstance(thread, DummyProcess) or thread is threading.main_thread()
            or not hasattr(signal, "pthread_sigmask")):
        return False
    if not getattr(_THIS_THREAD, "blocked", False):
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        _THIS_THREAD.blocked = True
    return True


def finish_pool_threads(timeout: float = 120.0) -> list[str]:
    """Wait for the live worker threads of ``ThreadPool`` s (at most ``timeout`` seconds in all).

    Call it on the way out of a failed command, not while a pool is still in use: the workers of
    a pool that is neither terminated nor closed wait for tasks until ``timeout``.

    Returns:
        The names of the worker threads still running after ``timeout`` (empty when all ended).
    """
    deadline = time.monotonic() + timeout
    workers = [t for t in threading.enumerate() if isinstance(t, DummyProcess) and t is not threading.current_thread()]
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in workers if t.is_alive()]


def wait_for_pool_threads_at_exit() -> None:
    """Have the ``atexit`` hook wait for the pool threads whatever the exit: a run ended by a signal while a
    ``CacheDataset`` filled its cache leaves the terminated pool's workers loading their item."""
    _AT_EXIT["wait"] = True


def _finish_after_uncaught_error() -> None:
    """``atexit``: after an uncaught exception (``sys.last_value``, set when its traceback was printed), or when
    :func:`wait_for_pool_threads_at_exit` asked for it."""
    if getattr(sys, "last_value", None) is not None or _AT_EXIT["wait"]:
        finish_pool_threads(timeout=60.0)  # shorter: a pool left open elsewhere would hold the exit this long


def install_exit_hook() -> None:
    """Register the ``atexit`` hook that waits for pool threads after an uncaught error (once)."""
    atexit.unregister(_finish_after_uncaught_error)
    atexit.register(_finish_after_uncaught_error)
