"""The wait for gloo's worker threads before exit (dira3d.engines.gloo_exit): what an idle worker looks like in
``/proc``, that the wait ends when they are idle and not before, and that leaving the process group waits for them;
how the tests' gloo workers leave their group (conftest.leaving_the_group)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import leaving_the_group
from dira3d.engines.gloo_exit import GLOO_WORKER, gloo_worker_states, is_idle_worker, wait_for_gloo_workers

# /proc/self/task/<tid>/syscall lines read on this machine (x86-64, glibc 2.36, CPython 3.11, torch 2.13): a gloo worker
# waiting for work, a thread waiting for the GIL (CPython waits 5 ms at a time), a contended mutex, a read
IDLE = "202 0x558218669924 0x189 0x0 0x0 0x0 0xffffffff 0x7f3a98827d10 0x7f3ab80a3f16"
GIL_WAIT = "202 0x7f9986d75a48 0x189 0x0 0x7f9966526c50 0x0 0xffffffff 0x7f9966526c10 0x7f99866a3f16"
MUTEX_WAIT = "202 0x561272a56d60 0x80 0x2 0x0 0x0 0x0 0x7f9966d27c00 0x7f99866a3f16"
READING = "0 0x9 0x55821c775fe0 0x2000 0x0 0x0 0x0 0x7ffcb6cf7ed0 0x7f3ab81162ec"
LINUX_PROC = sys.platform.startswith("linux") and Path("/proc/self/task").is_dir()


@pytest.mark.parametrize("state, idle", [(IDLE, True), (IDLE.replace("0x189", "0x89"), True), (GIL_WAIT, False),
                                         (MUTEX_WAIT, False), (READING, False), ("running", False), ("", False),
                                         ("202 0x1 0xzz 0x0 0x0", False)])
def test_only_the_untimed_condition_wait_of_a_worker_is_idle(state, idle):
    assert is_idle_worker(state, futex=202) is idle
    assert not is_idle_worker(state, futex=None)  # an architecture whose futex number is not known: never idle
    assert not is_idle_worker(state.replace("202 ", "98 ", 1), futex=202)  # another system call's number


def _task(root: Path, tid: int, comm: str, syscall: str) -> Path:
    (root / str(tid)).mkdir(parents=True, exist_ok=True)
    (root / str(tid) / "comm").write_text(comm + "\n")
    (root / str(tid) / "syscall").write_text(syscall + "\n")
    return root / str(tid) / "syscall"


def test_the_states_are_those_of_the_gloo_workers_only(tmp_path):
    _task(tmp_path, 1, "python", "running")
    _task(tmp_path, 2, GLOO_WORKER, IDLE)
    _task(tmp_path, 3, "gloo_tcp_loop", GIL_WAIT)
    _task(tmp_path, 4, GLOO_WORKER, "running")
    (tmp_path / "5").mkdir()  # a thread that ended while the folder was read
    assert sorted(gloo_worker_states(str(tmp_path))) == sorted([IDLE, "running"])
    assert gloo_worker_states(str(tmp_path / "absent")) is None


@pytest.mark.skipif(not LINUX_PROC, reason="reads /proc/self/task (Linux)")
@pytest.mark.skipif(is_idle_worker(IDLE) is False, reason="the futex system call's number is known for x86-64 and arm64")
def test_the_wait_ends_once_every_worker_is_idle_and_not_before(tmp_path, monkeypatch):
    import dira3d.engines.gloo_exit as gloo_exit

    _task(tmp_path, 1, "python", "running")
    _task(tmp_path, 2, GLOO_WORKER, IDLE)
    busy = _task(tmp_path, 3, GLOO_WORKER, GIL_WAIT)
    assert wait_for_gloo_workers(timeout=0.05, poll=0.01, task_dir=str(tmp_path)) is False  # one wants the GIL

    polls = []

    def looked_at(task_dir):  # the worker gets the GIL, drops its work and waits for the next one after the 2nd look
        polls.append(task_dir)
        states = gloo_worker_states(task_dir)
        if len(polls) == 2:
            busy.write_text(IDLE + "\n")
        return states

    monkeypatch.setattr(gloo_exit, "gloo_worker_states", looked_at)
    assert wait_for_gloo_workers(timeout=30, poll=0.001, task_dir=str(tmp_path)) is True
    assert len(polls) == 3  # not done at the first look (busy), nor at the second (read before it settled)
    monkeypatch.undo()
    for tid in (2, 3):
        (tmp_path / str(tid) / "comm").write_text("python\n")
    assert wait_for_gloo_workers(timeout=0, task_dir=str(tmp_path)) is True  # no worker at all: nothing to wait for
    assert wait_for_gloo_workers(timeout=0, task_dir=str(tmp_path / "absent")) is False  # cannot tell


_AFTER_DDP = r"""
import os, sys, torch, torch.distributed as dist
import dira3d.engines.gloo_exit as gloo_exit
from dira3d.engines.distributed import cleanup_distributed

