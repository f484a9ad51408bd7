"""Reference checks of the disk cache (dira3d.engines.diskcache, ``cache_dir``) found by a mutation audit.

Each test pins one behaviour against an independent reference: hand-set file sizes and modification times, the
settings a reader of the module's docstring expects to count, and hand-computed free-space arithmetic (90 % of the
free space, GiB units). Only the module's public names are used.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import Compose, Lambdad
from monai.utils import InterpolateMode

import dira3d.engines.diskcache as diskcache
from dira3d.engines import checked_cache_data, checked_task_cache_data
from dira3d.utils.warning_format import Dira3dWarning
from dira3d.engines.diskcache import (
    DiskCacheDataset, cache_dir_of, cached_dataset, check_cache_disk, source_hashing, transform_hashing,
)

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


# --- cache_dir_of ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", [None, "", False, "none", "None", "NULL", "false", "False", "  ", " none "])
def test_cache_dir_of_reads_every_spelling_of_the_default_as_the_memory_cache(setting):
    assert cache_dir_of(setting) is None


def test_cache_dir_of_expands_the_home_folder(tmp_path):
    assert cache_dir_of("~/dira_cache") == Path(os.path.expanduser("~")) / "dira_cache"
    assert cache_dir_of(str(tmp_path / "c")) == tmp_path / "c"


# --- source_hashing: the key of an entry --------------------------------------------------------------------------

def _write(path: Path, data: bytes, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_source_of_another_size_with_the_same_time_is_another_key(tmp_path):
    image = tmp_path / "a.nii"
    _write(image, b"0" * 100, 10**18)
    before = source_hashing({"image": str(image)})
    _write(image, b"0" * 101, 10**18)  # same modification time to the nanosecond, another size
    assert source_hashing({"image": str(image)}) != before


def test_a_source_of_the_same_size_with_another_time_is_another_key(tmp_path):
    image = tmp_path / "a.nii"
    _write(image, b"0" * 100, 10**18)
    before = source_hashing({"image": str(image)})
    _write(image, b"1" * 100, 10**18 + 1)  # the same size, one nanosecond later
    assert source_hashing({"image": str(image)}) != before
    _write(image, b"1" * 100, 10**18 + 1)  # nothing changed: the same key
    assert source_hashing({"image": str(image)}) == source_hashing({"image": str(image)})


def test_a_file_inside_a_dicom_folder_rewritten_in_place_is_another_key(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for name in ("1.dcm", "2.dcm"):
        _write(series / name, b"x" * 50, 10**18)
    os.utime(series, ns=(10**18, 10**18))
    key = source_hashing({"image": str(series)})
    _write(series / "2.dcm", b"y" * 50, 10**18 + 5)  # same size, later: the folder's own size and time do not change
    os.utime(series, ns=(10**18, 10**18))
    after_time = source_hashing({"image": str(series)})
    assert after_time != key
    _write(series / "2.dcm", b"y" * 51, 10**18 + 5)  # another size, the same time
    os.utime(series, ns=(10**18, 10**18))
    assert source_hashing({"image": str(series)}) != after_time


def test_a_subfolder_of_a_dicom_folder_is_not_one_of_its_files(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    _write(series / "1.dcm", b"x" * 50, 10**18)
    key = source_hashing({"image": str(series)})
    (series / "notes").mkdir()
    os.utime(series, ns=(10**18, 10**18))
    assert source_hashing({"image": str(series)}) == key


def test_every_path_of_a_list_value_and_a_path_object_counts(tmp_path):
    t1, t2 = tmp_path / "t1.nii", tmp_path / "t2.nii"
    for path in (t1, t2):
        _write(path, b"0" * 10, 10**18)
    listed, as_path = {"image": [str(t1), str(t2)]}, {"image": t2}
    keys = source_hashing(listed), source_hashing(as_path)
    _write(t2, b"0" * 11, 10**18)  # the second modality of a multi-modal entry (BraTS) prepared again
    assert source_hashing(listed) != keys[0] and source_hashing(as_path) != keys[1]


def test_entries_of_the_same_files_with_other_values_have_other_keys(tmp_path):
    image = tmp_path / "a.nii"
    _write(image, b"0" * 10, 10**18)
    assert source_hashing({"image": str(image), "label": 0}) != source_hashing({"image": str(image), "label": 1})
    assert source_hashing({"x": 1}) != source_hashing({"x": 2})


def test_a_value_that_cannot_be_a_path_is_not_an_error():
    assert source_hashing({"image": "a\x00b", "case_id": "c1"}) == source_hashing({"image": "a\x00b", "case_id": "c1"})


# --- transform_hashing -----------------------------------------------------------------------------------------------

class _Mode(enum.Enum):
    FIRST = 1
    SECOND = 2


class _Holder:
    """A transform of one setting (the hash reads every attribute)."""

    def __init__(self, value) -> None:
        self.value = value

    def __call__(self, data):
        return data


def _scale(k):
    def scale(x, k=k):
        return x * k
    return scale


def test_transform_hash_covers_code_defaults_partial_arguments_enums_and_arrays():
    def digest(value):
        return transform_hashing([_Holder(value)])

    assert digest(lambda x: x + 2) != digest(lambda x: x * 2)  # the same constants, other code
    assert digest(_scale(2)) != digest(_scale(3))  # the same code, other defaults
    assert digest(functools.partial(np.add, 1)) != digest(functools.partial(np.add, 2))
    assert digest(InterpolateMode.AREA) != digest(InterpolateMode.NEAREST)
    assert digest(_Mode.FIRST) != digest(_Mode.SECOND)  # an enum that is not a str (InterpolateMode is one)
    assert digest(np.array([1.0, 2.0])) != digest(np.array([1.0, 3.0]))
    assert digest(np.array([1.0, 2.0])) == digest(np.array([1.0, 2.0]))


def test_transform_hash_is_never_the_hash_of_an_earlier_freed_transform():
    """The hash is memoised per transform instance (by id): a freed transform's id is reused by a new one, which
    must not be given the old one's hash."""
    hashes = []
    for i in range(40):
        transform = _Holder(i)
        hashes.append(transform_hashing([transform]))
        del transform
    assert len(set(hashes)) == 40


