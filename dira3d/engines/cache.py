"""The volumes a pretraining bundle caches in memory: how much, whether it fits, and one copy of each.

The pretraining bundle caches its volumes (MONAI ``CacheDataset``, ``num_samples_cache`` of them, float32 after
loading) before the first iteration. With full-size CTs that is the largest memory of the whole pipeline (a
512x512x300 CT resampled to 1x1x2 mm is 39 MiB; at 1 mm isotropic about 80 MiB), and it grows with the number of
volumes. Two faults were found on such data (docs/reliability.md, "Memory and time with full-size CTs"):

- the validation of ``dis_mode`` ``visual_words`` on volumes (every volume its own class) validates on the
  *training* list, and its ``CacheDataset`` cached every training volume a second time: memory twice the
  training set. :func:`shared_cache` hands it the training dataset's cache instead;
- nothing said how much would be cached, nor that it would not fit: the run was killed by the kernel (OOM) after
  minutes of silent loading. :func:`check_cache_memory` logs the estimate from the file headers and refuses a cache
  larger than the memory available, naming ``num_samples_cache``; the bundle calls it through
  :func:`checked_cache_data` (the training ``CacheDataset``'s ``data``), before the first volume is loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["available_memory", "size_text", "cached_items", "cache_bytes", "check_cache_memory", "check_task_cache_memory",
           "checked_cache_data", "checked_task_cache_data", "item_bytes", "prefix_item_bytes", "shared_cache",
           "task_cache_bytes"]

logger = logging.getLogger(__name__)

_GIB = 2**30
_FLOAT32 = 4


def cached_items(datalist: Sequence[Any], rate: float) -> list[Any]:
    """The entries a ``CacheDataset(data=datalist, cache_rate=rate)`` caches: the first ``int(len * rate)``."""
    return list(datalist[: min(int(len(datalist) * float(rate)), len(datalist))])


def shared_cache(train_dataset: Any, datalist: Sequence[Any]) -> list | bool:
    """``runtime_cache`` for a second ``CacheDataset`` of ``datalist``: the training dataset's cache (one copy of
    every volume) when ``datalist`` lists exactly its entries, else False (the dataset caches its own).

    ``train_dataset`` is a filled MONAI ``CacheDataset``; its cache list (``_cache``, MONAI's attribute, pinned by
    ``tests/test_engines_cache.py``) is passed as a user-provided container, which MONAI reads as it is.
    """
    cache = getattr(train_dataset, "_cache", None)
    data = getattr(train_dataset, "data", None)
    if isinstance(cache, list) and data is not None and list(data) == list(datalist):
        return cache
    return False


def _volume_bytes(path: str) -> int | None:
    """float32 bytes of the image at ``path`` from its header (voxels x channels), None when unreadable."""
    try:
        if str(path).lower().endswith((".nii", ".nii.gz")):  # nibabel reads the header alone
            import nibabel as nib

            voxels = 1
            for n in nib.load(str(path)).header.get_data_shape():
                voxels *= int(n)
            return voxels * _FLOAT32
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        voxels = 1
        for n in reader.GetSize():
            voxels *= int(n)
        return voxels * int(reader.GetNumberOfComponents()) * _FLOAT32
    except Exception:  # noqa: BLE001 - a folder (DICOM series) or unreadable file: the loader reports it
        return None


def cache_bytes(datalists: Sequence[Sequence[Mapping[str, Any]]], rate: float,
                key: str = "image") -> tuple[int, int, int]:
    """``(bytes, volumes, unknown)``: float32 bytes of the entries the lists' caches hold, how many, and how many had no
    readable header (not counted in the bytes). Every entry is a copy of its own (``CacheDataset`` caches a file listed
    twice twice); a list equal to an earlier one counts once, as it reads that one's cache (:func:`shared_cache`)."""
    counted: list[list[Any]] = []
    sizes: dict[str, int | None] = {}  # header reads, once per file
    total = volumes = unknown = 0
    for datalist in datalists:
        items = cached_items(datalist, rate)
        if not items or any(items == earlier for earlier in counted):
            continue
        counted.append(items)
        for item in items:
            path = item.get(key) if isinstance(item, Mapping) else None
            if not isinstance(path, (str, os.PathLike)):
                continue
            volumes += 1
            size = _entry_header_bytes(item, (key,), sizes)
            if size is None:
                unknown += 1
            else:
                total += size
    return total, volumes, unknown


