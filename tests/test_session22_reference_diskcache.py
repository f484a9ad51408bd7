"""Reference checks of dira3d.engines.diskcache (session 22 mutation audit): the transform-hash memo forgets a
collected transform (its id reused by another is hashed anew), the start-up line's rank from a ``RANK`` that is not a
number, and :func:`whole_file_size` against ``zipfile``'s own reading of the archives."""

from __future__ import annotations

import logging
import zipfile

import pytest
from monai.transforms import Compose

import dira3d.engines.diskcache as diskcache
from dira3d.engines.diskcache import check_cache_disk, transform_hashing, whole_file_size

GIB = 2**30


class _Setting:
    def __init__(self, value) -> None:
        self.value = value

    def __call__(self, data):
        return data


def test_a_collected_transforms_id_reused_by_another_is_hashed_anew():
    first = _Setting(1)
    old_id, old_hash = id(first), transform_hashing([first])
    keep, slots = [None] * 2000, iter(range(2000))  # made before the free: the loop below allocates only _Setting
    del first  # freed now (reference count): its finaliser runs; CPython hands its memory to a next object of its size
    for i in slots:
        keep[i] = _Setting(2)
    reused = [other for other in keep if id(other) == old_id]
    if not reused:
        pytest.fail("no new object got the freed id (not CPython's allocator?): this check needs one")
    other = reused[0]
    assert transform_hashing([other]) != old_hash  # not the collected transform's memoised hash
    assert transform_hashing([other]) == transform_hashing([_Setting(2)])


@pytest.mark.parametrize("rank, lines", [("x", 1), ("0", 1), ("2", 0)])
def test_a_rank_that_is_not_a_number_logs_as_rank_0(rank, lines, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(diskcache, "disk_free", lambda where: 10 * GIB)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        check_cache_disk([([{"x": 1}], Compose([]))], str(tmp_path / "cache"), lambda missing: 1000)
    assert sum("caching on disk in" in r.getMessage() for r in caplog.records) == lines


def test_whole_file_size_of_small_archives_agrees_with_zipfile(tmp_path):
    path = tmp_path / "a.pt"
    zipfile.ZipFile(path, "w").close()  # an empty archive: the end record alone (22 bytes)
    assert path.stat().st_size == 22 and whole_file_size(path) == 22
    path.write_bytes(b"x" * 100 + b"PK\x05\x06" + b"\0" * 17)  # the signature 21 bytes before the end: cut short
    assert zipfile.is_zipfile(path) is False and whole_file_size(path) is None


def test_missing_entries_are_not_counted_as_damaged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(diskcache, "disk_free", lambda where: 10 * GIB)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        check_cache_disk([([{"x": 1}, {"x": 2}], Compose([]))], str(tmp_path / "cache"), lambda missing: 1000)
    assert "0 entries already there" in caplog.text and "2 to write at their first use" in caplog.text
    assert "truncated or damaged" not in caplog.text  # none there is none damaged


class _Slotted:
    __slots__ = ("value",)  # no __weakref__: the memo holds such a transform, so its id is never another's

    def __init__(self, value) -> None:
        self.value = value

    def __call__(self, data):
        return data


def test_a_transform_without_weak_references_keeps_its_id_while_its_hash_is_memoised():
    first = _Slotted(1)
    old_id = id(first)
    transform_hashing([first])
    keep, slots = [None] * 2000, iter(range(2000))
    del first  # the memo still holds it: no new object gets its id
    for i in slots:
        keep[i] = _Slotted(2)
    reused = [other for other in keep if id(other) == old_id]
    assert not reused  # else a new transform could be given the held one's memoised hash


class _SlotSetting:
    """A transform whose setting lives in a slot (no ``__dict__``)."""

    __slots__ = ("window",)

    def __init__(self, window):
        self.window = window


class _SlottedChild(_SlotSetting):
    __slots__ = ("mode",)

    def __init__(self, window, mode):
        super().__init__(window)
        self.mode = mode


def test_a_setting_held_in_a_slot_changes_the_hash():
    assert transform_hashing(_SlotSetting(1)) != transform_hashing(_SlotSetting(2))
    assert transform_hashing(_SlotSetting(1)) == transform_hashing(_SlotSetting(1))
    assert transform_hashing(_SlottedChild(1, "a")) != transform_hashing(_SlottedChild(2, "a"))  # an inherited slot
    assert transform_hashing(_SlottedChild(1, "a")) != transform_hashing(_SlottedChild(1, "b"))


def test_a_transform_and_a_list_holding_it_are_hashed_each_as_described():
    first, second = Compose([]), Compose([])
    alone = transform_hashing(first)
    assert transform_hashing([first]) != alone  # a list is described as a list, whichever form is asked first
    assert transform_hashing([second]) == transform_hashing([first])
    assert transform_hashing(second) == alone