def test_transform_hash_is_the_same_after_the_transforms_are_used():
    """A transform keeps state of its use among its attributes: the hash is the one taken before any use."""
    holder = _Holder([1])
    before = transform_hashing([holder])
    holder.value.append(2)  # as a reader records the last file it read
    assert transform_hashing([holder]) == before


def test_transform_hash_of_a_set_does_not_depend_on_its_order():
    """A set's order is not its content: 1 and 9 share a slot of a small set, so {1, 9} and {9, 1} iterate in the
    order they were built (as a set of strings iterates in another order under another PYTHONHASHSEED, i.e. in
    another process, where the same settings must give the same hash)."""
    first, second = {1, 9}, {9, 1}
    assert list(first) != list(second)  # the premise: two orders of one set
    assert transform_hashing([_Holder(first)]) == transform_hashing([_Holder(second)])


# --- DiskCacheDataset -----------------------------------------------------------------------------------------------

def test_reading_an_entry_leaves_the_temporary_folder_as_it_was(tmp_path):
    before = tempfile.tempdir
    dataset = DiskCacheDataset([{"x": 1}], Compose([]), tmp_path / "cache")
    assert dataset[0] == {"x": 1}
    assert tempfile.tempdir == before and len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_set_data_replaces_the_entries(tmp_path):
    dataset = cached_dataset([{"x": 1}, {"x": 2}, {"x": 3}], Compose([]), cache_dir=str(tmp_path / "cache"))
    assert [dataset[i]["x"] for i in range(3)] == [1, 2, 3]
    dataset.set_data([{"x": 7}])
    assert len(dataset) == 1 and dataset[0] == {"x": 7}
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4  # the earlier entries' files are kept


# --- check_cache_disk: 90 % of the free space, GiB ----------------------------------------------------------------

def _check(tmp_path, monkeypatch, need: int, free: int, items=({"x": 1},)):
    monkeypatch.setattr(diskcache, "disk_free", lambda folder: free)
    return check_cache_disk([(list(items), Compose([]))], str(tmp_path / "cache"), lambda missing: need)


def test_the_cache_may_take_90_percent_of_the_free_space_and_no_more(tmp_path, monkeypatch):
    assert _check(tmp_path, monkeypatch, need=9 * GIB, free=10 * GIB) == 9 * GIB  # exactly 90 %: fits
    with pytest.raises(ValueError) as err:
        _check(tmp_path, monkeypatch, need=9 * GIB + 1, free=10 * GIB)
    assert str(err.value).startswith(f"cache_dir={tmp_path / 'cache'}: the 1 entry still to cache there take about "
                                     "9.0 GiB after preprocessing, but only 10.0 GiB is free on its file system")
    with pytest.raises(ValueError, match="the 1 entry still to cache there take about 0.9 GiB"):
        _check(tmp_path, monkeypatch, need=int(0.95 * GIB), free=GIB)  # 95 % of the free space: refused


