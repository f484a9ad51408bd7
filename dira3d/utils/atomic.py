"""Atomic file writes: a file is always either the old version or the complete new one.

Every writer goes through a temporary file in the target's own folder (so that the final
``os.replace`` stays on one file system, where it is atomic on POSIX and Windows), which is flushed
to disk (``os.fsync``) before the rename makes it visible: after a power loss the target is the old
file or the complete new one, never a renamed file whose data had not reached the disk. After the
rename the folder itself is fsynced (POSIX), so that the rename, a change to the folder's entries,
is on disk too when the write returns. A process killed mid-write leaves the previous file intact
and at most a stray hidden ``.tmp`` file; an exception removes the temporary file.
"""

from __future__ import annotations

import atexit
import errno
import glob
import os
import re
import shutil
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["FolderNotWritableError", "atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text", "check_writable",
           "check_output_settings", "remove_created_empty_folders", "removed_if_failed", "removed_if_failed_empty", "stale_temporaries",
           "stale_temporaries_of", "remove_stale_temporaries_of"]

# mkstemp creates the temporary file 0600; the final file gets the mode an ordinary open() would
# give it (0666 less the umask), or keeps the mode of the file it replaces. The umask is read once:
# setting it to read it is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _final_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def _sync_to_disk(path: str | os.PathLike) -> None:
    """``os.fsync`` a closed file (Windows needs a handle open for writing to flush it)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Windows cannot open a folder with os.open (nor needs to: NTFS journals the rename itself)
_SYNCS_FOLDERS = os.name != "nt"
# errors of a folder that cannot be opened or fsynced (no read permission, a file system such as some FUSE or
# network mounts that refuses fsync on a folder): the rename is done, only its durability is not forced
_FOLDER_SYNC_UNSUPPORTED = {errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF,
                            errno.EISDIR}


def _sync_folder(folder: str | os.PathLike) -> None:
    """``os.fsync`` a folder so that a rename in it survives a power loss (POSIX: a rename changes the folder,
    which the file system may keep in memory for a while). Skipped on Windows and where the folder cannot be
    opened or the file system does not sync folders; any other error (``EIO``: the disk failed) is raised."""
    if not _SYNCS_FOLDERS:
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        if err.errno in _FOLDER_SYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FOLDER_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it is flushed to disk and renamed over ``path``,
    and the folder is flushed to disk after the rename (POSIX; see :func:`_sync_folder`).

    For writers that want a file name rather than a handle (PIL, SimpleITK, which pick the
    format from the name's suffix: pass e.g. ``suffix=".nii.gz"``). The parent folder is created.

    Args:
        path: the final file.
        suffix: ending of the temporary file's name.

    Yields:
        The temporary file (created empty) to write to.

    Raises:
        Whatever the body raises; the temporary file is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp, tried = -1, "", []
    try:  # the name is known before the file exists: a Ctrl-C / SIGTERM raised right after it is made removes it too
        fd, tmp = _create_temporary(path, suffix, tried.append)
        if not _hold(fd):  # held while written: stale_temporaries_of leaves it alone (the lock goes with the process)
            os.close(fd)  # no flock here (Windows, some network file systems): closed at once, as before
            fd = -1
        yield Path(tmp)
        _sync_to_disk(tmp)  # the data are on disk before the rename makes them visible
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if tmp or (tried and tried[-1]):  # the last name tried: what an interrupt inside _create_temporary may leave
            Path(tmp or tried[-1]).unlink(missing_ok=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    _sync_folder(path.parent)  # the rename is on disk too: a power loss now cannot bring the old file back


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a binary temporary file, flush it to disk, rename it over ``path``
    (through :func:`atomic_path`).

    Args:
        path: the final file (its folder is created).
        write: fills the open binary handle (``torch.save``, ``np.save``, ``handle.write``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        Whatever ``write`` raises, or an ``OSError`` from the file system; ``path`` is then untouched.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                write(handle)
            # closed (flushed): atomic_path syncs it to disk, then renames it
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        # a failed write (a full disk: "[Errno 28] No space left on device") names no file: name the target
        raise OSError(err.errno, err.strerror, str(path)) from err
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding`` (see :func:`atomic_write`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_bytes(path, text.encode(encoding))


class FolderNotWritableError(PermissionError):
    """An output folder cannot be created or written to (read-only mount, another user's folder). The
    message names the folder and what to do; commands print it as one ``error:`` line."""


def check_writable(folder: str | os.PathLike, min_free_bytes: int = 0, what: str = "output folder",
                   advice: str = "choose another folder or fix its permissions") -> Path:
    """Create ``folder`` if needed and fail early when it cannot be written (or hold ``min_free_bytes``).

    ``what`` names the folder in the messages (``"output folder (--dst)"``); ``advice`` says what to do
    when it is not writable (e.g. which option sends the output elsewhere).

    Raises:
        FolderNotWritableError: the folder cannot be created or written to (a ``PermissionError``).
        OSError: fewer than ``min_free_bytes`` are free on its file system.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise FolderNotWritableError(f"{what} {folder} is not writable ({err.strerror or err}); {advice}") from err
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    if free < min_free_bytes:
        raise OSError(
            f"{what} {folder} has {free / 2**20:.0f} MiB free, less than the "
            f"{min_free_bytes / 2**20:.0f} MiB needed; free some space or choose another folder"
        )
    return folder


def check_output_settings(hint: str = "", **settings: str | os.PathLike) -> None:
    """For a bundle config's ``initialize``: check that the output folders its settings name can be written,
    before any data is loaded (MONAI creates them only when the run reaches its writer, after the datasets are
    cached, and fails with a traceback naming the folder alone). A setting whose name ends in ``_path`` is a
    file: its folder is checked. ``hint`` is added to the advice (e.g. where the default lies).

    The folders it creates (and their new parents) are removed again when the process ends with them still empty
    (:func:`remove_created_empty_folders`, at exit): a run refused after this check (a later ``initialize`` check, a
    missing datalist) under plain ``python -m monai.bundle run`` leaves no empty ``models/`` or ``eval/`` behind (the
    ``dira3d`` commands remove theirs as soon as a run fails: :func:`removed_if_failed_empty`). A folder that existed
    before, or one that holds anything, is never removed.

    Example: ``"$dira3d.utils.check_output_settings(ckpt_dir=@ckpt_dir, output_dir=@output_dir)"``.

    Raises:
        FolderNotWritableError: naming the setting, the folder and the override that sends it elsewhere.
    """
    for name, value in settings.items():
        file = name.endswith("_path")
        advice = f"pass --{name} with {'a file in ' if file else ''}a writable folder" + (f" ({hint})" if hint else "")
        folder = Path(value).parent if file else Path(value)
        new = _new_folders(folder)
        check_writable(folder, what=f"{name} folder" if file else name, advice=advice)
        _remember_created(new)


# folders check_output_settings created in this process (rank 0 of a distributed run: another rank may still write
# into one when this one ends), removed at its exit when they hold nothing but lock files (remove_created_empty_folders)
_CREATED: dict[Path, int] = {}


def _new_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet (absolute): the folders creating it would make."""
    new = []
    for path in (folder.absolute(), *folder.absolute().parents):
        if path.exists() or path.is_symlink():
            break
        new.append(path)
    return new


def _remember_created(folders: list[Path]) -> None:
    if int(os.environ.get("RANK", "0") or 0) == 0:
        _CREATED.update((path, os.getpid()) for path in folders if path.is_dir())


def remove_created_empty_folders() -> list[Path]:
    """Remove the folders :func:`check_output_settings` created in this process that hold nothing now but the run's
    lock files (see :func:`removed_if_failed_empty`), innermost first; registered to run at exit. A folder that holds
    anything else stays, and so do its parents.

    Returns:
        The folders removed.
    """
    removed = []
    for folder in sorted(_CREATED, key=lambda path: len(path.parts), reverse=True):
        if _CREATED.pop(folder) == os.getpid() and _remove_if_only_locks(folder):  # not in a forked child
            removed.append(folder)
    return removed


# registered when dira3d is imported, before any writer's own exit handler (a TensorBoard writer's flush), which runs
# first (last registered, first run): what a writer puts in a folder at exit keeps it
atexit.register(remove_created_empty_folders)


def _only_locks(path: Path) -> bool:
    """Whether folder ``path`` holds nothing but lock files and folders of nothing else (models/ with its own lock)."""
    from dira3d.utils.folder_lock import LOCK_NAME

    return all((p.name == LOCK_NAME and p.is_file()) or (p.is_dir() and not p.is_symlink() and _only_locks(p))
               for p in path.iterdir())


def _remove_if_only_locks(folder: Path) -> bool:
    """Remove ``folder`` when it is a folder (not a link) that holds nothing but lock files; whether it was removed."""
    try:
        if folder.is_symlink() or not folder.is_dir() or not _only_locks(folder):
            return False
        for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        folder.rmdir()
    except OSError:  # written to meanwhile, or not ours to remove: left as it is
        return False
    return True


@contextmanager
def removed_if_failed_empty(folder: str | os.PathLike) -> Iterator[Path]:
    """Remove ``folder`` again when the block fails (any exception, Ctrl-C included) and the folder did
    not exist before it and is still empty (but for the run's own lock file, released by then: see
    :mod:`dira3d.utils.folder_lock`): a run refused at its start leaves no empty output folder behind.
    A folder the user had, or one holding anything else, is left alone. The parents the block created with it
    (``runs/`` of ``--output-dir runs/ft``) go too, innermost first, while they hold nothing else (until 2026-11-28
    they stayed, empty)."""
    folder = Path(folder)
    new = _new_folders(folder)  # folder first, then its parents that do not exist yet
    try:
        yield folder
    except BaseException:
        for path in new:
            if not _remove_if_only_locks(path):
                break
        raise


@contextmanager
def removed_if_failed(folder: str | os.PathLike) -> Iterator[Path]:
    """For a block that fills a new (or empty) ``folder`` whole, such as a copied app: when the block fails (any
    exception, Ctrl-C included), remove what is in ``folder`` then, and the folder itself when it did not exist
    before the block, so that a rerun finds it as it was. A folder that held anything before the block is left
    alone, as is a symbolic link the user made (only its content goes)."""
    folder = Path(folder)
    new = not folder.exists() and not folder.is_symlink()
    empty = new or (folder.is_dir() and not any(folder.iterdir()))
    try:
        yield folder
    except BaseException:
        if empty and folder.is_dir():
            if new and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for path in folder.iterdir():
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        raise


# the name atomic_path gives a temporary file: "." + the target's name + "." + tempfile's 8 random
# characters + the suffix (".tmp", or the target's own suffix, which its name then ends with)
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}(?P<suffix>\..+)$")


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files of atomic writes (:func:`atomic_path`) under ``folder`` that a killed process
    left behind (a process that ends any other way removes its own). Only call it while no other process
    writes there (under :class:`dira3d.utils.folder_lock.FolderLock`): a write in progress looks the same.
    """
    found = []
    for path in Path(folder).rglob(".*"):
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and not path.is_symlink() and (
                match["suffix"] == ".tmp" or match["target"].endswith(match["suffix"])):
            found.append(path)
    return sorted(found)


_NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile.mkstemp's


def _create_temporary(path: Path, suffix: str, named: Callable[[str], Any]) -> tuple[int, str]:
    """``(fd, name)`` of a new hidden file next to ``path`` (the names of :data:`_TEMPORARY`, as ``tempfile.mkstemp``
    makes them: mode 0600, ``O_EXCL``); ``named(name)`` is called before each attempt to create it, so that an
    interrupt raised right after the file appears (before this returns) still knows what to remove."""
    for _ in range(tempfile.TMP_MAX):
        random = "".join(secrets.choice(_NAME_CHARACTERS) for _ in range(8))
        name = os.path.join(path.parent, f".{path.name}.{random}{suffix}")
        named(name)
        try:
            return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600), name
        except FileExistsError:  # another writer's: never to be removed here
            named("")
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name next to {path}")


