"""The pretraining run's check that no other run holds its checkpoint folder (``ckpt_dir``).

Light to import (no torch, no MONAI): ``dira3d pretrain`` runs :func:`check_checkpoint_folder_free` before torch and
MONAI load, so a second run into a folder another run holds is refused at once; the bundle's ``initialize`` runs it
again (``$dira3d.engines.check_checkpoint_folder_free``), for ``python -m monai.bundle run`` and ``torchrun``.
:func:`remove_killed_checkpoint_writes` (also an ``initialize`` step) removes the half-written checkpoints a killed save
left, before a rerun of a finished run ends there.
"""

from __future__ import annotations

import os
from pathlib import Path

from dira3d.utils.atomic import remove_stale_temporaries_of, stale_temporaries_of
from dira3d.utils.folder_lock import FolderLock

__all__ = ["CHECKPOINT_FILES", "CHECKPOINT_FOLDER", "check_checkpoint_folder_free", "remove_killed_checkpoint_writes"]

CHECKPOINT_FOLDER = "checkpoint folder"  # how the lock names ckpt_dir in its error
CHECKPOINT_FILES = ("last.pt", "best.pt")  # what DiRACheckpoint writes in ckpt_dir


def check_checkpoint_folder_free(ckpt_dir: str | os.PathLike) -> None:
    """For a bundle config's ``initialize``: stop at once when another run writes checkpoints into ``ckpt_dir``,
    before any dataset is cached (caching a real dataset takes minutes to hours, and
    :class:`~dira3d.engines.DiRACheckpoint` takes the lock only as the engine starts). The lock is not taken here.
    Global rank 0 alone checks: the other ranks of a ``torchrun`` never take it, and two ranks probing at once would
    see each other.

    Raises:
        dira3d.utils.folder_lock.FolderInUseError: another process holds ``ckpt_dir``'s lock.
    """
    if int(os.environ.get("RANK", "0")) == 0:
        FolderLock(ckpt_dir, what=CHECKPOINT_FOLDER).check_free()


def remove_killed_checkpoint_writes(ckpt_dir: str | os.PathLike) -> list[Path]:
    """For a bundle config's ``initialize``, before ``exit_if_finished``: remove the hidden ``.last.pt.*.tmp`` /
    ``.best.pt.*.tmp`` (each a checkpoint's size) that a run killed in the middle of a save (SIGKILL, the OOM killer)
    left in ``ckpt_dir``. :class:`~dira3d.engines.DiRACheckpoint` removes them as the engine starts, which a rerun of a
    finished run never reaches (it ends in ``initialize``): they stayed. Global rank 0 alone, holding ``ckpt_dir``'s lock
    as the checkpoint handler does, and only when there is one to remove (otherwise nothing is written, the lock file
    included); a temporary file a live writer holds is kept (:func:`dira3d.utils.atomic.stale_temporaries_of`).

    Returns:
        The files removed (each named on stderr).

    Raises:
        dira3d.utils.folder_lock.FolderInUseError: another process holds ``ckpt_dir``'s lock.
    """
    folder = Path(ckpt_dir)
    if int(os.environ.get("RANK", "0")) != 0 or not folder.is_dir():
        return []
    targets = [folder / name for name in CHECKPOINT_FILES]
    if not any(stale_temporaries_of(target) for target in targets):
        return []
    with FolderLock(folder, what=CHECKPOINT_FOLDER):
        return [p for target in targets for p in remove_stale_temporaries_of(target, what="pretraining run")]