def test_a_full_disk_with_every_entry_there_is_not_refused(tmp_path, monkeypatch, caplog):
    items = [{"x": 1}, {"x": 2}]
    dataset = DiskCacheDataset(items, Compose([]), tmp_path / "cache")
    [dataset[i] for i in range(2)]
    held = sum(f.stat().st_size for f in (tmp_path / "cache").glob("*.pt"))
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        assert _check(tmp_path, monkeypatch, need=0, free=0, items=items) == 0
    assert f"2 entries already there ({held / 2**20:.1f} MiB), 0 to write" in caplog.text


def test_the_log_gives_sizes_in_gib_from_one_gib(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        _check(tmp_path, monkeypatch, need=GIB, free=4 * GIB)
        _check(tmp_path, monkeypatch, need=GIB - 2**20, free=4 * GIB)
    assert "1 to write at their first use (about 1.00 GiB); 4.00 GiB free there" in caplog.text
    assert "(about 1023.0 MiB)" in caplog.text


def test_an_empty_list_without_a_transform_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(diskcache, "disk_free", lambda folder: GIB)
    asked = []
    check_cache_disk([([{"x": 1}], Compose([])), ([], None)], str(tmp_path / "c"),
                     lambda missing: asked.append(missing) or 10)
    assert [[items for items, _ in missing] for missing in asked] == [[[{"x": 1}]]]


# --- the bundles' checks (dira3d.engines.cache) with cache_dir -----------------------------------------------------

def _volumes(folder: Path, count: int, shape=(8, 8, 4)) -> list[dict]:
    import nibabel as nib

    entries = []
    for i in range(count):
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(folder / f"v{i}.nii.gz"))
        entries.append({"image": str(folder / f"v{i}.nii.gz")})
    return entries


def test_pretraining_disk_check_counts_both_lists_at_any_cache_rate(tmp_path, monkeypatch, caplog):
    """Every entry goes to disk whatever num_samples_cache says; the validation list is counted as well."""
    entries = _volumes(tmp_path, 3)
    monkeypatch.setattr(diskcache, "disk_free", lambda folder: 10 * GIB)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        checked_cache_data(entries[:2], entries[2:], 0.0, cache_dir=str(tmp_path / "c"), transform=Compose([]))
    need = 3 * 8 * 8 * 4 * 4 / 2**20  # three float32 volumes, from their headers
    assert f"0 entries already there (0.0 MiB), 3 to write at their first use (about {need:.1f} MiB)" in caplog.text
    monkeypatch.setattr(diskcache, "disk_free", lambda folder: 3000)  # 90 %: 2700 bytes < 3 x 1024 bytes
    with pytest.raises(ValueError, match=r"the 3 entries still to cache there"):
        checked_cache_data(entries[:2], entries[2:], 0.0, cache_dir=str(tmp_path / "c"), transform=Compose([]))


def test_task_disk_check_measures_every_entry_at_any_cache_rate(tmp_path, monkeypatch, caplog):
    prefix = Compose([Lambdad("x", func=lambda v: np.zeros(1024, np.float32))])  # 4 KiB per entry
    monkeypatch.setattr(diskcache, "disk_free", lambda folder: 10 * GIB)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        checked_task_cache_data([{"x": i} for i in range(4)], prefix, [{"x": 9}], prefix, rate=0.0,
                                cache_dir=str(tmp_path / "c"))
    assert "5 to write at their first use (about 0.0 MiB)" in caplog.text
    monkeypatch.setattr(diskcache, "disk_free", lambda folder: 5 * 4096)  # 90 %: 18 KiB < 20 KiB
    with pytest.raises(ValueError, match=r"the 5 entries still to cache there"):
        checked_task_cache_data([{"x": i} for i in range(4)], prefix, [{"x": 9}], prefix, rate=0.0,
                                cache_dir=str(tmp_path / "c"))


def test_a_truncated_file_that_cannot_be_removed_is_named_and_its_entry_preprocessed(tmp_path, monkeypatch):
    """A shared cache_dir this user cannot write, holding a truncated file: the entry is preprocessed without the
    cache (MONAI's own load of the file would stop the run with PyTorch's error, naming no file)."""
    dataset = DiskCacheDataset([{"x": np.arange(3.0)}], Compose([]), tmp_path / "cache")
    expected = dataset[0]
    path = dataset.cache_file(dataset.data[0])
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    original = Path.unlink

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.warns(Dira3dWarning, match=rf"cache_dir: {path} is truncated or unreadable .* it cannot be removed "
                                           r"\(PermissionError\), so the entry is preprocessed without the cache"):
        item = dataset[0]
    assert np.array_equal(np.asarray(item["x"]), np.asarray(expected["x"]))
    assert path.read_bytes() == whole[: len(whole) // 2]  # left as it was
