"""Reference tests of the reliability utilities (dira3d/utils/ and dira3d/cli.py), from a mutation audit.

Each test pins one behaviour against an independent expectation: the order of the system calls of an atomic write
(recorded by wrapping ``os.fsync`` / ``os.replace``), the mode an ordinary ``open()`` gives a file, the lock as
another process sees it, exit codes of real subprocesses, and hand-worked parses of override values and of side
files. The house rules they guard are in docs/reliability.md.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import types
import warnings
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest
import torch

from dira3d import cli
from dira3d.utils.atomic import (FolderNotWritableError, atomic_path, atomic_write, atomic_write_text,
                                 check_output_settings, check_writable, removed_if_failed, removed_if_failed_empty,
                                 stale_temporaries)
from dira3d.utils.checkpoint import atomic_save, load_checkpoint
from dira3d.utils.files import FileContentError, json_type, looks_like_dicom, read_json, read_text, read_yaml
from dira3d.utils.folder_lock import HOLDER_NAME, LOCK_NAME, FolderInUseError, FolderLock
from dira3d.utils.host_sync import HostSyncDetector
from dira3d.utils.interrupts import (StoppedBySignal, TerminatedBySignal, interrupt_exit_code, interrupted_word,
                                     sigterm_as_interrupt)
from dira3d.utils.overrides import as_bool, check_overrides, did_you_mean, parse_value
from dira3d.utils.seeding import derive_seed, stream_seed
from dira3d.utils.setting_hints import bundle_setting, experiment_settings, in_experiment, label_fraction_setting
from dira3d.utils.threads import finish_pool_threads

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------- atomic writes


def record_calls(monkeypatch):
    """Wrap os.fsync and os.replace; each call is recorded with what the file held when it was made."""
    calls = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        info = os.fstat(fd)
        calls.append(("fsync folder", os.readlink(f"/proc/self/fd/{fd}")) if stat.S_ISDIR(info.st_mode)
                     else ("fsync", info.st_size))
        return fsync(fd)

    def recording_replace(src, dst, *args, **kwargs):
        calls.append(("replace", Path(src), Path(dst)))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return calls


def test_atomic_write_syncs_the_whole_temporary_file_then_renames_it_over_the_target(tmp_path, monkeypatch):
    target = tmp_path / "out" / "last.pt"
    calls = record_calls(monkeypatch)
    atomic_write(target, lambda handle: handle.write(b"x" * 1000))
    # the data are on disk before the rename shows them, and the rename is on disk before the write returns
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync folder"]
    assert calls[0][1] == 1000  # flushed before the fsync: it synced all of the data
    assert calls[2][1] == str(target.parent)  # the folder the rename changed
    src, dst = calls[1][1], calls[1][2]
    assert dst == target and src.parent == target.parent  # one folder: one file system
    assert src.name.startswith(".last.pt.") and src.name.endswith(".tmp")  # hidden, named after the target
    assert target.read_bytes() == b"x" * 1000 and sorted(os.listdir(target.parent)) == ["last.pt"]


def test_atomic_save_of_a_checkpoint_goes_through_the_rename(tmp_path, monkeypatch):
    calls = record_calls(monkeypatch)
    atomic_save({"w": torch.ones(2)}, tmp_path / "best.pt")
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync folder"] and calls[1][2] == tmp_path / "best.pt"
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["w"], torch.ones(2))


def test_a_file_written_by_name_is_synced_before_the_rename_too(tmp_path, monkeypatch):
    """``atomic_path`` (SimpleITK, PIL, TorchScript, ONNX, safetensors writers) syncs the file it hands out: a
    power loss after the rename cannot leave a renamed file whose data never reached the disk."""
    target = tmp_path / "encoder.safetensors"
    calls = record_calls(monkeypatch)
    with atomic_path(target, suffix=".safetensors") as tmp:
        tmp.write_bytes(b"w" * 300)  # written and closed by name, as those writers do
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync folder"]
    assert calls[0][1] == 300 and calls[1][2] == target


def test_the_folder_is_synced_after_the_rename_so_that_a_power_loss_cannot_undo_it(tmp_path, monkeypatch):
    """POSIX keeps a rename in the folder's entries, which reach the disk only when the folder is fsynced: the
    write syncs the target's own folder, after ``os.replace`` (before it, the folder does not hold the rename)."""
    target = tmp_path / "deep" / "er" / "best.pt"
    calls = record_calls(monkeypatch)
    atomic_write_text(target, "new")
    assert calls[-2][0] == "replace" and calls[-1] == ("fsync folder", str(target.parent))
    assert target.read_text() == "new"


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EACCES])
def test_a_folder_that_cannot_be_synced_is_skipped_and_a_failing_disk_is_not(tmp_path, monkeypatch, code):
    """A file system that refuses fsync on a folder (EINVAL: some FUSE and network mounts) or a folder the user may
    write but not read (EACCES on opening it) keeps the write (the rename is done, its durability is not forced);
    an EIO (the disk failed) is raised, naming the target."""
    fsync, opened = os.fsync, os.open

    def failing_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}" and os.listdir(tmp_path) == ["a.json"]
    monkeypatch.setattr(os, "fsync", fsync)

    def failing_open(path, flags, *args, **kwargs):
        if Path(path) == tmp_path:
            raise OSError(code, os.strerror(code))
        return opened(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    atomic_write_text(tmp_path / "a.json", "[]")
    assert (tmp_path / "a.json").read_text() == "[]" and os.listdir(tmp_path) == ["a.json"]
    monkeypatch.setattr(os, "open", opened)

    def broken_disk(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", broken_disk)
    with pytest.raises(OSError) as raised:
        atomic_write_text(tmp_path / "a.json", "1")
    assert raised.value.errno == errno.EIO and raised.value.filename == str(tmp_path / "a.json")


def test_windows_does_not_open_the_folder(tmp_path, monkeypatch):
    """Windows cannot ``os.open`` a folder (and NTFS journals the rename): no folder is opened or synced there."""
    from dira3d.utils import atomic

    monkeypatch.setattr(atomic, "_SYNCS_FOLDERS", False)
    calls = record_calls(monkeypatch)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert [c[0] for c in calls] == ["fsync", "replace"] and (tmp_path / "a.json").read_text() == "{}"


def test_a_new_file_gets_the_mode_of_an_ordinary_open_and_a_replaced_one_keeps_its_own(tmp_path):
    reference = tmp_path / "reference"
    reference.write_bytes(b"")  # open() with 0o666 less the umask, the expectation
    atomic_write_text(tmp_path / "new.json", "{}")
    assert (tmp_path / "new.json").stat().st_mode & 0o7777 == reference.stat().st_mode & 0o7777
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    kept.chmod(0o1640)  # sticky bit: a mode outside 0o777 is kept too
    atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and kept.stat().st_mode & 0o7777 == 0o1640


def test_a_new_file_follows_the_umask(tmp_path):
    """In a child with umask 027 (read once at import), a new file gets 0o640, as open() would."""
    script = ("import os, sys; os.umask(0o027); from dira3d.utils.atomic import atomic_write_text; "
              "p = atomic_write_text(sys.argv[1], 'x'); print(oct(p.stat().st_mode & 0o777))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.txt")], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert done.stdout.strip() == "0o640", done.stderr


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_an_error_naming_no_file_is_given_the_target_and_one_naming_a_file_is_kept(tmp_path):
    target = tmp_path / "a.bin"

    def full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_write(target, full)
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))

    def other(handle):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/elsewhere/input.nii")

    with pytest.raises(FileNotFoundError) as caught:
        atomic_write(target, other)
    assert caught.value.filename == "/elsewhere/input.nii"
    assert not target.exists()


