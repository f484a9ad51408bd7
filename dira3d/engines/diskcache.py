"""The bundles' datasets: in memory (MONAI ``CacheDataset``, as before) or, with ``cache_dir`` set, on disk.

Every start of a bundle filled its ``CacheDataset`` again: about 17 minutes for 100 LiTS CTs, hours for CheXpert with
one worker, again after each crash and resume; and a cache larger than the memory (LiTS at native spacing, LUNA16)
was refused. With the bundle setting ``cache_dir`` the datasets are MONAI ``PersistentDataset`` s instead
(:class:`DiskCacheDataset`, made by :func:`cached_dataset`): the output of the deterministic preprocessing of an entry
(the transforms before the first random one, as ``CacheDataset`` caches it) is written to ``cache_dir`` at its first
use (during the first epoch; under ``torchrun`` each rank writes the entries its sampler hands it) and read back from
there by every later epoch and run. Nothing is kept in memory beyond what the operating system's page cache keeps, so
``cache_rate`` / ``num_samples_cache`` do not apply: every entry is on disk. (MONAI's ``CacheNTransDataset`` caches
a fixed number of transforms, not the deterministic prefix; ``LMDBDataset`` needs the ``lmdb`` package, fills the
whole database in the main process before training, and one database file shared by several ranks is written under
a lock. A ``CacheDataset`` over the files of a ``PersistentDataset`` would keep both the files and the memory.)

What ``PersistentDataset`` does not do, and :class:`DiskCacheDataset` adds:

- a file's name is the hash of the datalist entry (its paths) and of the transforms. A source file rewritten in
  place (``dira3d prepare`` again, another ``--spacing``) kept its name, and its stale preprocessed copy was used.
  :func:`source_hashing` adds the size and modification time (ns) of every file (and of the files of a DICOM folder)
  the entry names;
- its transform hash (``hash_transform``): MONAI's ``pickle_hashing`` fails on the classification bundles' prefix (a
  ``Lambdad`` of a config ``$lambda``), and ``json_hashing`` falls back to the transforms' class names, blind to
  ``roi_size``, ``spacing``, the intensity window. :func:`transform_hashing` hashes every transform's settings (a
  function by its code), the same in every process;
- the temporary file MONAI writes first goes to the system's temporary folder and is then moved into ``cache_dir``:
  across file systems that move is a copy, which another rank can read half-written and a killed run leaves
  truncated (every later run then fails loading it). :class:`DiskCacheDataset` writes it under
  ``cache_dir/.partial`` (same file system: an atomic rename);
- a truncated file (copied across file systems by a run that was killed) stopped every later run with PyTorch's
  ``PytorchStreamReader failed reading zip archive`` (or ``OSError: Invalid argument``), naming no file: it is
  named in a warning and written again (where it cannot be removed, a shared cache this user cannot write, the entry
  is preprocessed without the cache);
- ``set_data`` removes the whole ``cache_dir`` (``shutil.rmtree``). ``cache_dir`` is the user's folder: here it only
  replaces the entries (a stale file is never read, its key differs).

:func:`check_cache_disk` (run by ``checked_task_cache_data`` / ``checked_cache_data`` instead of the memory check when
``cache_dir`` is set) logs (rank 0 alone under ``torchrun``) where the cache is, how many entries are already there
(whole files: a truncated one counts as still to write) and their size, and refuses, before anything is written, a
cache larger than 90 % of the free space of ``cache_dir``'s file system, naming ``cache_dir``.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import types
import warnings
import weakref
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, PersistentDataset
from monai.data.utils import pickle_hashing

from dira3d.engines.cache import size_text
from dira3d.utils.threads import block_stop_signals_in_pool_thread
from dira3d.utils.warning_format import Dira3dWarning

__all__ = ["DiskCacheDataset", "SignalSafeCacheDataset", "cache_dir_of", "cached_dataset", "check_cache_disk",
           "disk_free", "source_hashing", "transform_hashing", "whole_file_size"]

logger = logging.getLogger(__name__)

_GIB = 2**30
PARTIAL = ".partial"  # cache_dir's folder of files being written


def cache_dir_of(setting: Any) -> Path | None:
    """The ``cache_dir`` setting as a path; None for the default (empty, null, False: the memory cache)."""
    if setting in (None, "", False) or str(setting).strip().lower() in ("", "none", "null", "false"):
        return None
    return Path(os.path.expanduser(str(setting)))


def _file_state(path: str) -> Any:
    """``[size, mtime_ns]`` of a file; of a folder (a DICOM series) the sorted names, sizes and times of its files;
    None when ``path`` names nothing (a value that is not a path)."""
    try:
        state = os.stat(path)
    except (OSError, ValueError):
        return None
    if not os.path.isdir(path):
        return [state.st_size, state.st_mtime_ns]
    found = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        with contextlib.suppress(OSError):
            if entry.is_file():
                inner = entry.stat()
                found.append([entry.name, inner.st_size, inner.st_mtime_ns])
    return found


def _paths_in(value: Any) -> Iterator[str]:
    if isinstance(value, (str, os.PathLike)):
        yield os.fspath(value)
    elif isinstance(value, (list, tuple)):
        for inner in value:
            yield from _paths_in(inner)


def source_hashing(item: Any) -> bytes:
    """The key of a datalist entry: MONAI's ``pickle_hashing`` of the entry and of the size and modification time of
    every file it names (a string value that is an existing file or folder), so that a rewritten source is a new
    key. (A file rewritten with the same size and the same modification time to the nanosecond keeps its key.)"""
    values = item.values() if isinstance(item, Mapping) else [item]
    states = {path: _file_state(path) for value in values for path in _paths_in(value)}
    return pickle_hashing({"entry": item, "files": {k: v for k, v in states.items() if v is not None}})


def _describe(value: Any, seen: set[int], depth: int = 0) -> Any:
    """A JSON-able description of ``value`` that is the same in every process (no ids, no set order)."""
    import numpy as np
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(bytes(value)).hexdigest()
    if isinstance(value, (torch.dtype, torch.device, np.dtype, type)):
        return repr(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return {"array": str(array.dtype), "shape": list(array.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()}
    if isinstance(value, types.CodeType):
        return {"code": hashlib.sha256(value.co_code).hexdigest(), "names": list(value.co_names),
                "consts": _describe(value.co_consts, seen, depth + 1)}
    if isinstance(value, types.FunctionType):
        return {"function": f"{value.__module__}.{value.__qualname__}", "code": _describe(value.__code__, seen, depth),
                "defaults": _describe(value.__defaults__, seen, depth + 1)}
    if isinstance(value, functools.partial):
        return {"partial": _describe(value.func, seen, depth + 1), "args": _describe(value.args, seen, depth + 1),
                "keywords": _describe(value.keywords, seen, depth + 1)}
    if isinstance(value, (types.BuiltinFunctionType, types.MethodType, logging.Logger)) or depth > 12:
        return f"{type(value).__module__}.{type(value).__qualname__}:{getattr(value, '__qualname__', '')}"
    if isinstance(value, (list, tuple)):
        return [_describe(v, seen, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(json.dumps(_describe(v, seen, depth + 1), sort_keys=True) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _describe(v, seen, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    state = _attributes(value)
    if state is None or id(value) in seen:
        return name
    seen.add(id(value))
    return {"class": name, "state": _describe(state, seen, depth + 1)}


def _attributes(value: Any) -> dict | None:
    """``value``'s attributes: its ``__dict__`` and the values of the ``__slots__`` of its classes (a setting held in a
    slot changes the hash too); None for an object with neither."""
    state = getattr(value, "__dict__", None)
    slots = {}
    for klass in type(value).__mro__:
        names = getattr(klass, "__slots__", ())
        for slot in (names,) if isinstance(names, str) else names:
            if slot not in ("__dict__", "__weakref__") and slot not in slots and hasattr(value, slot):
                slots[slot] = getattr(value, slot)
    if state is None and not slots:
        return None
    return {**slots, **(state or {})}


_HASHED: dict[tuple, tuple[Any, bytes]] = {}  # (a list or tuple?, ids of transforms...) -> (held transforms or None, hash)


def transform_hashing(transforms: Any) -> bytes:
    """``hash_transform`` for ``PersistentDataset``: sha256 of every setting of the transforms (their attributes,
    recursively; a function by its code and defaults), as hex bytes. A changed ``roi_size``, ``spacing``, intensity
    window or resize mode is another hash, the same settings the same hash in every process.

    Transforms keep state of their use among their attributes (a reader its last file names, a thread-local flag),
    so the hash is taken once per transform instance, when first asked (before any use in the bundles: the disk check
    asks first), and that value is given for the same instances while they live. The memo does not keep them alive
    (a notebook or an experiment grid builds many bundles): it is keyed by their ids, and each instance's finaliser
    drops the entry when it is collected, before its id can be reused. Only a transform that takes no weak reference
    is held by the memo (as every transform was before)."""
    several = isinstance(transforms, (list, tuple))
    group = list(transforms) if several else [transforms]
    key = (several, *(id(t) for t in group))  # [A] and A are described differently: not one memo entry
    if key not in _HASHED:
        text = json.dumps(_describe(transforms, set()), sort_keys=True)
        held = []
        for transform in group:
            try:
                weakref.finalize(transform, _HASHED.pop, key, None).atexit = False
            except TypeError:  # no weak reference to it (a tuple, an int): held, so its id is never reused
                held.append(transform)
        _HASHED[key] = (held or None, hashlib.sha256(text.encode("utf-8")).hexdigest().encode("utf-8"))
    return _HASHED[key][1]


@contextlib.contextmanager
def _temporary_files_in(folder: Path) -> Iterator[None]:
    """Python's temporary folder set to ``folder`` while the block runs (MONAI's ``_cachecheck`` writes the file to
    ``tempfile.TemporaryDirectory()``, then moves it). Process-wide: the bundles read their entries from one thread
    per process (DataLoader workers are processes). A ``cache_dir`` that cannot be written (a shared, read-only
    cache) leaves it as it is: MONAI then returns the entry without writing it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield
        return
    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = before


