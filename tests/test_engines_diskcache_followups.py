"""Follow-ups of the disk cache (dira3d.engines.diskcache, ``cache_dir``): an honest start-up count, a transform-hash
memo that does not keep the transforms alive, one start-up line per torchrun job, and two processes writing the same
missing entry at once.

Only the module's public names are used.
"""

from __future__ import annotations

import functools
import gc
import logging
import multiprocessing
import sys
import weakref
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from monai.data import PersistentDataset
from monai.transforms import Compose, Lambdad

import dira3d.engines.diskcache as diskcache
from dira3d.engines.diskcache import DiskCacheDataset, check_cache_disk, transform_hashing, whole_file_size

GIB = 2**30
LOGGER = "dira3d.engines.diskcache"


def _filled(folder: Path, count: int = 3) -> tuple[list[dict], DiskCacheDataset]:
    items = [{"x": np.arange(200.0) + i} for i in range(count)]
    dataset = DiskCacheDataset(items, Compose([]), folder)
    for i in range(count):
        dataset[i]
    return items, dataset


def _check(folder: Path, items: list[dict], monkeypatch, asked: list | None = None) -> int:
    monkeypatch.setattr(diskcache, "disk_free", lambda where: 10 * GIB)
    record = asked if asked is not None else []
    return check_cache_disk([(items, Compose([]))], str(folder),
                            lambda missing: record.append([i for todo, _ in missing for i in todo]) or 1000)


# --- 1. a truncated file is not "already there" -------------------------------------------------------------------

def test_a_truncated_file_counts_as_still_to_write(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "cache"
    items, dataset = _filled(folder)
    cut = dataset.cache_file(items[1])
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) - 30])  # what a killed copy across file systems leaves
    held = sum(dataset.cache_file(items[i]).stat().st_size for i in (0, 2))
    asked: list = []
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert _check(folder, items, monkeypatch, asked) == 1000
    assert f"2 entries already there ({held / 2**20:.1f} MiB), 1 to write at their first use" in caplog.text
    assert "; 1 of the files there truncated or damaged (written again at their first use)" in caplog.text
    assert len(asked) == 1 and len(asked[0]) == 1 and np.array_equal(asked[0][0]["x"], items[1]["x"])


def test_the_start_up_count_reads_no_file_whole(tmp_path, monkeypatch, caplog):
    """The check looks at each file's end record (zipfile), it does not load the files (223k CheXpert entries)."""
    folder = tmp_path / "cache"
    items, _ = _filled(folder)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load at start-up")

    monkeypatch.setattr(torch, "load", refuse)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert _check(folder, items, monkeypatch) == 0
    assert "3 entries already there" in caplog.text and "damaged" not in caplog.text


def test_whole_file_size(tmp_path):
    folder = tmp_path / "cache"
    items, dataset = _filled(folder, 1)
    path = dataset.cache_file(items[0])
    whole = path.read_bytes()
    assert whole_file_size(path) == len(whole)
    for cut in (1, 22, len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[: len(whole) - cut])
        assert whole_file_size(path) is None, cut
    for cut in range(1, 120):  # every cut through the end records (zip64 record, locator, end record)
        path.write_bytes(whole[: len(whole) - cut])
        assert whole_file_size(path) is None, cut
    path.write_bytes(b"")
    assert whole_file_size(path) is None
    with zipfile.ZipFile(path, "w") as archive:  # an archive with a comment after its end record: whole
        archive.writestr("data.pkl", b"x")
        archive.comment = b"a comment"
    assert whole_file_size(path) == path.stat().st_size
    assert whole_file_size(tmp_path / "none.pt") is None
    assert whole_file_size(folder) is None  # a folder


# --- 2. the transform-hash memo does not keep transforms alive -------------------------------------------------------

class _Holder:
    def __init__(self, value) -> None:
        self.value = value

    def __call__(self, data):
        return data


def test_a_hashed_transform_is_collected_after_use_and_memoised_while_alive():
    holder = _Holder([1])
    alive = weakref.ref(holder)
    before = transform_hashing([holder])
    holder.value.append(2)  # used: its state changed, its hash did not (memoised)
    assert transform_hashing([holder]) == before
    assert transform_hashing((holder,)) == before
    del holder
    gc.collect()
    assert alive() is None


