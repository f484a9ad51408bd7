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

__all__ = ["available_memory", "cached_items", "cache_bytes", "check_cache_memory", "checked_cache_data",
           "shared_cache"]

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
            if str(path) not in sizes:
                sizes[str(path)] = _volume_bytes(str(path))
            volumes += 1
            if sizes[str(path)] is None:
                unknown += 1
            else:
                total += sizes[str(path)]
    return total, volumes, unknown


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable`` of ``/proc/meminfo``, lowered to the room left
    under a cgroup v2 memory limit (a container, a SLURM job); None where neither can be read (not Linux)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


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
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun: every process caches every volume
    each = f", in each of the {local} processes on this node" if local > 1 else ""
    logger.info("caching %d volume(s) in memory before training: about %.2f GiB as float32%s%s (%s=%g; "
                "progress is not shown outside a terminal)", volumes, total / _GIB, note, each, setting, rate)
    need = total * local
    free = available_memory()
    if free is None or need <= fraction * free:
        return need
    fits = int(rate * fraction * free / need * 100) / 100  # rounded down to 0.01
    size = f"about {total / _GIB:.1f} GiB as float32" + (f"{each} ({need / _GIB:.1f} GiB in all)" if local > 1 else "")
    raise ValueError(
        f"{setting}={rate:g} caches {volumes} volume(s) in memory, {size}, but only {free / _GIB:.1f} GiB is "
        f"available: the run would be killed for memory while caching. Lower it (--override {setting}={fits:g} "
        f"caches the share that fits; {setting}=0 caches none and reads every volume from disk at each use, slower), "
        "prepare the volumes with a coarser --spacing, or free memory")


def checked_cache_data(train_datalist: Sequence[Mapping[str, Any]], val_datalist: Sequence[Mapping[str, Any]] = (),
                       rate: float = 1.0) -> Sequence[Mapping[str, Any]]:
    """``train_datalist``, after :func:`check_cache_memory`: the training ``CacheDataset``'s ``data`` in the
    pretraining bundle, so that the check runs where (and only where) volumes are cached, before the first load."""
    check_cache_memory(train_datalist, val_datalist, rate)
    return train_datalist
