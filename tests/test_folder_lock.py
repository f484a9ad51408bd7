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