def test_atomic_path_creates_missing_parents(tmp_path):
    with atomic_path(tmp_path / "a" / "b" / "img.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.parent == tmp_path / "a" / "b" and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"data")
    assert (tmp_path / "a" / "b" / "img.nii.gz").read_bytes() == b"data"


def test_check_writable_counts_only_the_blocks_a_user_may_fill(tmp_path, monkeypatch):
    # 10 blocks of 100 bytes free to users (f_bavail), 1000 counting root's reserve (f_bfree)
    fake = types.SimpleNamespace(f_bavail=10, f_bfree=1000, f_frsize=100, f_bsize=100)
    monkeypatch.setattr(os, "statvfs", lambda _: fake)
    assert check_writable(tmp_path, min_free_bytes=1000) == tmp_path  # exactly enough
    with pytest.raises(OSError, match=f"output folder {tmp_path} has 0 MiB free"):
        check_writable(tmp_path, min_free_bytes=1001)


def test_check_output_settings_checks_the_folder_of_a_path_setting(tmp_path):
    check_output_settings(report_path=tmp_path / "reports" / "report.csv", output_dir=tmp_path / "out")
    assert (tmp_path / "reports").is_dir() and not (tmp_path / "reports" / "report.csv").exists()
    assert (tmp_path / "out").is_dir()
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(FolderNotWritableError, match=r"report_path folder .* pass --report_path with a file in a "
                                                     r"writable folder \(\"\" for none\)"):
        check_output_settings(hint='"" for none', report_path=tmp_path / "blocker" / "sub" / "report.csv")


def test_removed_if_failed_empty_removes_only_a_new_folder_of_lock_files(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt), removed_if_failed_empty(new):
        (new / "models").mkdir(parents=True)
        (new / "models" / LOCK_NAME).write_text("")
        raise KeyboardInterrupt
    assert not new.exists()
    had = tmp_path / "had"
    had.mkdir()  # the user's (empty) folder stays
    with pytest.raises(ValueError), removed_if_failed_empty(had):
        (had / LOCK_NAME).write_text("")
        raise ValueError("refused")
    assert had.is_dir()
    written = tmp_path / "written"
    with pytest.raises(ValueError), removed_if_failed_empty(written):
        written.mkdir()
        (written / "log.txt").write_text("a run's output")
        raise ValueError("later")
    assert (written / "log.txt").read_text() == "a run's output"


def test_removed_if_failed_empty_removes_the_new_parents_too(tmp_path):
    """`dira3d finetune --output-dir runs/ft_x` refused at its start (a --pretrained that does not exist: a walk of
    2026-11-28) removed runs/ft_x but left the runs/ it had created, empty; a parent holding anything else stays."""
    inner = tmp_path / "runs" / "deeper" / "ft_x"
    with pytest.raises(ValueError), removed_if_failed_empty(inner):
        (inner / "models").mkdir(parents=True)
        (inner / "models" / LOCK_NAME).write_text("")
        raise ValueError("pretrained checkpoint does not exist")
    assert not (tmp_path / "runs").exists()
    other = tmp_path / "runs2" / "ft_y"
    with pytest.raises(ValueError), removed_if_failed_empty(other):
        other.mkdir(parents=True)
        (tmp_path / "runs2" / "notes.txt").write_text("the user's")  # written beside it meanwhile: runs2 stays
        raise ValueError("refused")
    assert not other.exists() and (tmp_path / "runs2" / "notes.txt").is_file()


def test_removed_if_failed_keeps_what_the_user_had(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    with pytest.raises(ValueError), removed_if_failed(full):
        (full / "app.py").write_text("copied")
        raise ValueError("copy failed")
    assert sorted(os.listdir(full)) == ["app.py", "mine.txt"]  # a folder that held anything is left alone

    empty = tmp_path / "empty"
    empty.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("the user's")
    with pytest.raises(ValueError), removed_if_failed(empty):
        (empty / "sub").mkdir()
        (empty / "sub" / "x").write_text("")
        (empty / "link").symlink_to(outside, target_is_directory=True)
        raise ValueError("copy failed")
    assert empty.is_dir() and os.listdir(empty) == []  # the folder the user had stays, emptied
    assert (outside / "data.txt").read_text() == "the user's"  # a link's target is not followed

    new = tmp_path / "new"
    with pytest.raises(ValueError), removed_if_failed(new):
        (new / "a").mkdir(parents=True)
        raise ValueError("copy failed")
    assert not new.exists()


def test_stale_temporaries_lists_what_a_killed_write_left_and_no_user_file(tmp_path):
    (tmp_path / "sub").mkdir()
    left = []
    for target, suffix in (("last.pt", ".tmp"), ("sub/img.nii.gz", ".nii.gz")):
        with atomic_path(tmp_path / target, suffix=suffix) as tmp:
            left.append(tmp)
        # as a killed process would leave it: the temporary, under its own name
    for tmp, name in zip(left, ("last.pt", "sub/img.nii.gz")):
        tmp.write_bytes(b"")
        assert (tmp_path / name).exists()
    (tmp_path / ".config.backup.tmp").write_text("a user's hidden file")  # 6 characters, not tempfile's 8
    (tmp_path / ".notes.abcdefgh.txt").write_text("")  # its suffix is not the target's
    (tmp_path / ".x.abcdefgh.tmp").symlink_to(tmp_path / "last.pt")  # a link is nothing a write left
    assert stale_temporaries(tmp_path) == sorted(left)


# ---------------------------------------------------------------- side files


@pytest.mark.parametrize(("value", "name"), [(True, "true"), (False, "false"), (None, "null"), (1, "number"),
                                             (1.5, "number"), ("x", "string"), ([1], "array"), ({}, "object")])
def test_json_type_names(value, name):
    assert json_type(value) == name


def test_text_that_is_not_utf8_is_named_with_its_line_and_offset(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"ok\nok\n\xff")
    with pytest.raises(FileContentError, match=r"byte 0xff at line 3, byte offset 6"):
        read_text(path, "datalist", "fix it")


def test_json_refusals_are_worked_out_by_hand(tmp_path):
    path = tmp_path / "s.json"

    def message(text, **kwargs):
        path.write_text(text)
        with pytest.raises(FileContentError) as caught:
            read_json(path, "settings", "fix it", **kwargs)
        return str(caught.value)

    assert "is empty" in message(" \n\t\n")
    assert "the key 'b' twice (keys ['a', 'b', 'b']" in message('{"a": 1, "b": 2, "b": 3}')
    eight = "{" + ", ".join(f'"{k}": 0' for k in "abcdefga") + "}"
    assert "(keys ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'a']; JSON" in message(eight)
    nine = "{" + ", ".join(f'"{k}": 0' for k in "abcdefgha") + "}"
    assert "(keys ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', ...]; JSON" in message(nine)
    assert "cut short?" in message('{"a": "abc')  # an unterminated string at the end
    assert "cut short?" in message('{"a": 1')  # the error at the very end
    assert "cut short?" not in message('{"a": 1 x}')
    assert "holds a JSON array, not an object" in message("[1]")
    path.write_text("[1]")
    assert read_json(path, "settings", "fix it", expect=None) == [1]


def test_yaml_duplicates_by_value_merges_and_error_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: &a {x: 1}\nb: &b {<<: *a, x: 2}\nc: {<<: *b, y: 3}\n")  # b's x overrides a merged one
    assert read_yaml(path, "config", "fix it") == {"a": {"x": 1}, "b": {"x": 2}, "c": {"x": 2, "y": 3}}
    path.write_text("1: a\n1.0: b\n")  # one key for the dict: 1 == 1.0
    with pytest.raises(FileContentError, match="has the key '1.0' twice, at lines 1 and 2"):
        read_yaml(path, "config", "fix it")
    path.write_text("a: 1\nb: c: d\n")  # the second ':' on line 2, column 5
    with pytest.raises(FileContentError, match=r"mapping values are not allowed here: line 2 column 5"):
        read_yaml(path, "config", "fix it")
    path.write_text("- 1\n- 2\n")
    with pytest.raises(FileContentError, match="holds a YAML list, not a mapping"):
        read_yaml(path, "config", "fix it")


def test_dicom_is_told_by_its_suffix_in_any_case_or_the_magic_at_byte_128(tmp_path):
    assert looks_like_dicom(tmp_path / "IMG0001.DCM")  # by name alone, as old archives name them
    part10 = tmp_path / "IMG0002"
    part10.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    magic_first = tmp_path / "IMG0003"
    magic_first.write_bytes(b"DICM" + b"\0" * 140)
    assert looks_like_dicom(part10) and not looks_like_dicom(magic_first)


# ---------------------------------------------------------------- folder lock

HOLD = "import sys, time; from dira3d.utils.folder_lock import FolderLock; FolderLock(sys.argv[1]).acquire(); " \
       "print('locked', flush=True); time.sleep(120)"


def free_for_another_process(folder) -> bool:
    done = subprocess.run([sys.executable, "-c", "import sys; from dira3d.utils.folder_lock import FolderLock; "
                           "FolderLock(sys.argv[1]).acquire()", str(folder)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert done.returncode == 0 or "FolderInUseError" in done.stderr, done.stderr
    return done.returncode == 0


def test_the_holder_replaces_an_earlier_record_with_its_own_line(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("process 1 on a-killed-run\nand more text\n")
    (folder / HOLDER_NAME).write_text("process 2 on another-killed-run\n")
    with FolderLock(folder):
        assert (folder / LOCK_NAME).read_text() == f"process {os.getpid()} on {os.uname().nodename}\n"
        assert not (folder / HOLDER_NAME).exists()


def test_one_object_acquiring_twice_releases_with_one_call(tmp_path):
    lock = FolderLock(tmp_path)
    lock.acquire()
    lock.acquire()
    assert not free_for_another_process(tmp_path)
    lock.release()
    assert free_for_another_process(tmp_path)


def test_a_second_release_does_not_drop_another_objects_hold(tmp_path):
    first, second = FolderLock(tmp_path).acquire(), FolderLock(tmp_path).acquire()
    first.release()
    first.release()
    assert not free_for_another_process(tmp_path)  # `second` still holds it
    second.release()
    assert free_for_another_process(tmp_path)


def test_a_folder_released_and_locked_again_is_locked(tmp_path):
    lock = FolderLock(tmp_path).acquire()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock.release()  # closes the lock file itself: nothing is left for the garbage collector to close
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    again = FolderLock(tmp_path).acquire()
    assert not free_for_another_process(tmp_path)
    again.release()
    assert free_for_another_process(tmp_path)


def test_a_refused_lock_leaves_no_open_file(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        gc.collect()  # files earlier tests of this worker left to the collector are closed before counting
        before = len(os.listdir("/proc/self/fd"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                with pytest.raises(FolderInUseError, match=f"in use by process {holder.pid} "):
                    FolderLock(tmp_path).acquire()
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # closed, not left to the collector
        assert len(os.listdir("/proc/self/fd")) <= before  # a leak adds one per refused lock
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- signals and exit codes


def test_exit_codes_are_128_plus_the_signal():
    assert StoppedBySignal("SIGTERM", 7).code == 143 and StoppedBySignal("SIGINT", 7).code == 130
    assert TerminatedBySignal().code == 143 and TerminatedBySignal(signal.SIGINT).code == 130
    assert interrupt_exit_code(KeyboardInterrupt()) == 130 and interrupt_exit_code(TerminatedBySignal()) == 143
    assert interrupted_word(None) == "interrupted" and interrupted_word(KeyboardInterrupt()) == "interrupted"
    assert interrupted_word(TerminatedBySignal()) == "stopped by SIGTERM"


def test_sigterm_as_interrupt_in_another_thread_changes_nothing():
    before, errors = signal.getsignal(signal.SIGTERM), []

    def body():
        try:
            with sigterm_as_interrupt():
                errors.append(signal.getsignal(signal.SIGTERM))
        except Exception as err:  # noqa: BLE001 - recorded for the assertion
            errors.append(err)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == [before] and signal.getsignal(signal.SIGTERM) == before


def test_a_process_stopped_by_sigterm_keeps_what_it_wrote_restores_the_handler_and_exits_143(tmp_path):
    script = textwrap.dedent("""
        import signal, sys, time
        from dira3d.utils.atomic import atomic_write_text
        from dira3d.utils.interrupts import interrupt_exit_code, sigterm_as_interrupt
        try:
            with sigterm_as_interrupt():
                atomic_write_text(sys.argv[1], "written before the signal")
                print("ready", flush=True)
                time.sleep(60)
        except KeyboardInterrupt as err:
            print("restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
            sys.exit(interrupt_exit_code(err))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out.txt")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and out.strip() == "restored True", err
    assert (tmp_path / "out.txt").read_text() == "written before the signal"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_ctrl_c_record_is_kept_off_the_last_resort_handler_too():
    """A process without logging set-up logs through ``logging.lastResort``: that handler is quieted too."""
    script = textwrap.dedent("""
        import logging
        from dira3d.utils.interrupts import quiet_interrupt_logs
        with quiet_interrupt_logs():
            for error in (KeyboardInterrupt, ValueError):
                try:
                    raise error()
                except BaseException:
                    logging.getLogger("engine").exception("failed with %s", error.__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "failed with ValueError" in done.stderr and "failed with KeyboardInterrupt" not in done.stderr


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize(("text", "value"), [
    ("0.125", 0.125), ("[64,64,32]", [64, 64, 32]), ("null", None), ("true", True), ("1e-3", 0.001),
    ("False", False), ("None", None), ("(1, 2)", (1, 2)), ("[{'name': 'res', 'losses': ['res']}]",
                                                             [{"name": "res", "losses": ["res"]}]),
    ("res", "res"), ("hello world", "hello world"), ("$@a + 1", "$@a + 1"), ("", ""),
])
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_as_bool():
    for text in ("true", " True ", "YES", "1"):
        assert as_bool(text, "tiny") is True
    for text in ("false", "0", "no", "None", "null", "", "  "):
        assert as_bool(text, "tiny") is False
    assert as_bool(1, "tiny") is True and as_bool(0, "tiny") is False and as_bool(None, "tiny") is False
    with pytest.raises(ValueError, match=r"tiny='maybe' is not a boolean; set tiny to true or false"):
        as_bool("maybe", "tiny")


def test_check_overrides_by_hand(tmp_path):
    config = tmp_path / "configs" / "train.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"max_epochs": 10, "lr": 0.1, "compile": False, "holdout": 0.2, "name": "x",
                                  "net": {"channels": 4}}))
    check_overrides([config, tmp_path / "missing.json"], {
        "max_epochs": 5, "lr": "$@max_epochs * 0.01", "holdout": "validation", "compile": "inductor", "name": 3,
        "net#channels": "%configs/other.json#c"})
    with pytest.raises(ValueError, match=r"--set: max_epochs='two' is text, but the setting is a number "
                                         r"\(default 10\); fix the value"):
        check_overrides([config], {"max_epochs": "two"}, where="--set")
    with pytest.raises(ValueError, match=r"holdout='valid' is text, but the setting is a number \(default 0.2\) "
                                         r"or 'validation'; fix the value"):
        check_overrides([config], {"holdout": "valid"})
    with pytest.raises(ValueError, match=rf"override: no setting 'max_epoch' \(did you mean 'max_epochs'\?\); "
                                         rf"'zzz' in train.json of {tmp_path}; fix or remove it"):
        check_overrides([config], {"max_epoch": 1, "zzz": 2, "lr": 0.5})


def test_did_you_mean():
    assert did_you_mean(["max_epoch", "xyz"], ["max_epochs", "lr"]) == "'max_epoch' (did you mean 'max_epochs'?); 'xyz'"
    assert did_you_mean(["learning_rat"], ["lr", "learning_rate"]) == "'learning_rat' (did you mean 'learning_rate'?)"


# ---------------------------------------------------------------- checkpoints and seeds


def test_load_checkpoint_names_the_option_of_a_missing_file_and_refuses_a_list(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope.pt does not exist; check the path given by "
                                                r"--checkpoint"):
        load_checkpoint(tmp_path / "nope.pt", given_by="--checkpoint")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, expected a dict of state_dicts"):
        load_checkpoint(tmp_path / "list.pt")


def test_63_bit_seed_is_two_seedsequence_words_packed_by_hand():
    for parts in ((0,), (1, 2, 3), (2**40, 7, 0)):
        w0, w1 = (int(w) for w in np.random.SeedSequence(list(parts)).generate_state(2, np.uint32))
        assert derive_seed(*parts, bits=63) == w0 * 2**31 + w1 // 2
        assert derive_seed(*parts, bits=32) == w0


def test_stream_seed_folds_the_seed_to_its_low_32_bits():
    for seed, folded in ((-1, 2**32 - 1), (2**31 + 3, 2**31 + 3), (2**32 + 5, 5), (-(2**31), 2**31)):
        assert stream_seed(seed, 4, 9) == derive_seed(folded, 4, 9, bits=63)
    assert stream_seed(1, 2, 3) != stream_seed(1, 3, 2)  # stream, then counter


# ---------------------------------------------------------------- host syncs


def test_host_sync_detector_finds_the_syncs_and_puts_the_tensor_methods_back():
    tolist, numpy_ = torch.Tensor.tolist, torch.Tensor.numpy
    x = torch.arange(6.0)
    with HostSyncDetector() as syncs:
        x[x > 2]
        torch.nonzero(x)
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]))
        x.tolist()
    ops = [e.op for e in syncs.events]
    assert "aten::nonzero" in ops and "Tensor.tolist" in ops
    assert ("aten::index", "boolean-mask indexing (a hidden nonzero)") in [(e.op, e.reason) for e in syncs.events]
    assert any("repeat_interleave" in e.reason for e in syncs.events)
    assert all(__file__ in e.where for e in syncs.events), syncs.report()
    assert torch.Tensor.tolist is tolist and torch.Tensor.numpy is numpy_
    with HostSyncDetector() as quiet:
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]), output_size=7)
        x[torch.tensor([0, 2])]
    assert [e.reason for e in quiet.events if "repeat_interleave" in e.reason or "mask" in e.reason] == []


def test_host_sync_detector_leaves_out_calls_from_an_exempt_path():
    x = torch.ones(3)
    with HostSyncDetector(exempt=(Path(__file__).name,)) as exempt:
        x.sum().item()
    with HostSyncDetector() as recorded:
        x.sum().item()
    assert exempt.events == [] and [e.op for e in recorded.events] == ["aten::_local_scalar_dense"]


# ---------------------------------------------------------------- setting hints, pool threads, the dira3d command


def test_setting_hints_inside_and_outside_an_experiment():
    values = {"width": 0.125, "backbone": "resnet10", "decoder_channels": [16, 8]}
    assert bundle_setting(values, "`--set width=0.125`") == "`--set width=0.125`"
    assert label_fraction_setting() == "--label-fraction" and not in_experiment()
    with experiment_settings():
        assert bundle_setting(values, "`--set width=0.125`") == (
            "`overrides: {width: 0.125, backbone: resnet10, decoder_channels: [16, 8]}` in the experiment config")
        assert label_fraction_setting() == "label_fractions in the experiment config"
    assert not in_experiment() and label_fraction_setting() == "--label-fraction"


def test_finish_pool_threads_from_a_pool_worker_does_not_join_itself():
    with ThreadPool(2) as pool:
        me, still_running = pool.apply(lambda: (threading.current_thread().name, finish_pool_threads(timeout=0.2)))
    assert me not in still_running and len(still_running) == 1  # the other worker, idle, waits for tasks


def test_the_dira3d_command_exit_codes(monkeypatch, capsys):
    assert cli.main([]) == 0 and "usage: dira3d <command>" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["nope"]) == 2 and "dira3d: unknown command 'nope'" in capsys.readouterr().err
    waited = []
    monkeypatch.setattr("dira3d.utils.threads.finish_pool_threads", lambda: waited.append(True) or [])
    module = types.ModuleType("dira3d_reference_commands")
    module.none = lambda argv: None
    module.three = lambda argv: 3
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "none", (f"{module.__name__}:none", "returns None"))
    monkeypatch.setitem(cli.COMMANDS, "three", (f"{module.__name__}:three", "fails"))
    assert cli.main(["none"]) == 0 and waited == []
    assert cli.main(["three"]) == 3 and waited == [True]  # a failed command waits for pool threads


def test_every_dira3d_command_leaves_out_the_nvimgcodec_notices(monkeypatch, capsys):
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    with warnings.catch_warnings():
        assert cli.main(["--help"]) == 0  # set up by main itself, before any command runs
        assert logger.level == logging.ERROR
        assert any(f[0] == "ignore" and f[1] is not None and f[1].pattern.startswith("NvImgCodecPydicomReader")
                   for f in warnings.filters)


@pytest.mark.parametrize(("error", "code", "word"), [(KeyboardInterrupt(), 130, "interrupted"),
                                                     (TerminatedBySignal(), 143, "stopped by SIGTERM")])
def test_a_signal_while_the_command_module_loads_gives_its_code(monkeypatch, capsys, error, code, word):
    class Loading(types.ModuleType):
        def __getattr__(self, name):
            raise error

    monkeypatch.setitem(sys.modules, "dira3d_reference_loading", Loading("dira3d_reference_loading"))
    monkeypatch.setitem(cli.COMMANDS, "slow", ("dira3d_reference_loading:main", "loads"))
    assert cli.main(["slow"]) == code
    assert capsys.readouterr().err == f"dira3d slow: {word} while loading, before the command started; nothing was written\n"
