"""One writer per output folder: an advisory ``flock`` on ``<folder>/.dira3d.lock``.

Two runs writing checkpoints into one folder take turns replacing each other's ``last.pt``; a
resume then continues whichever wrote last. :class:`FolderLock` makes the second run fail at its
start with a message naming the folder and the process that holds it. The operating system drops
the lock when its holder exits in any way (SIGKILL included), so a crashed run never leaves a
stale lock behind. On file systems without ``flock`` (some network mounts) or without ``fcntl``
(Windows) the lock is skipped with a warning.

The holder writes who it is into the lock file. A lock file it cannot write (left by another user in
a shared, group-writable folder: ``flock`` needs no write access) still holds the text of an earlier
holder, so the holder then records itself in ``<folder>/.dira3d.lock.holder`` instead (written anew,
removed when it releases the lock), and a refused run names the holder from the newer of the two.
(A holder that can write neither records nothing and the earlier record stays: a folder it cannot
write, where runs stop at their check of the output folder before they take the lock, or a sticky
folder, ``chmod +t``, where another user's holder file cannot be replaced.)
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import IO

from dira3d.utils.atomic import atomic_write_text

__all__ = ["FolderLock", "FolderInUseError"]

LOCK_NAME = ".dira3d.lock"
HOLDER_NAME = f"{LOCK_NAME}.holder"  # who holds the lock, when the lock file cannot be written
# folder -> [open lock file, FolderLock objects of this process holding it, holder file it wrote or None]:
# flock excludes other processes; runs of one process (one after the other, e.g. a resume in a test) share the lock
_HELD: dict[Path, list] = {}


def _record_holder(folder: Path, handle: IO[str]) -> Path | None:
    """Write who holds the lock: into the lock file, else (read-only lock file) into a new holder file,
    which is returned (the holder removes it when it releases the lock)."""
    text = f"process {os.getpid()} on {os.uname().nodename}\n"
    sidecar = folder / HOLDER_NAME
    if handle.writable():
        handle.seek(0)
        handle.truncate()
        handle.write(text)
        handle.flush()
        with contextlib.suppress(OSError):  # an earlier holder's (a killed one's); older than the lock file's text now
            sidecar.unlink(missing_ok=True)
        return None
    try:
        atomic_write_text(sidecar, text)
    except OSError:  # a folder this process cannot write: it will not get far there anyway
        return None
    return sidecar


def _holder(folder: Path) -> str:
    """Who holds the lock, as recorded by the newest of the lock file and the holder file."""
    recorded = []
    for path in (folder / LOCK_NAME, folder / HOLDER_NAME):
        try:
            when, text = path.stat().st_mtime_ns, path.read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            continue
        if text:
            recorded.append((when, path.name == HOLDER_NAME, text))
    return max(recorded)[2] if recorded else "another process (unknown)"


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
        except PermissionError as denied:  # left by another user of a shared (group-writable) folder: flock needs no write
            try:
                handle = open(self.folder / LOCK_NAME, encoding="utf-8")  # noqa: SIM115
            except FileNotFoundError:  # no lock file to share: the folder itself is not writable
                raise PermissionError(f"cannot write in {self.folder} (its lock file {LOCK_NAME} cannot be created: "
                                      f"{denied.strerror}); choose a folder you can write to, or make it writable") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FolderInUseError(self._in_use()) from None
        except OSError as err:  # a file system without flock
            handle.close()
            warnings.warn(f"{self.folder} cannot be locked ({err}); make sure no other run writes there", stacklevel=2)
            return self
        _HELD[key] = [handle, 1, _record_holder(self.folder, handle)]  # who holds it, for the error of a second run
        self.held = True
        return self

    def check_free(self) -> None:
        """Raise now when another process holds the lock, without taking it or creating anything: a run's
        early check, before it spends time caching data (it takes the lock when it starts writing). The probe
        holds the lock for an instant: a second run taking it at that very moment is refused, as one of the two
        would be anyway.

        Raises:
            FolderInUseError: another process holds it.
        """
        lock_file = self.folder / LOCK_NAME
        if self.held or not lock_file.is_file() or self.folder.resolve() in _HELD:
            return
        try:
            import fcntl

            handle = open(lock_file, encoding="utf-8")  # noqa: SIM115 - closed below; flock needs no write access
        except (ImportError, OSError):  # no fcntl (Windows) or unreadable: acquire() says what it can
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderInUseError(self._in_use()) from None
            except OSError:  # a file system without flock: acquire() warns
                return
            fcntl.flock(handle, fcntl.LOCK_UN)

    def _in_use(self) -> str:
        return (f"{self.what} {self.folder} is in use by {_holder(self.folder)}: {self.clash}; wait for that run to "
                "end, or choose another output folder")

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
            if entry[2] is not None:  # removed while the lock is still held: it cannot be the next holder's
                with contextlib.suppress(OSError):
                    entry[2].unlink(missing_ok=True)
            entry[0].close()
            del _HELD[key]