def test_a_bundle_like_compose_in_a_cycle_is_collected():
    """As the bundles hash their prefix (MONAI's PersistentDataset asks for its Compose's transforms): the dataset,
    its Compose and transforms (here in a reference cycle, freed by the collector) are not kept by the memo."""
    lam = Lambdad("x", func=lambda v: v * 2)
    lam.cycle = lam
    compose = Compose([lam])
    dataset = PersistentDataset([], compose, cache_dir=None, hash_transform=transform_hashing)
    digest = dataset.transform_hash
    assert PersistentDataset([], compose, cache_dir=None, hash_transform=transform_hashing).transform_hash == digest
    refs = [weakref.ref(lam), weakref.ref(compose)]
    del lam, compose, dataset
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_a_transform_without_weak_references_is_still_memoised():
    class Slotted:
        __slots__ = ("__dict__",)  # settings in __dict__, no __weakref__ slot

        def __init__(self, value) -> None:
            self.value = value

    slotted = Slotted(3)
    with pytest.raises(TypeError):
        weakref.ref(slotted)  # the premise
    assert transform_hashing([slotted]) == transform_hashing([slotted])
    assert transform_hashing([Slotted(3), _Holder(1)]) != transform_hashing([Slotted(4), _Holder(1)])


# --- 3. one start-up line per torchrun job ---------------------------------------------------------------------------

@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0), ("", 1)])
def test_only_rank_0_logs_the_disk_cache_line(rank, lines, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RANK", rank)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _check(tmp_path / "cache", [{"x": 1}], monkeypatch)
    assert sum("caching on disk in" in r.getMessage() for r in caplog.records) == lines


@pytest.mark.parametrize("rank, lines", [(0, 1), (1, 0)])
def test_the_process_group_rank_is_used_once_formed(rank, lines, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RANK", str(1 - rank))  # the group's rank wins over the environment
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _check(tmp_path / "cache", [{"x": 1}], monkeypatch)
    assert sum("caching on disk in" in r.getMessage() for r in caplog.records) == lines


def test_every_rank_refuses_a_cache_without_room(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(diskcache, "disk_free", lambda where: 100)
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(ValueError, match="cache_dir="):
        check_cache_disk([([{"x": 1}], Compose([]))], str(tmp_path / "cache"), lambda missing: 1000)
    assert "caching on disk in" not in caplog.text


# --- two processes writing the same missing entry at once -------------------------------------------------------------

def _slow_double(value, marks=None):
    import time

    with open(marks, "a") as handle:  # a preprocessing (a cache miss), recorded
        handle.write("x\n")
    time.sleep(0.5)  # both processes preprocess at the same time, then both write and rename
    return value * 2


def _write_same_entry(folder: str, barrier, out) -> None:
    double = functools.partial(_slow_double, marks=str(Path(folder).parent / "marks"))
    dataset = DiskCacheDataset([{"x": np.arange(50_000.0)}], Compose([Lambdad("x", func=double)]), folder)
    barrier.wait()
    item = dataset[0]
    out.put((float(np.asarray(item["x"]).sum()), str(dataset.cache_file(dataset.data[0]))))


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method: POSIX only")
def test_two_processes_writing_the_same_missing_entry_leave_one_whole_file(tmp_path):
    """Each process writes its own temporary under cache_dir/.partial and renames it into place (atomic within one
    file system): both get the entry, and one whole file is left, with no temporary."""
    context = multiprocessing.get_context("fork")  # POSIX; a fresh interpreter each (spawn) takes 15 s more
    barrier, out = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_write_same_entry, args=(str(tmp_path / "cache"), barrier, out))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert (tmp_path / "marks").read_text() == "x\nx\n"  # the premise: both missed it and wrote it
    expected = float(np.arange(50_000.0).sum() * 2)
    assert [r[0] for r in results] == [expected, expected]
    path = Path(results[0][1])
    assert results[1][1] == str(path) and [p.name for p in (tmp_path / "cache").glob("*.pt")] == [path.name]
    assert whole_file_size(path) == path.stat().st_size
    assert float(torch.load(path, weights_only=True)["x"].sum()) == expected
    assert list((tmp_path / "cache" / diskcache.PARTIAL).rglob("*.pt")) == []  # both temporaries renamed or removed
