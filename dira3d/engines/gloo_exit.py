"""Let gloo's worker threads drop their last collective before the interpreter exits (a SIGABRT at exit otherwise).

A process that trained under ``DistributedDataParallel`` on gloo (CPU, ``torchrun``) sometimes died *after* its work
was done, rank 0 mostly: ``terminate called without an active exception``, exit code -6 (SIGABRT), and ``torchrun``
reported the whole run failed (a SLURM job too). Seen now and then in the suite's torchrun fine-tuning tests on a
loaded machine, and in a 6-line script (DDP over a ``Linear``, a barrier, ``destroy_process_group``) in 14 of 150 runs
at a load average of 6 to 14 on 2 cores; with :func:`~dira3d.engines.distributed.cleanup_distributed` in 0 of 150
(2026-11-28, docs/reliability.md; ``benchmarks/gloo_exit_check.py``). The core dump of that script shows why:

- DDP keeps its process group alive for the life of the process: ``destroy_process_group`` unregisters it, but its
  ``ProcessGroupGloo`` is not destroyed and its worker threads (``pt_gloo_runloop``) go on running (without DDP they
  are joined by the destroy).
- A worker drops the collective it has just run (here the teardown's barrier, which holds the last gradient
  all-reduce) at the end of its loop, *after* the waiting main thread was woken. That work holds the thread-local
  state of the ``backward()`` that launched it, a Python object among it, and dropping a Python object takes the GIL.
- When the main thread got to the interpreter's finalisation in between, taking the GIL ends the worker thread with
  ``pthread_exit``, whose forced unwinding meets a ``noexcept`` destructor: ``std::terminate``, SIGABRT.

:func:`wait_for_gloo_workers` closes the window: after the process group is left
(:func:`dira3d.engines.distributed.cleanup_distributed`) it sleeps, releasing the GIL, until every gloo worker thread of
the process is back in its idle wait for work (read from ``/proc/self/task/<tid>/syscall``: the untimed condition wait
of an idle worker, not the timed wait of a thread wanting the GIL, nor a running thread). It waits at most ``timeout``
seconds and does nothing where there is no such thread (no gloo group was formed, or its threads were joined), on a
platform without ``/proc`` or of another architecture (the futex system call's number is known for x86-64 and arm64).
"""

from __future__ import annotations

import os
import platform
import time

__all__ = ["GLOO_WORKER", "gloo_worker_states", "is_idle_worker", "wait_for_gloo_workers"]

GLOO_WORKER = "pt_gloo_runloop"  # the name PyTorch gives the worker threads of a ProcessGroupGloo
_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
_FUTEX_WAIT_BITSET = 9  # what a condition variable's wait uses (glibc); a contended mutex waits with FUTEX_WAIT (0)
_FUTEX_CMD_MASK = 0x7F  # the futex operation without its PRIVATE (128) and CLOCK_REALTIME (256) flags


def gloo_worker_states(task_dir: str = "/proc/self/task") -> list[str] | None:
    """The ``syscall`` line of each gloo worker thread of this process (``"running"`` for a thread on a CPU); an empty
    list when there is none, None where this cannot be read (no ``/proc``)."""
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return None
    states = []
    for tid in tids:
        try:
            with open(os.path.join(task_dir, tid, "comm"), encoding="ascii", errors="replace") as comm:
                if comm.read().strip() != GLOO_WORKER:
                    continue
            with open(os.path.join(task_dir, tid, "syscall"), encoding="ascii", errors="replace") as syscall:
                states.append(syscall.read().strip())
        except OSError:  # the thread ended meanwhile, or its state is not readable
            continue
    return states


def is_idle_worker(state: str, futex: int | None = _FUTEX) -> bool:
    """Whether a worker thread's ``syscall`` line is its idle wait: ``futex`` with ``FUTEX_WAIT_BITSET`` and no timeout
    (a condition variable's untimed wait; CPython's wait for the GIL has a timeout, a running thread says
    ``running``)."""
    fields = state.split()
    if futex is None or len(fields) < 5 or not fields[0].isdigit() or int(fields[0]) != futex:
        return False
    try:
        operation, timeout = int(fields[2], 16), int(fields[4], 16)
    except ValueError:
        return False
    return operation & _FUTEX_CMD_MASK == _FUTEX_WAIT_BITSET and timeout == 0


def wait_for_gloo_workers(timeout: float = 5.0, poll: float = 0.005, task_dir: str = "/proc/self/task") -> bool:
    """Sleep (the GIL released) until every gloo worker thread of this process is idle, at most ``timeout`` seconds.

    Returns:
        True when none is left busy (or there is none), False after ``timeout`` or where their state cannot be read.
    """
    if _FUTEX is None:
        return False
    deadline = time.monotonic() + timeout
    while True:
        states = gloo_worker_states(task_dir)
        if states is None:
            return False
        if all(is_idle_worker(state) for state in states):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
