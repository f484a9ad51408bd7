"""Mutation audit of session 19's additions (mut19): the behaviours no earlier test pinned, each against a reference
worked out by hand or by the documented rule (Python's exception chaining, hashlib, the docstrings' formulas).

This file: the error-chain walk and the ``monai.bundle`` excepthook (dira3d.utils.bundle_errors), the one-line error of
ranks > 0 and the restart store (dira3d.engines.distributed), the resume-by-epochs arithmetic (dira3d.engines.batches) and
EpochStatsHandler on a plain engine. The experiment's side is in test_session19_reference_experiment.py, the data's
in test_session19_reference_data.py.
"""

from __future__ import annotations

import sys
import types

import pytest

import dira3d.engines.distributed as distributed
from dira3d.data.errors import DataError
from dira3d.engines.batches import epoch_length_note, resume_position, saved_epoch_length
from dira3d.utils import bundle_errors
from dira3d.utils.atomic import FolderNotWritableError
from dira3d.utils.bundle_errors import error_in_chain, install_bundle_error_hook, run_by_monai_bundle_command, user_error_in
from dira3d.utils.folder_lock import FolderInUseError


# --- dira3d.utils.bundle_errors ---------------------------------------------------------------------------------------

def _raised(make):
    try:
        make()
    except BaseException as err:  # noqa: BLE001
        return err
    raise AssertionError("nothing raised")


def test_the_chain_walk_follows_causes_first_then_contexts_as_python_chains_them():
    """``raise A from B`` inside ``except C``: A.__cause__ is B, A.__context__ is C; Python's traceback prints B as
    the direct cause, and the walk visits it first."""
    def wrapped():
        try:
            raise DataError("ctx.nii.gz", "the context")
        except DataError:
            raise RuntimeError("Failed to evaluate") from FileNotFoundError("cause.json")

    err = _raised(wrapped)
    assert isinstance(err.__cause__, FileNotFoundError) and isinstance(err.__context__, DataError)
    assert error_in_chain(err, (DataError, FileNotFoundError)) is err.__cause__
    assert error_in_chain(err, (DataError,)) is None  # B has neither cause nor context: the walk ends there

    def implicit():  # no "from": only a context
        try:
            raise DataError("ctx.nii.gz", "the context")
        except DataError:
            raise RuntimeError("applying transform")

    err = _raised(implicit)
    assert err.__cause__ is None
    assert error_in_chain(err, (DataError,)) is err.__context__


def test_the_first_error_of_a_kind_is_returned_even_when_it_has_a_cause_of_that_kind_too():
    inner = DataError("inner.nii.gz", "inner")
    outer = DataError("outer.nii.gz", "outer")
    outer.__cause__ = inner
    assert error_in_chain(outer, (DataError,)) is outer


@pytest.mark.timeout(60)
def test_a_chain_that_loops_ends_the_walk():
    one, two = RuntimeError("one"), RuntimeError("two")
    one.__cause__, two.__cause__ = two, one
    assert error_in_chain(one, (ValueError,)) is None
    assert error_in_chain(None, (ValueError,)) is None


@pytest.mark.parametrize("kind", ["data", "missing", "in_use", "not_writable"])
def test_user_error_in_finds_each_documented_kind_behind_a_wrapper(kind, tmp_path):
    inner = {"data": DataError(str(tmp_path / "a.json"), "garbled"),
             "missing": FileNotFoundError(f"{tmp_path / 'b.nii.gz'} does not exist"),
             "in_use": FolderInUseError(f"{tmp_path} is in use"),
             "not_writable": FolderNotWritableError(f"{tmp_path} cannot be written")}[kind]
    outer = RuntimeError("Failed to evaluate ConfigExpression")
    outer.__cause__ = inner
    assert user_error_in(outer) is inner
    assert user_error_in(RuntimeError("plain")) is None


def test_run_by_monai_bundle_command_reads_the_main_modules_spec(monkeypatch):
    for name, expected in (("monai.bundle.__main__", True), ("monai.bundle", False), ("pytest.__main__", False)):
        monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=types.SimpleNamespace(name=name)))
        assert run_by_monai_bundle_command() is expected
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=None))  # python -c / a script
    assert run_by_monai_bundle_command() is False