def _hold(fd: int) -> bool:
    """Take an advisory ``flock`` on a temporary file being written; False where the system has no ``flock``."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):
        return False
    return True


def _held(path: Path) -> bool:
    """Whether a live process writes ``path`` (holds the ``flock`` of :func:`atomic_path`)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # gone, or not ours to read: left alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (the lock taken above goes with it)
    return False


def stale_temporaries_of(path: str | os.PathLike, suffix: str = ".tmp") -> list[Path]:
    """The temporary files that :func:`atomic_path` made for ``path`` (with ``suffix``) and a killed process left
    behind, next to it: ``.<name>.<8 characters><suffix>``, not held by a live writer (an export of the same file
    running now keeps its own). For a file in a folder other programs write too (``dira3d export --out``), where
    :func:`stale_temporaries` would take every dira3d temporary under the folder."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}.*")
                  if (found := _TEMPORARY.match(p.name)) and found["target"] == path.name and found["suffix"] == suffix
                  and p.is_file() and not p.is_symlink() and not _held(p))


def remove_stale_temporaries_of(path: str | os.PathLike, suffix: str = ".tmp", what: str = "run") -> list[Path]:
    """Remove :func:`stale_temporaries_of` ``path`` and say so on stderr (``what`` names the command's run);
    returns them."""
    import sys

    left = stale_temporaries_of(path, suffix)
    for stale in left:
        stale.unlink(missing_ok=True)
    if left:
        print(f"removed {len(left)} half-written temporary file(s) an interrupted {what} left beside {path} "
              f"({', '.join(p.name for p in left)})", file=sys.stderr)
    return left
