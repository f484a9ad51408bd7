"""The volumes the pretraining bundle caches before training (dira3d.engines.cache), found on full-size CTs.

- Validation of every-volume-its-own-class pretraining (``dis_mode`` ``visual_words`` on volumes) runs on the
  training list, and its CacheDataset cached every training volume a second time: 6 prepared chest CTs
  (512x512x300 at 1x1x2 mm, 39 MiB each) cost 2 x 156 MiB, and hundreds of CTs twice the training set.
- A cache that would not fit was loaded silently until the kernel killed the run; it is now refused before the first
  volume is read, naming num_samples_cache, and what will be cached is logged.
"""

from __future__ import annotations

import logging

import pytest
from monai.bundle import ConfigParser

import dira3d.engines.cache as cache_module
from dira3d.engines import load_datalist
from dira3d.engines.cache import cache_bytes, check_cache_memory, shared_cache
from dira3d.engines.inputs import setting_error_in
from test_bundle_pretrain import write_volumes

SHAPE = (24, 24, 12)
VOLUME_BYTES = 24 * 24 * 12 * 4  # float32


def _parser(repo_root, datalist, **settings):
    configs = repo_root / "bundles" / "dira_pretrain" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "tiny.json")])
    parser.update({"datalist": str(datalist), "num_workers": 0, "patch_size": [16, 16, 8], **settings})
    parser.parse(True)
    return parser


def test_validation_on_the_training_list_keeps_one_copy_of_each_volume(tmp_path, repo_root):
    datalist = write_volumes(tmp_path, shape=SHAPE)
    parser = _parser(repo_root, datalist)
    assert parser.get_parsed_content("validate#split") == "training"  # every volume its own class
    train = parser.get_parsed_content("train#dataset")
    val = parser.get_parsed_content("validate#dataset")
    assert len(train) == len(val) == 4
    for index in range(4):  # the very tensors the training cache holds, not a second load of the files
        assert val._cache[index]["image"].data_ptr() == train._cache[index]["image"].data_ptr()
    item = val[0]  # and validation still draws its patches from them
    assert tuple(item["image"].shape) == (1, 16, 16, 8) and tuple(item["image2"].shape) == (1, 16, 16, 8)
    assert item["image"].data_ptr() != train._cache[0]["image"].data_ptr()  # a copy, the cache is not cropped


def test_validation_on_its_own_list_caches_its_own_volumes(tmp_path, repo_root):
    datalist = write_volumes(tmp_path, shape=SHAPE)
    parser = _parser(repo_root, datalist, dis_mode="moco", pair="views")
    assert parser.get_parsed_content("validate#split") == "validation"
    train = parser.get_parsed_content("train#dataset")
    val = parser.get_parsed_content("validate#dataset")
    assert len(train) == 4 and len(val) == 2 and val._cache is not train._cache
    assert shared_cache(train, load_datalist(datalist, "validation")) is False
    assert shared_cache(object(), load_datalist(datalist, "training")) is False  # not a CacheDataset


def test_the_estimate_counts_each_cached_volume_once(tmp_path):
    datalist = write_volumes(tmp_path, shape=SHAPE)
    train, val = load_datalist(datalist, "training"), load_datalist(datalist, "validation")
    assert cache_bytes([train, train], 1.0) == (4 * VOLUME_BYTES, 4, 0)  # shared: counted once
    assert cache_bytes([train, val], 1.0) == (6 * VOLUME_BYTES, 6, 0)
    assert cache_bytes([train, val], 0.5) == (3 * VOLUME_BYTES, 3, 0)  # CacheDataset caches int(len * rate)
    assert cache_bytes([train, val], 0.0) == (0, 0, 0)
    # every entry is cached apart, even of one file (500 entries of 4 files were counted as 4 volumes)
    twice = train + [dict(e, case_id=e["case_id"] + "_again") for e in train]
    assert cache_bytes([twice, val], 1.0) == (10 * VOLUME_BYTES, 10, 0)
    missing = [{"image": str(tmp_path / "gone.nii.gz")}]
    assert cache_bytes([train, missing], 1.0) == (4 * VOLUME_BYTES, 5, 1)  # unreadable: counted apart


def test_what_is_cached_is_logged(tmp_path, caplog, monkeypatch):
    datalist = write_volumes(tmp_path, shape=SHAPE)
    monkeypatch.setattr(cache_module, "available_memory", lambda: 10 * 2**30)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.cache"):
        total = check_cache_memory(load_datalist(datalist), load_datalist(datalist, "validation"), 1.0)
    assert total == 6 * VOLUME_BYTES
    assert ("caching 6 volume(s) in memory before training: about 0.2 MiB as float32 (num_samples_cache=1;"
            in caplog.text)


def test_a_cache_that_would_not_fit_is_refused_before_any_volume_is_read(tmp_path, repo_root, monkeypatch):
    datalist = write_volumes(tmp_path, shape=SHAPE)
    free = 2 * VOLUME_BYTES / 0.9  # room for 2 of the 4 training volumes
    monkeypatch.setattr(cache_module, "available_memory", lambda: free)
    loaded = []
    from dira3d.engines.inputs import LoadVolumed

    original = LoadVolumed.__call__
    monkeypatch.setattr(LoadVolumed, "__call__",
                        lambda self, data, reader=None: loaded.append(1) or original(self, data, reader))
    with pytest.raises(Exception) as err:
        _parser(repo_root, datalist).get_parsed_content("train#dataset")
    message = str(setting_error_in(err.value))
    assert "num_samples_cache=1 caches 4 volume(s) in memory" in message
    assert "--override num_samples_cache=0.5 caches the share that fits" in message
    assert "num_samples_cache=0 caches none" in message
    assert loaded == []
    # the share it names fits, and is cached
    dataset = _parser(repo_root, datalist, num_samples_cache=0.5).get_parsed_content("train#dataset")
    assert dataset.cache_num == 2 and len(loaded) == 2
    # no memory figure (not Linux): nothing refused
    monkeypatch.setattr(cache_module, "available_memory", lambda: None)
    assert check_cache_memory(load_datalist(datalist), (), 1.0) == 4 * VOLUME_BYTES


def test_every_torchrun_process_of_a_node_counts(tmp_path, monkeypatch):
    """multi_gpu_train.json: each process caches every volume (the sampler splits the iterations): 4 processes on a
    node need 4 caches, and all of them check before any has loaded, each seeing the whole memory free."""
    datalist = write_volumes(tmp_path, shape=SHAPE)
    monkeypatch.setattr(cache_module, "available_memory", lambda: 8 * VOLUME_BYTES)  # 2 caches of 4 volumes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert check_cache_memory(load_datalist(datalist), (), 1.0) == 4 * VOLUME_BYTES
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"in each of the 4 processes on this node \(0.0 GiB in all\)") as err:
        check_cache_memory(load_datalist(datalist), (), 1.0)
    assert "--override num_samples_cache=0.45 " in str(err.value)


def test_available_memory_reads_this_machine():
    free = cache_module.available_memory()
    assert free is None or 0 < free < 2**50
