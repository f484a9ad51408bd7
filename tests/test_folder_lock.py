"""One writer per checkpoint folder: a second process is refused at its start, naming the holder;
the lock goes with its holder, however it ends (SIGKILL included)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dira3d.engines import DiRACheckpoint
from dira3d.utils.folder_lock import FolderInUseError, FolderLock

HOLD = "import sys, time; from dira3d.utils.folder_lock import FolderLock; FolderLock(sys.argv[1]).acquire(); " \
       "print('locked', flush=True); time.sleep(120)"


def hold_in_another_process(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def try_in_another_process(folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from dira3d.utils.folder_lock import FolderLock; "
                           "FolderLock(sys.argv[1]).acquire()", str(folder)], capture_output=True, text=True)


def test_a_second_process_is_refused_until_the_holder_is_gone(tmp_path):
    holder = hold_in_another_process(tmp_path / "models")
    try:
        with pytest.raises(FolderInUseError, match=rf"{tmp_path / 'models'} is in use by process {holder.pid} "):
            FolderLock(tmp_path / "models").acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    lock = FolderLock(tmp_path / "models").acquire()
    assert lock.held
    again = FolderLock(tmp_path / "models").acquire()  # the same process: shared, counted
    lock.release()
    refused = try_in_another_process(tmp_path / "models")  # still held by `again`
    assert refused.returncode == 1 and f"in use by process {os.getpid()} " in refused.stderr, refused.stderr
    again.release()
    assert try_in_another_process(tmp_path / "models").returncode == 0


def test_pretraining_into_a_folder_in_use_stops_before_training(tmp_path):
    from test_engine import make_trainer

    folder = tmp_path / "models"
    holder = hold_in_another_process(folder)
    try:
        trainer = make_trainer(max_epochs=1, handlers=[DiRACheckpoint(folder)])
        with pytest.raises(FolderInUseError, match="checkpoint folder"):
            trainer.run()
        assert trainer.state.iteration == 0 and not (folder / "last.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    trainer = make_trainer(max_epochs=1, handlers=[DiRACheckpoint(folder)])
    trainer.run()  # the holder is gone: it runs, and releases the lock when it completes
    assert (folder / "last.pt").is_file()
    assert try_in_another_process(folder).returncode == 0


def test_prepare_finetune_and_visual_words_into_a_folder_in_use_stop_at_once(tmp_path, capsys):
    """Two runs into one folder used to pass the checks of an earlier run together: two `dira3d prepare`
    with other --window values mixed their volumes under one datalist, two `dira3d finetune` replaced each
    other's model.pt (metrics.json of one, weights of the other), two `dira3d visual-words` re-created
    (zeroed) each other's finished shards."""
    import numpy as np
    import SimpleITK as sitk

    from dira3d.cli import main as cli_main

    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    image = sitk.GetImageFromArray(np.zeros((8, 12, 12), np.int16))
    sitk.WriteImage(image, str(src / "a.nii.gz"))
    holder = hold_in_another_process(dst)
    try:
        commands = {
            "prepare": (["prepare", "generic", "--src", str(src), "--dst", str(dst)], 2, "mix its cases"),
            "finetune": (["finetune", "--bundle", "luna16_nodule_fpr", "--datalist", str(tmp_path / "dl.json"),
                          "--output-dir", str(dst)], 2, "replace its model.pt and metrics.json"),
            "visual-words": (["visual-words", "--datalist", str(tmp_path / "dl.json"), "--out", str(dst)], 1,
                             "re-create the shards it fills"),
        }
        for name, (argv, code, clash) in commands.items():
            assert cli_main(argv) == code, name
            err = capsys.readouterr().err
            assert f"{dst} is in use by process {holder.pid} " in err and clash in err, (name, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert sorted(p.name for p in dst.iterdir()) == [".dira3d.lock"]  # nothing written beside the holder
    finally:
        holder.kill()
        holder.wait()
    assert cli_main(commands["prepare"][0]) == 0 and (dst / "volumes" / "a.nii.gz").is_file()


def test_a_holder_record_a_killed_run_left_does_not_name_the_next_holder(tmp_path):
    """``.dira3d.lock.holder`` (written by a holder that could not write the lock file) of a killed run is older
    than the next holder's own record: the refusal names the process that holds the folder now."""
    import time

    folder = tmp_path / "models"
    folder.mkdir()
    stale = folder / ".dira3d.lock.holder"
    stale.write_text("process 1 on a-killed-run\n")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    holder = hold_in_another_process(folder)
    try:
        with pytest.raises(FolderInUseError, match=rf"in use by process {holder.pid} "):
            FolderLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_check_free_refuses_while_another_process_holds_the_folder_and_takes_nothing(tmp_path):
    folder = tmp_path / "models"
    FolderLock(folder).check_free()  # no lock file: nothing is created
    assert not folder.exists()
    holder = hold_in_another_process(folder)
    try:
        with pytest.raises(FolderInUseError, match=rf"checkpoint folder {folder} is in use by process {holder.pid} "):
            FolderLock(folder, what="checkpoint folder").check_free()
    finally:
        holder.kill()
        holder.wait()
    FolderLock(folder).check_free()  # the holder is gone
    assert try_in_another_process(folder).returncode == 0  # and the check held nothing
    with FolderLock(folder):  # this process holds it: its own check passes, and the lock stays held
        FolderLock(folder).check_free()
        assert try_in_another_process(folder).returncode == 1


def test_a_folder_without_write_permission_is_named_instead_of_a_bare_missing_file(tmp_path, monkeypatch):
    """In a folder the user cannot write, with no lock file of another user to share, taking the lock ended in a bare
    FileNotFoundError of the read-only fallback (the file was never there): now a PermissionError names the folder.
    (Simulated: the tests may run as root, for whom no folder is read-only.)"""
    import builtins

    import dira3d.utils.folder_lock as folder_lock

    def refuse_writes(path, mode="r", *args, **kwargs):
        if "a" in mode or "w" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(folder_lock, "open", refuse_writes, raising=False)
    with pytest.raises(PermissionError, match=rf"cannot write in {tmp_path}.*Permission denied.*choose a folder you can"):
        FolderLock(tmp_path).acquire()
    # a lock file another user left is shared read-only, as before
    (tmp_path / folder_lock.LOCK_NAME).write_text("")
    lock = FolderLock(tmp_path).acquire()
    assert lock.held
    lock.release()
