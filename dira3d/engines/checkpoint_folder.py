"""The pretraining run's check that no other run holds its checkpoint folder (``ckpt_dir``).

Light to import (no torch, no MONAI): ``dira3d pretrain`` runs :func:`check_checkpoint_folder_free` before torch and
MONAI load, so a second run into a folder another run holds is refused at once; the bundle's ``initialize`` runs it
again (``$dira3d.engines.check_checkpoint_folder_free``), for ``python -m monai.bundle run`` and ``torchrun``.
"""

from __future__ import annotations

import os

from dira3d.utils.folder_lock import FolderLock

__all__ = ["CHECKPOINT_FOLDER", "check_checkpoint_folder_free"]

CHECKPOINT_FOLDER = "checkpoint folder"  # how the lock names ckpt_dir in its error


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
