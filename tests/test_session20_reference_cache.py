"""Reference tests for session 20's cache estimates and refusals (dira3d.engines.cache), written by a mutation audit:
each pins a behaviour that a mutation of the module changed without any other test failing. Expected bytes are
counted by hand (voxels x channels x 4 for float32; the arrays a transform makes), expected shares and message
figures by hand from the rule the docstrings state (rate x fraction x free / need, rounded down to 0.01; GiB = 2**30)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, Lambdad

import dira3d.engines.cache as cache_module
from dira3d.engines.cache import (available_memory, cache_bytes, check_cache_memory, check_task_cache_memory,
                                  checked_cache_data, checked_task_cache_data, item_bytes, shared_cache,
                                  task_cache_bytes)

GIB = 2**30


def _nifti(path: Path, shape: tuple) -> str:
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
    return str(path)


def _volumes(folder: Path, count: int, shape=(8, 8, 8), name="v") -> list[dict]:
    return [{"image": _nifti(folder / f"{name}{i}.nii.gz", shape)} for i in range(count)]


def test_a_list_of_other_entries_of_the_same_length_does_not_share_the_cache():
    dataset = CacheDataset([{"a": 1}, {"a": 2}], transform=None, progress=False)
    assert shared_cache(dataset, [{"a": 1}, {"a": 2}]) is dataset._cache
    assert shared_cache(dataset, [{"a": 3}, {"a": 4}]) is False


def test_an_image_of_several_channels_counts_every_channel(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((6, 5, 3), np.uint8), isVector=True)  # 5 x 6 pixels, 3 channels
    sitk.WriteImage(rgb, str(tmp_path / "rgb.png"))
    assert cache_bytes([[{"image": str(tmp_path / "rgb.png")}]], 1.0) == (5 * 6 * 3 * 4, 1, 0)


def _fake_files(monkeypatch, tmp_path: Path, files: dict[str, str]) -> None:
    """available_memory reads /proc/meminfo and /sys/fs/cgroup/memory.{max,current}: here, files of tmp_path."""
    real = {}
    for name, text in files.items():
        real[name] = tmp_path / name.strip("/").replace("/", "_")
        real[name].write_text(text)
    monkeypatch.setattr(cache_module, "Path", lambda p: real.get(str(p), tmp_path / "absent"))


MEMINFO = "MemTotal:       16000000 kB\nMemFree:          100000 kB\nMemAvailable:    1000000 kB\n"


def test_available_memory_is_meminfo_in_kib_lowered_to_the_cgroup_room(tmp_path, monkeypatch):
    _fake_files(monkeypatch, tmp_path, {"/proc/meminfo": MEMINFO})
    assert available_memory() == 1000000 * 1024  # kB of /proc/meminfo are KiB
    _fake_files(monkeypatch, tmp_path, {"/proc/meminfo": MEMINFO, "/sys/fs/cgroup/memory.max": "max\n",
                                        "/sys/fs/cgroup/memory.current": "1\n"})
    assert available_memory() == 1000000 * 1024  # no limit
    _fake_files(monkeypatch, tmp_path, {"/proc/meminfo": MEMINFO, "/sys/fs/cgroup/memory.max": "800000000\n",
                                        "/sys/fs/cgroup/memory.current": "300000000\n"})
    assert available_memory() == 500000000  # the room left under the limit, lower than MemAvailable
    _fake_files(monkeypatch, tmp_path, {"/proc/meminfo": MEMINFO, "/sys/fs/cgroup/memory.max": "8000000000\n",
                                        "/sys/fs/cgroup/memory.current": "1000000000\n"})
    assert available_memory() == 1000000 * 1024  # MemAvailable is the lower
    _fake_files(monkeypatch, tmp_path, {"/sys/fs/cgroup/memory.max": "100\n", "/sys/fs/cgroup/memory.current": "150\n"})
    assert available_memory() == 0  # over the limit: no room


def test_a_cache_of_exactly_the_fraction_fits(tmp_path, monkeypatch):
    train = _volumes(tmp_path, 2)
    need = 2 * 8 * 8 * 8 * 4
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2 * need)
    assert check_cache_memory(train, (), 1.0, fraction=0.5) == need  # need == fraction x free: not refused
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2 * need - 1)
    with pytest.raises(ValueError, match="num_samples_cache=1 caches 2 volume"):
        check_cache_memory(train, (), 1.0, fraction=0.5)


def test_the_share_that_fits_scales_the_current_rate_and_is_rounded_down(tmp_path, monkeypatch):
    train = _volumes(tmp_path, 4)
    volume = 8 * 8 * 8 * 4
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2 * volume)
    with pytest.raises(ValueError) as err:  # rate 0.5 caches 2 volumes; room for 0.5 x 2 volumes: rate 0.25
        check_cache_memory(train, (), 0.5, fraction=0.5)
    assert "num_samples_cache=0.5 caches 2 volume(s)" in str(err.value)
    assert "--override num_samples_cache=0.25 caches the share that fits" in str(err.value)
    assert check_cache_memory(train, (), 0.25, fraction=0.5) == volume  # and it does fit
    monkeypatch.setattr(cache_module, "available_memory", lambda: 0.678 * 4 * volume)  # 0.5 x 0.678 = 0.339
    with pytest.raises(ValueError, match=r"--override num_samples_cache=0.33 caches"):
        check_cache_memory(train, (), 1.0, fraction=0.5)


def test_the_refusal_states_gib_per_process_and_for_the_node(monkeypatch):
    monkeypatch.setattr(cache_module, "cache_bytes", lambda lists, rate: (3 * GIB, 3, 0))
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2 * GIB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError) as err:
        check_cache_memory([{"image": "x"}], (), 1.0)
    assert ("num_samples_cache=1 caches 3 volume(s) in memory, about 3.0 GiB as float32, in each of the 2 processes on "
            "this node (6.0 GiB in all), but only 2.0 GiB is available") in str(err.value)
    assert "--override num_samples_cache=0.3 caches the share that fits" in str(err.value)  # 0.9 x 2 / 6


def test_the_task_refusal_and_log_state_the_rate_and_gib(monkeypatch, caplog):
    monkeypatch.setattr(cache_module, "task_cache_bytes", lambda caches, rate: (3 * GIB, 5, 0))
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2 * GIB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with caplog.at_level(logging.INFO, logger="dira3d.engines.cache"), pytest.raises(ValueError) as err:
        check_task_cache_memory([([{"image": "x"}], None)], 0.5)
    assert "caching 5 item(s) in memory before training (training and validation): about 3.00 GiB (" in caplog.text
    assert "cache_rate=0.5 caches 5 item(s) in memory before training" in str(err.value)
    assert "about 3.0 GiB after preprocessing, but only 2.0 GiB is available" in str(err.value)
    assert "cache_rate=0.3 (dira3d finetune --set cache_rate=0.3;" in str(err.value)  # 0.5 x 0.9 x 2 / 3


def test_the_pretraining_check_counts_the_validation_list(tmp_path, caplog, monkeypatch):
    train, val = _volumes(tmp_path, 2), _volumes(tmp_path, 3, name="w")
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2**40)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.cache"):
        assert checked_cache_data(train, val, 1.0) is train
    assert "caching 5 volume(s) in memory" in caplog.text


def _sized(key: str = "n") -> Compose:
    """A deterministic prefix that caches ``n`` float32 values for an entry (its image is not loaded)."""
    return Compose([Lambdad(key, lambda n: np.zeros(int(n), np.float32))])


def test_the_task_check_counts_the_validation_list(caplog, monkeypatch):
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2**40)
    train, val = [{"n": 10}, {"n": 10}], [{"n": 10}, {"n": 10}, {"n": 10}]
    with caplog.at_level(logging.INFO, logger="dira3d.engines.cache"):
        assert checked_task_cache_data(train, _sized(), val, _sized(), 1.0) is train
    assert "caching 5 item(s) in memory before training (training and validation): about" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dira3d.engines.cache"):  # nothing cached: nothing logged
        assert check_task_cache_memory([(train, _sized())], 0.0) == 0
    assert "caching" not in caplog.text


def test_item_bytes_counts_each_storage_once_and_every_array():
    tensor = torch.zeros(10, dtype=torch.float32)
    item = {"image": tensor, "view": tensor[2:5], "other": [torch.zeros(3, dtype=torch.float64), (np.zeros(4, np.int16),)],
            "meta": {"nested": np.zeros(5, np.float32)}, "name": "x"}
    assert item_bytes(item) == 10 * 4 + 3 * 8 + 4 * 2 + 5 * 4


def test_a_list_without_usable_headers_is_the_mean_of_its_first_and_last_entry(tmp_path):
    image = _nifti(tmp_path / "same.nii.gz", (4, 4, 4))  # one header for all: no line through the headers
    entries = [{"image": image, "n": n} for n in (10, 25, 30)]
    assert task_cache_bytes([(entries, _sized())], 1.0) == ((10 + 30) * 4 * 3 // 2, 3, 0)


def test_entries_between_are_placed_on_the_line_through_the_first_and_last(tmp_path):
    def entry(k: int | None, n: int) -> dict:
        image = _nifti(tmp_path / f"k{k}_{n}.nii.gz", (k, 1, 1)) if k else str(tmp_path / "unreadable.nii.gz")
        return {"image": image, "n": n}

    # headers 4k bytes, caches 4n: first (40 -> 400), last (80 -> 800): 10 cached bytes per header byte
    line = [entry(10, 100), entry(5, 50), entry(30, 300), entry(20, 200)]
    assert task_cache_bytes([(line, _sized())], 1.0)[0] == 400 + 200 + 1200 + 800
    # an unreadable header between: the mean of first and last
    assert task_cache_bytes([([entry(10, 100), entry(None, 1), entry(20, 200)], _sized())], 1.0)[0] == 400 + 600 + 800
    # far below the first: no negative bytes (first 400 at 40, last 1200 at 48: 100 per byte; 4 -> -3200 -> 0)
    assert task_cache_bytes([([entry(10, 100), entry(1, 1), entry(12, 300)], _sized())], 1.0)[0] == 400 + 0 + 1200


def test_a_list_the_prefix_cannot_read_counts_image_and_label_headers(tmp_path):
    def fail(_):
        raise RuntimeError("not readable by this prefix")

    entries = [{"image": _nifti(tmp_path / f"i{i}.nii.gz", (4, 4, 2)), "label": _nifti(tmp_path / f"l{i}.nii.gz", (4, 4, 1))}
               for i in range(2)]
    broken = Compose([Lambdad("image", fail)])
    assert task_cache_bytes([(entries, broken)], 1.0) == (2 * (32 + 16) * 4, 2, 2)