def size_text(count: int) -> str:
    """Bytes as a log shows them: ``3.00 GiB`` from 1 GiB, ``12.5 MiB`` below (a small cache read ``0.00 GiB``)."""
    return f"{count / _GIB:.2f} GiB" if count >= _GIB else f"{count / 2**20:.1f} MiB"


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable`` of ``/proc/meminfo``, lowered to the room left
    under every cgroup memory limit above this process (a container, a SLURM job or step, a systemd slice; cgroup
    v2 ``memory.max`` or v1 ``memory.limit_in_bytes``); None where neither can be read (not Linux)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, used_file in _cgroup_memory_files():
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < _NO_V1_LIMIT:
                used = int(Path(used_file).read_text().strip()) - _inactive_file_cache(used_file)
                found.append(max(0, int(limit) - used))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def _inactive_file_cache(used_file: str) -> int:
    """Bytes of the cgroup's usage that are inactive file cache (``memory.stat`` beside ``used_file``): the kernel
    reclaims them before it kills, so they are room (the "working set" Kubernetes and cAdvisor use). After reading a
    dataset a job's usage is mostly such cache; counting it as used refused caches that fit. 0 if unreadable."""
    try:
        text = Path(used_file.rsplit("/", 1)[0] + "/memory.stat").read_text()
    except OSError:
        return 0
    stats = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    for key in ("total_inactive_file", "inactive_file"):  # v1: the hierarchy's, as its usage; v2
        if key in stats:
            try:
                return int(stats[key])
            except ValueError:
                return 0
    return 0


_NO_V1_LIMIT = 2**62  # cgroup v1 writes "no limit" as a number near 2**63


def _cgroup_memory_files() -> list[tuple[str, str]]:
    """``(limit, usage)`` files of the memory cgroup of this process and of each cgroup above it, from
    ``/proc/self/cgroup``: a SLURM step's limit is in its own cgroup (``/sys/fs/cgroup/system.slice/.../step_0``),
    not at the root, which is all a container sees. Without ``/proc/self/cgroup``: the root's cgroup v2 files."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = ["0::/"]
    files = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, limit, used = "/sys/fs/cgroup", "memory.max", "memory.current"  # v2
        elif "memory" in parts[1].split(","):
            base, limit, used = "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"  # v1
        else:
            continue
        level = parts[2].rstrip("/")
        while True:
            files.append((f"{base}{level}/{limit}", f"{base}{level}/{used}"))
            if not level:
                break
            level = level.rsplit("/", 1)[0]
    return list(dict.fromkeys(files))


def check_cache_memory(train_datalist: Sequence[Mapping[str, Any]], val_datalist: Sequence[Mapping[str, Any]] = (),
                       rate: float = 1.0, setting: str = "num_samples_cache", fraction: float = 0.9) -> int:
    """Log what the bundle is about to cache and refuse a cache that would not fit in memory.

    Under ``torchrun`` every process of a node caches every volume (``multi_gpu_train.json``: the sampler splits the
    iterations, not the cache), so the estimate is multiplied by ``LOCAL_WORLD_SIZE``.

    Returns the estimated bytes (for the node). Raises ``ValueError`` (printed as one ``error:`` line by
    ``dira3d pretrain``) when the estimate exceeds ``fraction`` of :func:`available_memory`, naming ``setting`` and the
    value that would fit.
    """
    rate = float(rate)
    total, volumes, unknown = cache_bytes([train_datalist, val_datalist], rate)
    if volumes == 0:
        return 0
    note = f" ({unknown} without a readable header not counted)" if unknown else ""
    local = _local_processes()
    each = f", in each of the {local} processes on this node" if local > 1 else ""
    logger.info("caching %d volume(s) in memory before training: about %s as float32%s%s (%s=%g; "
                "progress is not shown outside a terminal)", volumes, size_text(total), note, each, setting, rate)
    return _refuse_unless_it_fits(total, f"{volumes} volume(s) in memory", "as float32", setting, rate, fraction,
                                  "prepare the volumes with a coarser --spacing, free memory, or keep them on disk "
                                  "instead (--override cache_dir=FOLDER: read back at every restart)")


def _local_processes() -> int:
    """Processes of this node that each hold a whole cache: ``LOCAL_WORLD_SIZE`` under ``torchrun`` (the
    ``DistributedSampler`` of ``multi_gpu_train.json`` splits the iterations, not the cache), else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def _refuse_unless_it_fits(total: int, what: str, how: str, setting: str, rate: float, fraction: float,
                           advice: str, override: str = "--override {setting}={value}", unit: str = "volume") -> int:
    """``total`` bytes for one process, times the processes of the node; raises the ``ValueError`` naming
    ``setting`` and the share that fits (as ``override`` spells it) when that exceeds ``fraction`` of
    :func:`available_memory`."""
    local = _local_processes()
    each = f", in each of the {local} processes on this node" if local > 1 else ""
    need = total * local
    free = available_memory()
    if free is None or need <= fraction * free:
        return need
    fits = f"{int(rate * fraction * free / need * 100) / 100:g}"  # rounded down to 0.01
    size = f"about {total / _GIB:.1f} GiB {how}" + (f"{each} ({need / _GIB:.1f} GiB in all)" if local > 1 else "")
    raise ValueError(
        f"{setting}={rate:g} caches {what}, {size}, but only {free / _GIB:.1f} GiB is "
        f"available: the run would be killed for memory while caching. Lower it "
        f"({override.format(setting=setting, value=fits)} caches the share that fits; {setting}=0 caches none and "
        f"reads every {unit} from disk at each use, slower), {advice}")