calls = []
wait = gloo_exit.wait_for_gloo_workers
gloo_exit.wait_for_gloo_workers = lambda *a, **k: calls.append(wait(*a, **k)) or calls[-1]
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
model(torch.ones(3, 2)).sum().backward()
cleanup_distributed()
states = gloo_exit.gloo_worker_states()
print("left:", dist.is_initialized(), "waited:", calls, "workers:", len(states), "idle:",
      all(gloo_exit.is_idle_worker(s) for s in states))
"""


@pytest.mark.skipif(not LINUX_PROC, reason="reads /proc/self/task (Linux)")
@pytest.mark.skipif(is_idle_worker(IDLE) is False, reason="the futex system call's number is known for x86-64 and arm64")
def test_leaving_the_group_after_ddp_waits_for_its_workers_to_be_idle(tmp_path):
    """The real case, in its own process: DDP keeps its gloo workers alive past destroy_process_group (the reason for
    the wait), cleanup_distributed waits for them, and the wait recognises their real idle state on this machine."""
    proc = subprocess.run([sys.executable, "-c", _AFTER_DDP, str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("left: False waited: [True] workers: "), line
    assert int(line.split("workers: ")[1].split()[0]) > 0, line  # DDP's group outlived the destroy: its workers run on
    assert line.endswith("idle: True"), line


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A real gloo group of one process (file:// rendezvous), with the barrier, the destroy and the wait for gloo's
    workers recorded in ``calls`` in the order they ran (the barrier and the destroy run; the wait is recorded only:
    its own tests are above, and it would wait here for the threads of any group an earlier test left behind)."""
    import dira3d.engines.gloo_exit as gloo_exit

    calls = []
    barrier, destroy = dist.barrier, dist.destroy_process_group
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier") or barrier(*a, **k))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy") or destroy(*a, **k))
    monkeypatch.setattr(gloo_exit, "wait_for_gloo_workers", lambda *a, **k: calls.append("wait") or True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield calls
    if dist.is_initialized():  # the context manager failed to leave: do not leave the group to later tests
        destroy()


def test_a_worker_that_ran_through_leaves_as_the_bundles_do(one_rank_group):
    """After the work: cleanup_distributed (a barrier, the destroy, gloo's workers idle), not a plain destroy."""
    with leaving_the_group():
        value = torch.ones(2)
        dist.all_reduce(value)
    assert one_rank_group == ["barrier", "destroy", "wait"]
    assert not dist.is_initialized() and value.tolist() == [1.0, 1.0]


def test_a_worker_that_failed_leaves_without_the_barrier_and_its_error_goes_on(one_rank_group):
    """A barrier would hang when another rank failed too: the group is destroyed at once and the error re-raised."""
    error = ValueError("the worker's own error")
    with pytest.raises(ValueError) as raised:
        with leaving_the_group():
            raise error
    assert raised.value is error
    assert one_rank_group == ["destroy"] and not dist.is_initialized()


def test_a_worker_that_left_the_group_itself_is_left_alone(one_rank_group):
    with leaving_the_group():
        dist.destroy_process_group()  # a rank that leaves early on purpose
    assert one_rank_group == ["destroy"] and not dist.is_initialized()