@pytest.fixture
def recording_hook(monkeypatch):
    """The hook set before dira3d's: records what it is handed. The earlier hook is put back afterwards."""
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(value))
    monkeypatch.setattr(bundle_errors, "_previous_hook", None)  # set by the install below; put back after the test
    install_bundle_error_hook()
    install_bundle_error_hook()  # a second install (a second import path) must not make the hook its own previous
    return seen


@pytest.mark.parametrize("under_bundle", [True, False])
def test_the_hook_prints_one_line_of_the_user_error_under_monai_bundle_only(recording_hook, monkeypatch, capsys,
                                                                            under_bundle, tmp_path):
    monkeypatch.setattr(bundle_errors, "run_by_monai_bundle_command", lambda: under_bundle)
    inner = DataError(str(tmp_path / "models" / "preprocessing.json"), "is not JSON; write it again")
    outer = RuntimeError("Failed to evaluate ConfigExpression: $dira3d.evaluation.trained_spacing(@ckpt_dir)")
    outer.__cause__ = inner
    sys.excepthook(RuntimeError, outer, None)
    if under_bundle:
        assert capsys.readouterr().err == f"error: {inner}\n" and recording_hook == []
    else:
        assert recording_hook == [outer] and capsys.readouterr().err == ""


def test_the_hook_hands_other_errors_to_the_hook_before_it(recording_hook, monkeypatch, capsys):
    monkeypatch.setattr(bundle_errors, "run_by_monai_bundle_command", lambda: True)
    err = ZeroDivisionError("a bug")
    sys.excepthook(ZeroDivisionError, err, None)
    assert recording_hook == [err] and capsys.readouterr().err == ""


# --- dira3d.engines.distributed: ranks > 0 and the restart store ------------------------------------------------------

@pytest.fixture
def rank_one(monkeypatch):
    import logging

    from dira3d.utils import interrupts

    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    monkeypatch.delenv("DIRA3D_ALL_TRACEBACKS", raising=False)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # put back after the test
    monkeypatch.setattr(interrupts, "_ENGINE_ERRORS_QUIET", False)  # set by the call below; put back after the test
    ignite = logging.getLogger("ignite")
    level = ignite.level
    distributed.brief_errors_on_other_ranks()
    yield
    ignite.setLevel(level)  # setLevel, not the attribute: it also clears the loggers' cached levels


def _wrapped(inner: BaseException, *messages: str) -> BaseException:
    err = inner
    for message in messages:
        outer = RuntimeError(message)
        outer.__cause__ = err
        err = outer
    return err


@pytest.mark.parametrize("wrappers", [("applying transform <LoadVolumed>",),
                                      ("applying transform <LoadVolumed>", "Failed to evaluate ConfigExpression: $x")])
def test_another_rank_prints_the_first_line_of_the_error_inside_each_monai_wrapper(rank_one, capsys, wrappers):
    sys.excepthook(RuntimeError, _wrapped(ValueError("no image\nsecond line"), *wrappers), None)
    assert capsys.readouterr().err == ("[rank1]: ValueError: no image (this rank's traceback is left out; "
                                       "DIRA3D_ALL_TRACEBACKS=1 prints it)\n")


def test_another_rank_names_the_inner_errors_kind_and_its_first_line(rank_one, capsys):
    err = _wrapped(ValueError("checkpoint last.pt does not fit\n  details"), "applying transform <X>",
                   "Failed to evaluate ConfigExpression: $@train#trainer.run()")
    sys.excepthook(RuntimeError, err, None)
    assert capsys.readouterr().err == ("[rank1]: ValueError: checkpoint last.pt does not fit (this rank's traceback is "
                                       "left out; DIRA3D_ALL_TRACEBACKS=1 prints it)\n")


def test_another_rank_keeps_an_error_whose_cause_is_not_behind_a_monai_wrapper(rank_one, capsys):
    err = _wrapped(OSError("disk"), "my own wrapper")
    sys.excepthook(RuntimeError, err, None)
    assert capsys.readouterr().err.startswith("[rank1]: RuntimeError: my own wrapper (")


class _FakeStore:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


