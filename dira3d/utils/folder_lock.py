"""One writer per output folder: an advisory ``flock`` on ``<folder>/.dira3d.lock``.

Two runs writing checkpoints into one folder take turns replacing each other's ``last.pt``; a
resume then continues whichever wrote last. :class:`FolderLock` makes the second run fail at its
start with a message naming the folder and the process that holds it. The operating system drops
the lock when its holder exits in any way (SIGKILL included), so a crashed run never leaves a
stale lock behind. On file systems without ``flock`` (some network mounts) or without ``fcntl``
(Windows) the lock is skipped with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["FolderLock", "FolderInUseError"]

LOCK_NAME = ".dira3d.lock"
# folder -> [open lock file, FolderLock objects of this process holding it]: flock excludes other
# processes; runs of one process (one after the other, e.g. a resume in a test) share the lock
_HELD: dict[Path, list] = {}


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """Exclusive, non-blocking lock of ``folder`` for this process while it writes there.

    The lock excludes other processes; objects of one process share it (counted), since a run that
    stopped on an exception is not always told to release it.

    Args:
        folder: the output folder (created if missing).
        what: how the folder is named in the error (e.g. "checkpoint folder").
        clash: what a second run would do there, for the error.

    Also a context manager (``with FolderLock(folder):``).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "output folder",
                 clash: str = "a second run writing there would replace its checkpoints in turn") -> None:
        self.folder, self.what, self.clash = Path(folder), what, clash
        self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> FolderLock:
        """Take the lock (a no-op while this object holds it).

        Raises:
            FolderInUseError: another process holds it.
        """
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            self.held = True
            return self
        try:
            import fcntl
        except ImportError:  # Windows
            warnings.warn(f"no fcntl on this system: {self.folder} is not locked against a second run", stacklevel=2)
            return self
        try:
            handle = open(self.folder / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        except PermissionError:  # left by another user of a shared (group-writable) folder: flock needs no write access
            handle = open(self.folder / LOCK_NAME, encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderInUseError(
                f"{self.what} {self.folder} is in use by {holder}: {self.clash}; wait for that run to end, or choose "
                "another output folder") from None
        except OSError as err:  # a file system without flock
            handle.close()
            warnings.warn(f"{self.folder} cannot be locked ({err}); make sure no other run writes there", stacklevel=2)
            return self
        if handle.writable():  # who holds it, for the error of a second run
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {os.uname().nodename}\n")
            handle.flush()
        _HELD[key] = [handle, 1]
        self.held = True
        return self

    def release(self) -> None:
        """Drop this object's hold; the last one of the process closes the file, which releases the
        flock (the file stays: removing it would race with a process about to lock it)."""
        if not self.held:
            return
        self.held = False
        key = self.folder.resolve()
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()
            del _HELD[key]
