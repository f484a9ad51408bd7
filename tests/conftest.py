"""Shared fixtures. Tests are small (tiny networks, tiny patches) and run on CPU in CI."""

from __future__ import annotations

import locale
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("DIRA3D_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "real"))

# pytest-xdist runs one worker per core: one intra-op thread each (and in the bundle runs they
# start as subprocesses) avoids oversubscription, which slows tiny 3D convolutions down tens of times.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# A suite started as a background job of a shell without job control (`make test &`, `nohup ... &` in a script, some
# CI runners) inherits SIGINT ignored, and so does every process it starts: the tests of what Ctrl-C does (the
# engine's stop, the bundles' one-line exits) then saw no signal at all (exit 0 instead of 130; 9 failures found
# 2026-11-27). dira3d leaves an ignored signal ignored on purpose; the tests need Ctrl-C as a terminal gives it, so
# it is put back here: in this process (Python's handler) and, as SIG_DFL at exec, in every subprocess.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _keep_the_character_locale():
    """GDCM (SimpleITK's DICOM writer, which the tests' DICOM writers use) sets the process's LC_CTYPE to "C": every
    later ``subprocess.run(..., text=True)`` in that worker then decoded with ASCII and failed on the first non-ASCII
    byte of a child's output (seen 2026-11-28: a benchmark's table after a test that wrote LIDC DICOM series). Reading
    DICOM leaves the locale alone; writing it is the tests' own doing, so the locale is put back after each test."""
    before = locale.setlocale(locale.LC_CTYPE, None)
    yield
    if locale.setlocale(locale.LC_CTYPE, None) != before:
        locale.setlocale(locale.LC_CTYPE, before)


@pytest.fixture
def real_data() -> Path:
    """Folder of the real NRRD scans (read-only); skips the test when it is absent."""
    if not (REAL_DATA / "lung1_image.nrrd").is_file():
        pytest.skip(f"real scans not found at {REAL_DATA} (set DIRA3D_REAL_DATA to the folder of lung1_image.nrrd etc.)")
    return REAL_DATA


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test (also outside xdist): tiny networks and 3D convolutions run many times
    faster on one thread than on two contended ones, and are immune to oversubscription on a busy 2-core runner.
    Use it per module with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class RunsCodeWhenUnpickled:
    """A crafted checkpoint entry: unpickling it runs ``touch marker`` (what a weights-only load must never do)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_dicom_radiograph(path: Path, array, patient: str) -> None:
    """One 2D DICOM file (a SIIM-ACR radiograph): PatientID ``patient``, SOPInstanceUID the file's stem."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetMetaData("0010|0020", patient)
    image.SetMetaData("0008|0018", path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def write_dicom_series(folder: Path, array_xyz, spacing=(0.7, 0.7, 2.0), origin=(-50.0, -60.0, 100.0), *,
                       modality: str = "CT", series_uid: str = "1.2.826.0.1.3680043.2.1125.2",
                       sop_prefix: str = "1.2.826.0.1.3680043.2.1125.3", file_name: str = "slice{:03d}.dcm") -> None:
    """``array_xyz`` (x, y, z) as an axial DICOM series of int16 slices in the new folder ``folder``, one file per
    z (``file_name.format(k)``), stacked along +z from ``origin`` (LPS, mm); slice k has SOP instance UID
    ``{sop_prefix}.{k + 1}``. Import it with ``from conftest import write_dicom_series``."""
    import numpy as np
    import SimpleITK as sitk

    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    tags = {"0008|0060": modality, "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
            "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": f"{spacing[1]}\\{spacing[0]}"}
    array_xyz = np.asarray(array_xyz)
    for k in range(array_xyz.shape[2]):
        slice_img = sitk.GetImageFromArray(array_xyz[:, :, k].T.astype(np.int16))
        slice_img.SetSpacing(tuple(spacing[:2]))
        for key, value in tags.items():
            slice_img.SetMetaData(key, value)
        slice_img.SetMetaData("0020|0013", str(k + 1))
        slice_img.SetMetaData("0020|0032", f"{origin[0]}\\{origin[1]}\\{origin[2] + k * spacing[2]}")
        slice_img.SetMetaData("0008|0018", f"{sop_prefix}.{k + 1}")
        writer.SetFileName(str(folder / file_name.format(k)))
        writer.Execute(slice_img)


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """Put every logger's handlers, level and state back after each test. A bundle run in-process (``dira3d
    pretrain`` through ``cli_main``) configures logging from its ``logging.conf``: its handlers write to the
    ``sys.stdout`` / ``sys.stderr`` of that moment, which under ``capsys`` is a capture closed when the test
    ends, so every later log line in that worker printed a "Logging error" traceback into other tests'
    output (and ``fileConfig`` disables the loggers that existed before it)."""
    import logging

    def state():
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        return {lg: (list(lg.handlers), lg.level, lg.disabled, lg.propagate) for lg in loggers}

    def closed(handler: logging.Handler) -> bool:
        return isinstance(handler, logging.StreamHandler) and bool(getattr(handler.stream, "closed", False))

    before = state()
    yield
    for logger in state():
        if logger not in before:  # created during the test (e.g. a module imported): keep it, less dead streams
            logger.handlers[:] = [h for h in logger.handlers if not closed(h)]
            continue
        handlers, level, disabled, propagate = before[logger]
        logger.handlers[:] = handlers
        logger.disabled, logger.propagate = disabled, propagate
        logger.setLevel(level)  # also clears the loggers' cached isEnabledFor answers


@pytest.fixture(autouse=True)
def _signal_handlers_as_they_were():
    """Put SIGTERM's and SIGINT's handlers back after each test. A bundle's ``initialize`` run in-process
    (``ConfigWorkflow.initialize()``, a test that checks a config without training) installs
    :func:`dira3d.engines.stop_before_training`'s handlers, which training takes down; left in place, a later test
    of the same worker found them instead of the defaults (test_signal_stop failed, depending on the order)."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    stopping = sys.modules.get("dira3d.engines.stopping")
    if stopping is not None:
        stopping.end_stop_before_training()  # its record of the handlers it replaced, too
    for signum, handler in before.items():
        if handler is not None:
            signal.signal(signum, handler)


# ---- the tests write nothing into the checkout (a bundle initialised with its default bundle_root "." wrote
# models/.dira3d.lock into the folder pytest ran from) ----
_CACHES = {".pytest_cache", "__pycache__", ".coverage", ".hypothesis"}
_entries_at_start: set[str] = set()


def _top_level_entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name not in _CACHES}


def pytest_sessionstart(session: pytest.Session) -> None:
    _entries_at_start.update(_top_level_entries(Path.cwd()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks once, after every worker
        return
    new = sorted(_top_level_entries(Path.cwd()) - _entries_at_start)
    if new:
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(
            f"the tests left {new} in {Path.cwd()}: a test wrote into the folder pytest ran from; give it tmp_path",
            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def run_two_gloo_ranks(worker, tmp_path: Path) -> list:
    """Spawn ``worker(rank, init_file, out)`` on two processes (the worker sets up its gloo group from ``init_file``
    and saves what it measured to ``f"{out}.{rank}"``); return the two results, loaded weights-only. Import it with
    ``from conftest import run_two_gloo_ranks``; the worker must be a module-level function of the test file."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]


@contextmanager
def leaving_the_group():
    """Wrap a gloo worker's body in it, after ``init_process_group``: the worker leaves its process group as the
    bundles do. Import it with ``from conftest import leaving_the_group``.

    - The body ran through: :func:`dira3d.engines.distributed.cleanup_distributed` (a barrier, the destroy, gloo's
      worker threads back to idle). A plain ``destroy_process_group()`` right after the last collective let a rank
      abort at exit now and then (SIGABRT, "terminate called without an active exception"; a fresh-clone CI).
    - The body raised: the group is destroyed without a barrier (another rank that failed would never get there: the
      barrier would hang) and the exception goes on.
    A body that left the group itself (a rank that leaves early on purpose) is left alone: both are no-ops then."""
    import torch.distributed as dist

    from dira3d.engines.distributed import cleanup_distributed

    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    cleanup_distributed()


def kill_process_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, read from /proc (torchrun starts its workers in sessions of their
    own: killing torchrun, or its process group, leaves them running, holding the output pipes open)."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for each in tree:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_torchrun_command(cmd: list, *, timeout: float, **kwargs):
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` for a ``torchrun`` command: on
    a timeout the whole process tree is killed (not torchrun alone, whose orphaned workers would keep the pipes open
    and ``subprocess.run`` waiting for ever) and the test fails with the end of the output. Import it with ``from
    conftest import run_torchrun_command``."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the torchrun run did not end in {timeout} s (a rank waiting on a collective?); its process tree "
                    f"was killed:\n{(stdout + stderr)[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


class ThreadRanks:
    """``ranks`` ranks in threads of this process, each gathering through ``ignite.distributed.all_gather`` as the
    collective delivers: a tensor concatenated over the ranks along its first dimension, a number as a tensor of one
    per rank, any other object as the list of every rank's. :meth:`run` runs ``job(rank)`` in each and returns their
    results in rank order (the first error is raised in the test's thread)."""

    def __init__(self, ranks: int) -> None:
        import threading

        self.ranks, self.local = ranks, threading.local()
        self.slots: list = [None] * ranks
        self.barrier = threading.Barrier(ranks, timeout=60)

    def rank(self) -> int:
        return self.local.rank

    def all_gather(self, item, group=None):
        from numbers import Number

        self.slots[self.local.rank] = item
        self.barrier.wait()
        gathered = list(self.slots)
        self.barrier.wait()  # every rank has read them before the next gather
        if isinstance(item, torch.Tensor):
            return torch.cat([g.reshape(1) if g.ndim == 0 else g for g in gathered])
        return torch.tensor(gathered) if isinstance(item, Number) else gathered

    def run(self, job) -> list:
        import threading

        results, errors = [None] * self.ranks, []

        def one(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = job(rank)
            except Exception as err:  # noqa: BLE001 - raised below, in the test's thread
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(rank,)) for rank in range(self.ranks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def thread_ranks(monkeypatch):
    """``thread_ranks(n)``: :class:`ThreadRanks` of ``n`` ranks standing in for ``ignite.distributed``'s world size,
    rank and ``all_gather`` for the test."""
    import ignite.distributed as idist

    def make(ranks: int) -> ThreadRanks:
        made = ThreadRanks(ranks)
        monkeypatch.setattr(idist, "get_world_size", lambda: ranks)
        monkeypatch.setattr(idist, "get_rank", made.rank)
        monkeypatch.setattr(idist, "all_gather", made.all_gather)
        return made

    return make


@pytest.fixture
def datalist_parses(monkeypatch) -> list[str]:
    """The path of every parse of a datalist file by ``dira3d.evaluation.load_split``, in order."""
    import dira3d.evaluation.datalists as datalists

    calls: list[str] = []
    original = datalists.read_datalist_json

    def counted(path, *args, **kwargs):
        calls.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(datalists, "read_datalist_json", counted)
    return calls