@pytest.mark.parametrize("restart", ["0", "3"])
def test_restart_store_prefixes_the_agents_store_with_the_restart_count(monkeypatch, restart):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "TCPStore", _FakeStore)
    monkeypatch.setattr(dist, "PrefixStore", _FakeStore)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.delenv("GROUP_WORLD_SIZE", raising=False)  # torchrun on one node may leave it out: one node
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    monkeypatch.setenv("WORLD_SIZE", "2")
    store = distributed.restart_store()
    assert store.args[0] == f"dira3d/restart_{restart}"
    agent = store.args[1]
    assert agent.args == ("127.0.0.1", 29511, 2) and agent.kwargs["is_master"] is False
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # torchrun without the agent's store: env://
    assert distributed.restart_store() is None


# --- dira3d.engines.batches: resuming by epochs -----------------------------------------------------------------------

def test_saved_epoch_length_is_the_recorded_one_else_worked_out_from_the_counters():
    assert saved_epoch_length({"epoch": 2, "iteration": 23, "epoch_iteration": 3, "epoch_length": 7}) == 7
    # not recorded (an older last.pt): 2 epochs of (23 - 3) / 2 = 10 iterations, then 3 of the next epoch
    assert saved_epoch_length({"epoch": 2, "iteration": 23, "epoch_iteration": 3}) == 10
    assert saved_epoch_length({"epoch": 0, "iteration": 3, "epoch_iteration": 3}) == 0  # unknown


@pytest.mark.parametrize("done, before, now, expected", [
    (3, 10, 7, 2),    # 3/10 of the epoch done = 2.1 of 7 iterations: rounded down, 2
    (3, 10, 4, 1),    # 1.2 -> 1
    (9, 10, 20, 18),  # 18.0 exactly
    (5, 10, 10, 5),   # the same length: as done
    (0, 10, 3, 0),    # at an epoch's end
])
def test_resume_position_keeps_the_share_of_the_epoch_rounded_down(done, before, now, expected):
    saved = {"epoch": 1, "iteration": before + done, "epoch_iteration": done, "epoch_length": before}
    assert resume_position(saved, now) == expected
    assert resume_position(saved, None) == done  # this run's length unknown: as done


def test_epoch_length_note_says_where_the_epoch_goes_on_by_hand():
    saved = {"epoch": 2, "iteration": 23, "epoch_iteration": 3, "epoch_length": 10}
    assert epoch_length_note(saved, 7) == (
        "was written with 10 iterations per epoch and this run has 7 (another number of processes, batch_size or "
        "data): epoch 3 goes on at iteration 2 of its 7 (the same share of its data); the iteration counter goes on "
        "from the checkpoint's")
    at_end = {"epoch": 2, "iteration": 20, "epoch_iteration": 0, "epoch_length": 10}
    assert epoch_length_note(at_end, 4).endswith(": epoch 3 has 4 iterations; the iteration counter goes on from the "
                                                 "checkpoint's")
    assert epoch_length_note(saved, 10) is None and epoch_length_note(saved, None) is None


# --- EpochStatsHandler on an engine without dira3d's epoch record -----------------------------------------------------

def _iteration_lines(handler_class, name: str) -> list[str]:
    import logging

    from ignite.engine import Engine

    lines: list[str] = []
    catcher = logging.Handler(logging.INFO)
    catcher.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level, _ = logger.level, logger.setLevel(logging.INFO)
    logger.addHandler(catcher)
    try:
        engine = Engine(lambda engine, batch: float(batch))  # a plain ignite engine: no epoch_start_iteration
        handler_class(name=name, iteration_log=True, epoch_log=False, output_transform=lambda out: out).attach(engine)
        engine.run([1, 2, 3], max_epochs=2)
    finally:
        logger.removeHandler(catcher)
        logger.setLevel(level)
    return [line.split(" --")[0] for line in lines if line.startswith("Epoch:")]


def test_an_engine_without_the_epoch_record_prints_as_monai_does():
    from monai.handlers import StatsHandler

    from dira3d.engines import EpochStatsHandler

    expected = [f"Epoch: {e}/2, Iter: {k}/3" for e in (1, 2) for k in (1, 2, 3)]  # by hand
    assert _iteration_lines(StatsHandler, "s19_monai") == expected
    assert _iteration_lines(EpochStatsHandler, "s19_dira3d") == expected


# --- atomic_path's folder sync closes the folder it opened ------------------------------------------------------------