def checked_cache_data(train_datalist: Sequence[Mapping[str, Any]], val_datalist: Sequence[Mapping[str, Any]] = (),
                       rate: float = 1.0, cache_dir: Any = None, transform: Any = None) -> Sequence[Mapping[str, Any]]:
    """``train_datalist``, after :func:`check_cache_memory`: the training ``CacheDataset``'s ``data`` in the
    pretraining bundle, so that the check runs where (and only where) volumes are cached, before the first load.
    With ``cache_dir`` set (the datasets on disk, :func:`dira3d.engines.diskcache.cached_dataset`) nothing is cached
    in memory: :func:`dira3d.engines.diskcache.check_cache_disk` checks the free space there instead (float32 volumes
    from their headers; ``transform`` is the preprocessing, which names the files)."""
    from dira3d.engines.diskcache import cache_dir_of, check_cache_disk

    if cache_dir_of(cache_dir) is None:
        check_cache_memory(train_datalist, val_datalist, rate)
    else:
        check_cache_disk([(train_datalist, transform), (val_datalist, transform)], cache_dir,
                         lambda missing: cache_bytes([items for items, _ in missing], 1.0)[0])
    return train_datalist


# The task (fine-tuning) bundles cache the output of their deterministic preprocessing, not the file: a 512 x 512
# chest X-ray PNG resized to 224 x 224 float32 is 196 KiB whatever the file's header says, a LUNA16 cube is the
# cube. Their estimate runs the bundle's own deterministic prefix on the first entry of each list (a one-entry MONAI
# CacheDataset, which splits the transform where the bundle's own does), times the entries that list caches; when
# its last entry caches another size (LiTS CTs kept at native size: 74 to 987 slices), by the entries' headers.


def item_bytes(item: Any) -> int:
    """Bytes the arrays of a cached item hold: every tensor's storage and every NumPy array, each once."""
    import numpy as np
    import torch

    seen: set[int] = set()

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return int(storage.nbytes())
        if isinstance(value, np.ndarray):
            return int(value.nbytes)
        if isinstance(value, Mapping):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return walk(item)


def prefix_item_bytes(entry: Mapping[str, Any], transform: Any) -> int | None:
    """Bytes of ``entry`` as a ``CacheDataset`` with ``transform`` caches it (the transforms up to the first random
    one, MONAI's split); None when that fails (the entry is then estimated from its headers, and the bundle's own
    ``CacheDataset`` reports the fault when it loads it)."""
    from dira3d.engines.diskcache import SignalSafeCacheDataset  # (it imports this module) its thread: no signals

    try:
        one = SignalSafeCacheDataset([entry], transform=transform, cache_rate=1.0, num_workers=1, progress=False,
                                     copy_cache=False)
        return item_bytes(one._cache[0])  # MONAI's cache list, pinned by tests/test_engines_cache.py
    except Exception as err:  # noqa: BLE001 - any fault of the entry is reported by the bundle's dataset
        logger.debug("the cache estimate could not preprocess %s (%s); using its headers", entry, err)
        return None


def _entry_header_bytes(entry: Any, keys: Sequence[str], sizes: dict[str, int | None]) -> int | None:
    """float32 bytes of the files of ``entry`` under ``keys`` from their headers; None when one is unreadable."""
    total = 0
    for key in keys:
        path = entry.get(key) if isinstance(entry, Mapping) else None
        if not isinstance(path, (str, os.PathLike)):
            continue
        if str(path) not in sizes:
            sizes[str(path)] = _volume_bytes(str(path))
        if sizes[str(path)] is None:
            return None
        total += sizes[str(path)]
    return total