def _cache_file(folder: Path, item: Any, transform_hash: str) -> Path:
    return folder / f"{source_hashing(item).decode('utf-8')}{transform_hash}.pt"


class DiskCacheDataset(PersistentDataset):
    """MONAI ``PersistentDataset`` keyed by the entry's files and the transforms' settings (:func:`source_hashing`,
    :func:`transform_hashing`), writing its temporary files on ``cache_dir``'s file system, and never removing
    ``cache_dir`` (see the module's docstring). Files are loaded with ``weights_only=True`` (MONAI's default)."""

    def __init__(self, data: Sequence, transform: Callable, cache_dir: str | os.PathLike) -> None:
        super().__init__(data=data, transform=transform, cache_dir=Path(cache_dir), hash_func=source_hashing,
                         hash_transform=transform_hashing, weights_only=True)

    def cache_file(self, item: Any) -> Path:
        """The file that holds (or will hold) ``item``'s preprocessed copy (MONAI's name: key + transform hash)."""
        return _cache_file(self.cache_dir, item, self.transform_hash)

    def _cachecheck(self, item_transformed: Any) -> Any:
        path = self.cache_file(item_transformed)
        if path.is_file():  # MONAI recomputes a file it cannot unpickle, but stops at a truncated one (no name)
            try:
                return torch.load(path, weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable copy of ours is written again
                try:
                    path.unlink(missing_ok=True)
                    kept = None
                except OSError as why:  # a shared cache this user cannot write: MONAI would load it again and stop
                    kept = why
                warnings.warn(f"cache_dir: {path} is truncated or unreadable ({type(err).__name__}: "
                              f"{str(err)[:80]}), e.g. copied by a run that was killed; "
                              + ("it is preprocessed and written again" if kept is None else
                                 f"it cannot be removed ({type(kept).__name__}), so the entry is preprocessed without "
                                 "the cache at each use: remove the file (or ask whoever owns cache_dir to)"),
                              Dira3dWarning, stacklevel=2)
                if kept is not None:
                    return self._pre_transform(copy.deepcopy(item_transformed))
        with _temporary_files_in(self.cache_dir / PARTIAL):
            return super()._cachecheck(item_transformed)

    def _pre_transform(self, item_transformed: Any) -> Any:
        """MONAI's, with each tensor copied out of a larger one it is a view of (:func:`compact`): ``torch.save``
        writes a view's whole storage, so the tiny LUNA16 preset's 16 x 16 x 8 centre crops of 64 x 64 x 32 cubes took
        512 KiB a file instead of 8 KiB (64 times the size the free-space check had estimated)."""
        return compact(super()._pre_transform(item_transformed))

    def set_data(self, data: Sequence) -> None:
        """Replace the entries; the files in ``cache_dir`` are left (MONAI's removes the folder)."""
        self.data = data


def compact(value: Any) -> Any:
    """``value`` with every tensor in it (in mappings, lists, tuples) that is a view of a larger storage (a crop)
    replaced by a copy of its own elements; anything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.untyped_storage().nbytes() > value.numel() * value.element_size():
            return value.clone(memory_format=torch.contiguous_format)
        return value
    if type(value) is dict:
        return {k: compact(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(compact(v) for v in value)
    return value


class SignalSafeCacheDataset(CacheDataset):
    """MONAI's ``CacheDataset`` whose thread pool's workers block SIGTERM and SIGINT, so that the kernel delivers them
    to the main thread: a signal taken by a worker was handled only once the pool's next item was loaded (seconds to
    minutes for a big CT; :func:`dira3d.utils.threads.block_stop_signals_in_pool_thread`). Nothing else differs."""

    def _load_cache_item(self, idx: int) -> Any:  # MONAI's ThreadPool calls it in each worker thread
        block_stop_signals_in_pool_thread()
        return super()._load_cache_item(idx)


def cached_dataset(data: Sequence, transform: Callable, cache_rate: float = 1.0, cache_dir: Any = None,
                   **memory: Any) -> CacheDataset | DiskCacheDataset:
    """The bundles' dataset: with ``cache_dir`` empty (the default) MONAI's ``CacheDataset(data, transform,
    cache_rate, **memory)`` as before (a :class:`SignalSafeCacheDataset`: its loading threads leave SIGTERM / SIGINT to
    the main thread); with ``cache_dir`` a :class:`DiskCacheDataset` of every entry in that folder (``cache_rate`` and
    the ``CacheDataset`` arguments in ``memory`` do not apply)."""
    folder = cache_dir_of(cache_dir)
    if folder is None:
        return SignalSafeCacheDataset(data=data, transform=transform, cache_rate=cache_rate, **memory)
    return DiskCacheDataset(data, transform, folder)


def disk_free(folder: Path) -> int:
    """Free bytes on the file system of ``folder`` (of its nearest existing parent while it does not exist)."""
    probe = folder.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


_END_RECORD = b"PK\x05\x06"  # a zip archive's end record; torch.save's ends the file (22 bytes, no comment)


def whole_file_size(path: Path) -> int | None:
    """The size of the cache file ``path`` when it looks whole, else None (none there, or truncated: a copy across
    file systems cut by a killed run). Cheap enough for every entry at start-up: ``torch.save`` writes a zip archive
    whose end record is the file's last 22 bytes, and a truncated file has none there. The 4 bytes of its signature
    are read (about twice a ``stat``); a file without them there is asked of ``zipfile.is_zipfile`` (an archive
    comment after the record). Damage inside a file is found when it is read (:class:`DiskCacheDataset` writes it
    again)."""
    try:
        with open(path, "rb", buffering=0) as handle:
            state = os.fstat(handle.fileno())
            if not stat.S_ISREG(state.st_mode) or state.st_size < len(_END_RECORD):
                return None
            handle.seek(max(0, state.st_size - 22))
            if handle.read(len(_END_RECORD)) == _END_RECORD:
                return state.st_size
            return state.st_size if zipfile.is_zipfile(handle) else None
    except OSError:  # none there, a folder, unreadable: counted as to write (an unreadable one is named when read)
        return None


def _rank() -> int:
    """This process's rank: the process group's, else ``torchrun``'s ``RANK`` (the check may run before the group is
    formed), else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def check_cache_disk(caches: Sequence[tuple[Sequence[Any], Callable]], cache_dir: Any,
                     estimate: Callable[[list[tuple[list[Any], Callable]]], int], fraction: float = 0.9) -> int:
    """Log where the datasets of ``caches`` (``(datalist, transform)``) are kept on disk, how many of their entries
    are there already (and their size), and how much the others will add (``estimate`` of the missing entries, in
    bytes); raise ``ValueError`` naming ``cache_dir`` when that exceeds ``fraction`` of the free space there. A file
    there that is truncated (:func:`whole_file_size`) counts as still to write, and the log says how many. Under
    ``torchrun`` the ranks share the files (one copy per entry): rank 0 alone logs, every rank refuses. Returns the
    bytes still to be written."""
    folder = cache_dir_of(cache_dir)
    if folder is None:
        return 0
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cache_dir={folder} is not a folder; set cache_dir to a folder for the preprocessed "
                         "entries (created if missing), or to '' to cache in memory")
    missing, there, held, damaged, seen = [], 0, 0, 0, set()
    for datalist, transform in caches:
        if not datalist:
            continue
        # the transforms' hash, before any use (transform_hashing); the folder is not created here
        unused = PersistentDataset([], transform, cache_dir=None, hash_transform=transform_hashing)
        transform_hash = unused.transform_hash
        todo = []
        for item in datalist:
            path = _cache_file(folder, item, transform_hash)
            if path in seen:  # listed twice (validation on the training list): one file
                continue
            seen.add(path)
            size = whole_file_size(path)
            if size is not None:
                there, held = there + 1, held + size
            else:
                damaged += path.is_file()
                todo.append(item)
        if todo:
            missing.append((todo, transform))
    need = estimate(missing) if missing else 0
    free = disk_free(folder)
    count = sum(len(todo) for todo, _ in missing)
    if _rank() == 0:  # the ranks of a torchrun share cache_dir: one line (the refusal below stops every rank)
        logger.info("caching on disk in %s (cache_dir): %d entr%s already there (%s), %d to write at their first use "
                    "(about %s); %s free there%s", folder, there, "y" if there == 1 else "ies", size_text(held), count,
                    size_text(need), size_text(free),
                    f"; {damaged} of the files there truncated or damaged (written again at their first use)"
                    if damaged else "")
    if need > fraction * free:
        raise ValueError(
            f"cache_dir={folder}: the {count} entr{'y' if count == 1 else 'ies'} still to cache there take about "
            f"{need / _GIB:.1f} GiB after preprocessing, but only {free / _GIB:.1f} GiB is free on its file system; "
            "set cache_dir to a folder on a larger disk, free space there, or set cache_dir to '' to cache in memory "
            "(cache_rate / num_samples_cache)")
    return need