@pytest.mark.parametrize("fsync_error", [None, 22])  # 22: EINVAL, a file system that refuses fsync on a folder
def test_the_folder_opened_for_its_fsync_is_closed_again(tmp_path, monkeypatch, fsync_error):
    import os
    import stat

    from dira3d.utils.atomic import atomic_write_text

    opened, still_open = [], set()  # every folder descriptor opened; those not closed since
    real_open, real_close, real_fsync = os.open, os.close, os.fsync

    def recording_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if os.path.isdir(path):
            opened.append(fd)
            still_open.add(fd)
        return fd

    def recording_close(fd):
        still_open.discard(fd)
        return real_close(fd)

    def fsync(fd):
        if fsync_error and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(fsync_error, os.strerror(fsync_error))
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "close", recording_close)
    monkeypatch.setattr(os, "fsync", fsync)
    for k in range(3):
        atomic_write_text(tmp_path / "a.json", str(k))
    if os.name == "posix":  # the folder is synced (and so opened) on POSIX only
        assert len(opened) == 3
    assert not still_open, "a folder descriptor was left open"
    assert (tmp_path / "a.json").read_text() == "2"


# --- purge_from leaves alone a writer that has no purge_step ----------------------------------------------------------

def test_purge_from_leaves_a_writer_without_purge_step_alone():
    from dira3d.engines.summary import purge_from

    class OtherWriter:  # another library's writer, of no purge_step
        file_writer = None

    writer = OtherWriter()
    purge_from(writer, 5)
    assert not hasattr(writer, "purge_step")
    purge_from(None, 5)  # no writer: nothing to do


# --- rank_zero_handlers closes only a TensorBoard writer the handler opened itself -------------------------------------

def test_on_another_rank_a_shared_writer_is_kept_and_a_handlers_own_is_removed(tmp_path, monkeypatch):
    from monai.handlers import TensorBoardStatsHandler
    from torch.utils.tensorboard import SummaryWriter

    from dira3d.engines import rank_zero_handlers

    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    shared = SummaryWriter(log_dir=str(tmp_path / "shared"))  # the config's writer, shared with other handlers
    own = TensorBoardStatsHandler(log_dir=str(tmp_path / "own"))  # opens a writer (and its event file) of its own
    assert list((tmp_path / "own").iterdir())
    kept = rank_zero_handlers([TensorBoardStatsHandler(summary_writer=shared), own])
    assert kept == []
    assert list((tmp_path / "shared").iterdir()), "the shared writer's event file was removed"
    shared.add_scalar("x", 1.0, 1)  # still open
    shared.close()
    assert not list((tmp_path / "own").iterdir())


def test_a_folder_that_fails_to_open_for_another_reason_is_an_error(tmp_path, monkeypatch):
    """EACCES / EINVAL ... skip the folder's sync (test_utils_reference); any other error opening it (EIO: the disk
    failed) is raised, as the docstring of the sync says."""
    import errno
    import os

    from dira3d.utils.atomic import atomic_write_text

    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    if os.name != "posix":
        pytest.skip("the folder is opened for its sync on POSIX only")
    with pytest.raises(OSError) as raised:
        atomic_write_text(tmp_path / "a.json", "{}")
    assert raised.value.errno == errno.EIO


def test_another_rank_says_its_rank_once_when_torchs_hook_wraps_the_one_line(rank_one, capsys):
    """Found in session 25: inference.json installs the one-line hook before its ranks join, and
    ``init_process_group`` then wraps ``sys.excepthook`` in torch's own, which prefixes every line it prints with
    ``[rankN]: ``: a refused setting after the join read ``[rank1]: [rank1]: DataError: ...``. This mimics torch's
    wrapper (distributed_c10d's ``_distributed_excepthook``: the inner hook's stderr, each line prefixed)."""
    import io

    inner = sys.excepthook

    def torch_like(*args):
        old, sys.stderr = sys.stderr, io.StringIO()
        try:
            inner(*args)
        finally:
            buf, sys.stderr = sys.stderr, old
        sys.stderr.write("\n".join(f"[rank1]: {s}" if s else "" for s in buf.getvalue().split("\n")))

    sys.excepthook = torch_like
    sys.excepthook(ValueError, ValueError("bad setting"), None)
    assert capsys.readouterr().err == ("[rank1]: ValueError: bad setting (this rank's traceback is left out; "
                                       "DIRA3D_ALL_TRACEBACKS=1 prints it)\n")