def _list_bytes(cached: Sequence[Any], transform: Any, keys: Sequence[str]) -> int | None:
    """Bytes of one list's cache: its first entry through the prefix, times the entries, when its last entry caches
    as many bytes (a resize, a crop, cubes of one size); when they differ (volumes of their own size, kept so by the
    prefix) each entry is scaled by its headers along the line through those two. None when the first fails."""
    first = prefix_item_bytes(cached[0], transform)
    if first is None or len(cached) == 1:
        return first
    last = prefix_item_bytes(cached[-1], transform)
    if last is None or last == first:
        return first * len(cached)
    sizes: dict[str, int | None] = {}
    h_first, h_last = _entry_header_bytes(cached[0], keys, sizes), _entry_header_bytes(cached[-1], keys, sizes)
    if not h_first or not h_last or h_first == h_last:
        return (first + last) * len(cached) // 2
    slope = (last - first) / (h_last - h_first)
    total = 0.0
    for entry in cached:
        header = _entry_header_bytes(entry, keys, sizes)
        total += (first + last) / 2 if header is None else max(0.0, first + slope * (header - h_first))
    return int(total)


def task_cache_bytes(caches: Sequence[tuple[Sequence[Mapping[str, Any]], Any]], rate: float,
                     keys: Sequence[str] = ("image", "label")) -> tuple[int, int, int]:
    """``(bytes, items, from_headers)`` of the caches ``(datalist, transform)`` of a task bundle at ``cache_rate``
    ``rate``: the first (and last) cached entry of each list through its deterministic prefix
    (:func:`prefix_item_bytes`), extended to the entries that list caches (:func:`_list_bytes`); a list whose first
    entry fails is estimated from the headers of ``keys`` (float32), and its entries are counted in
    ``from_headers``."""
    total = items = from_headers = 0
    for datalist, transform in caches:
        cached = cached_items(datalist, rate)
        if not cached:
            continue
        items += len(cached)
        measured = _list_bytes(cached, transform, keys)
        if measured is not None:
            total += measured
            continue
        from_headers += len(cached)
        total += sum(cache_bytes([cached], 1.0, key)[0] for key in keys)
    return total, items, from_headers


def check_task_cache_memory(caches: Sequence[tuple[Sequence[Mapping[str, Any]], Any]], rate: float = 1.0,
                            setting: str = "cache_rate", fraction: float = 0.9,
                            stage: str = "training (training and validation)") -> int:
    """Log what a task bundle's ``CacheDataset``s (training and validation: different entries) will cache before
    ``stage``, and refuse a cache larger than ``fraction`` of :func:`available_memory` naming ``setting`` and the
    share that fits, as :func:`check_cache_memory` does for pretraining (under ``torchrun`` times
    ``LOCAL_WORLD_SIZE``). Returns the estimated bytes for the node."""
    rate = float(rate)
    total, items, from_headers = task_cache_bytes(caches, rate)
    if items == 0:
        return 0
    note = f"; {from_headers} from the file headers as float32" if from_headers else ""
    local = _local_processes()
    each = f", in each of the {local} processes on this node" if local > 1 else ""
    logger.info("caching %d item(s) in memory before %s: about %s%s (the first and last entry of each list "
                "after the deterministic preprocessing, for all its entries%s; %s=%g; progress is not shown outside "
                "a terminal)", items, stage, size_text(total), each, note, setting, rate)
    return _refuse_unless_it_fits(total, f"{items} item(s) in memory before {stage}", "after preprocessing",
                                  setting, rate, fraction,
                                  "free memory, or keep them on disk instead (cache_dir=FOLDER: read back at every "
                                  "restart; dira3d finetune --set cache_dir=FOLDER)",
                                  "{setting}={value} (dira3d finetune --set {setting}={value}; --{setting} {value} "
                                  "on a monai.bundle command line)", unit="item")


def checked_task_cache_data(train_datalist: Sequence[Mapping[str, Any]], train_transform: Any,
                            val_datalist: Sequence[Mapping[str, Any]] = (), val_transform: Any = None,
                            rate: float = 1.0, stage: str = "training (training and validation)",
                            cache_dir: Any = None) -> Sequence[Mapping[str, Any]]:
    """``train_datalist``, after :func:`check_task_cache_memory` of the training and validation caches: the training
    ``CacheDataset``'s ``data`` in the task bundles' ``train.json``, so the check runs before the first entry is cached
    (``stage`` names the caching in the log and the refusal). Their ``evaluate.json`` caches no test entry
    (``cache_rate`` 0: one pass over them gains nothing from a cache). With ``cache_dir`` set (the datasets on disk,
    :func:`dira3d.engines.diskcache.cached_dataset`) the free space there is checked instead of the memory
    (:func:`dira3d.engines.diskcache.check_cache_disk`, the entries not yet on disk measured as above)."""
    from dira3d.engines.diskcache import cache_dir_of, check_cache_disk

    caches = [(train_datalist, train_transform), (val_datalist, val_transform)]
    if cache_dir_of(cache_dir) is None:
        check_task_cache_memory(caches, rate, stage=stage)
    else:
        check_cache_disk(caches, cache_dir, lambda missing: task_cache_bytes(missing, 1.0)[0])
    return train_datalist
