"""The task bundles' in-memory caches (dira3d.engines.cache.checked_task_cache_data), found at real dataset sizes.

Every task bundle caches its training and validation lists (``cache_rate`` 1.0) before the first iteration, with no
word of the size: ChestX-ray14 (78k images, 15 GiB after the resize to 224 x 224), CheXpert (38 GiB), LiTS (100 CTs
at native spacing, 84 GiB), LUNA16 (375k cubes, 183 GiB) were loaded until the kernel killed the run. What is cached
is the output of the deterministic prefix of the bundle's preprocessing, so the estimate runs that prefix on the first
entry of each list; the file headers (the pretraining estimate) are 5x off for the 2D bundles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, Lambdad, LoadImaged

import dira3d.engines.cache as cache_module
from dira3d.engines.cache import cache_bytes, check_task_cache_memory, task_cache_bytes
from dira3d.engines.inputs import setting_error_in
from test_bundles_2d import write_cxr
from test_bundles_finetune import make_segmentation

REPO = Path(__file__).resolve().parents[1]
TASK_BUNDLES = ["brats_tumor_seg", "chestxray14_cls", "chexpert_cls", "lidc_nodule_seg", "lits_liver_seg",
                "luna16_nodule_fpr", "montgomery_lung_seg", "pecad_embolism_fpr", "siim_pneumothorax_seg"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _parser(bundle: str, datalist: Path, *extra: str, **settings) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / name) for name in ("train.json", *extra)])
    parser.update({"datalist": str(datalist), "num_workers": 0, **settings})
    parser.parse(True)
    return parser


def _held_bytes(dataset) -> int:
    """What a filled CacheDataset holds: numel x element size of every cached tensor (counted independently of
    dira3d's item_bytes)."""
    total = 0
    for item in dataset._cache:
        for value in item.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def test_every_task_bundle_checks_its_caches_before_filling_them():
    for bundle in TASK_BUNDLES:
        config = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())
        assert config["train"]["dataset"]["data"] == (
            "$dira3d.engines.checked_task_cache_data(@train#datalist, @train#preprocessing, @validate#datalist, "
            "@validate#preprocessing, @cache_rate, cache_dir=@cache_dir)"), bundle
        assert config["validate"]["dataset"]["cache_rate"] == "@cache_rate", bundle
        evaluate = json.loads((REPO / "bundles" / bundle / "configs" / "evaluate.json").read_text())
        assert evaluate["validate#dataset#cache_rate"] == 0, bundle  # one pass over the test entries: no cache


def test_2d_estimate_is_what_the_bundle_caches_not_the_file(tmp_path, monkeypatch, caplog):
    """chestxray14_cls: 120 x 100 8-bit PNGs resized to roi_size 64 x 64 float32, plus the 14 labels (float32)."""
    datalist = write_cxr(tmp_path, "cxr.json", 14, train=10, size=(120, 100))
    parser = _parser("chestxray14_cls", datalist, roi_size=[64, 64])
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2**40)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.cache"):
        train = parser.get_parsed_content("train#dataset")
    val = parser.get_parsed_content("validate#dataset")
    count = len(train) + len(val)
    assert count == 10 and len(val) >= 1
    per_item = (64 * 64 + 14) * 4  # by hand
    held = _held_bytes(train) + _held_bytes(val)
    assert held == count * per_item
    caches = [(parser.get_parsed_content("train#datalist"), parser.get_parsed_content("train#preprocessing")),
              (parser.get_parsed_content("validate#datalist"), parser.get_parsed_content("validate#preprocessing"))]
    assert task_cache_bytes(caches, 1.0) == (held, 10, 0)
    assert "caching 10 item(s) in memory before training (training and validation)" in caplog.text
    assert "cache_rate=1" in caplog.text
    # the header estimate the pretraining check uses (float32 of the file) would be 3x off here
    header = cache_bytes([caches[0][0], caches[1][0]], 1.0)[0]
    assert header == count * 120 * 100 * 4 and header > 2.5 * held


def test_3d_estimate_follows_what_each_list_caches(tmp_path, monkeypatch):
    """lits_liver_seg: training caches image and mask padded to roi_size (SpatialPadd comes before the first random
    transform, so CacheDataset caches it), validation caches them as loaded: two sizes per entry."""
    datalist, _ = make_segmentation(tmp_path, "lits.json", (32, 32, 16), None, n_train=8)
    parser = _parser("lits_liver_seg", datalist, roi_size=[48, 40, 24])
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2**40)
    train = parser.get_parsed_content("train#dataset")
    val = parser.get_parsed_content("validate#dataset")
    assert len(val) >= 1 and len(train) + len(val) == 8
    held = _held_bytes(train) + _held_bytes(val)
    assert held == len(train) * 2 * 48 * 40 * 24 * 4 + len(val) * 2 * 32 * 32 * 16 * 4  # by hand
    caches = [(parser.get_parsed_content("train#datalist"), parser.get_parsed_content("train#preprocessing")),
              (parser.get_parsed_content("validate#datalist"), parser.get_parsed_content("validate#preprocessing"))]
    estimate, items, from_headers = task_cache_bytes(caches, 1.0)
    assert (items, from_headers) == (8, 0)
    assert abs(estimate - held) <= 0.1 * held
    # a share: CacheDataset caches the first int(len * rate) of each list
    half = task_cache_bytes(caches, 0.5)
    assert half[1] == int(len(train) * 0.5) + int(len(val) * 0.5)


def test_volumes_of_their_own_size_are_scaled_by_their_headers(tmp_path, monkeypatch):
    """LiTS at native spacing: 74 to 987 slices a CT. The first entry times the count is off by their spread; the
    estimate scales each entry by its headers when the first and last entries cache different sizes."""
    rng = np.random.default_rng(0)
    (tmp_path / "vols").mkdir()
    entries = []
    for i, slices in enumerate([8, 40, 16, 12, 36, 24, 10, 30, 20, 14]):
        shape = (24, 24, slices)
        image = (0.3 + 0.05 * rng.standard_normal(shape)).clip(0, 1).astype(np.float32)
        mask = np.zeros(shape, np.uint8)
        mask[8:16, 8:16, 2:6] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "vols" / f"c{i}_img.nii.gz"))
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "vols" / f"c{i}_seg.nii.gz"))
        entries.append({"image": f"vols/c{i}_img.nii.gz", "label": f"vols/c{i}_seg.nii.gz", "case_id": f"c{i}"})
    datalist = tmp_path / "lits.json"
    datalist.write_text(json.dumps({"training": entries, "test": entries[:2], "meta": {}}))
    parser = _parser("lits_liver_seg", datalist, roi_size=[16, 16, 8])
    monkeypatch.setattr(cache_module, "available_memory", lambda: 2**40)
    train = parser.get_parsed_content("train#dataset")
    val = parser.get_parsed_content("validate#dataset")
    held = _held_bytes(train) + _held_bytes(val)
    assert held == sum(2 * 24 * 24 * s * 4 for s in [8, 40, 16, 12, 36, 24, 10, 30, 20, 14])  # by hand
    caches = [(parser.get_parsed_content("train#datalist"), parser.get_parsed_content("train#preprocessing")),
              (parser.get_parsed_content("validate#datalist"), parser.get_parsed_content("validate#preprocessing"))]
    estimate = task_cache_bytes(caches, 1.0)[0]
    assert abs(estimate - held) <= 0.1 * held
    first_times_count = sum(len(d) * sum(
        v.numel() * v.element_size() for v in d._cache[0].values() if isinstance(v, torch.Tensor)) for d in (train, val))
    assert abs(first_times_count - held) > 0.1 * held  # the spread this test is about


def test_a_cache_that_would_not_fit_is_refused_naming_cache_rate_before_caching(tmp_path, monkeypatch):
    datalist = write_cxr(tmp_path, "cxr.json", 14, train=10, size=(120, 100))
    per_item = (64 * 64 + 14) * 4
    free = 5 * per_item / 0.9  # room for 5 of the 10 items
    monkeypatch.setattr(cache_module, "available_memory", lambda: free)
    loaded = []
    original = LoadImaged.__call__
    monkeypatch.setattr(LoadImaged, "__call__", lambda self, data, reader=None: loaded.append(1) or original(self, data, reader))
    with pytest.raises(Exception) as err:
        _parser("chestxray14_cls", datalist, roi_size=[64, 64], output_dir=str(tmp_path / "eval"),
                ckpt_dir=str(tmp_path / "models")).get_parsed_content("train#trainer")
    message = str(setting_error_in(err.value))
    assert "cache_rate=1 caches 10 item(s) in memory before training (training and validation)" in message
    assert ("cache_rate=0.5 (dira3d finetune --set cache_rate=0.5; --cache_rate 0.5 on a monai.bundle command line) "
            "caches the share that fits" in message)
    assert "cache_rate=0 caches none and reads every item from disk" in message
    assert len(loaded) <= 4  # the first and last entry of each list, for the estimate: nothing was cached
    # the share it names fits, and is cached
    parser = _parser("chestxray14_cls", datalist, roi_size=[64, 64], cache_rate=0.5)
    assert parser.get_parsed_content("train#dataset").cache_num + parser.get_parsed_content("validate#dataset").cache_num <= 5


def test_every_torchrun_process_of_a_node_counts(tmp_path, monkeypatch):
    datalist = write_cxr(tmp_path, "cxr.json", 14, train=4, size=(40, 40))
    entries = json.loads(datalist.read_text())["training"]
    for entry in entries:
        entry["image"] = str(tmp_path / entry["image"])
    transform = Compose([LoadImaged("image", reader="PILReader", image_only=True)])
    one = 40 * 40 * 4  # PIL's 8-bit image loaded as float32
    monkeypatch.setattr(cache_module, "available_memory", lambda: 8 * one)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert check_task_cache_memory([(entries, transform)], 1.0) == 4 * one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"in each of the 2 processes on this node") as err:
        check_task_cache_memory([(entries, transform)], 1.0)
    assert "--set cache_rate=0.9;" in str(err.value)


def test_an_entry_the_prefix_cannot_read_is_estimated_from_its_headers(tmp_path, monkeypatch):
    datalist = write_cxr(tmp_path, "cxr.json", 14, train=3, size=(40, 30))
    entries = json.loads(datalist.read_text())["training"]
    for entry in entries:
        entry["image"] = str(tmp_path / entry["image"])

    def fail(_):
        raise RuntimeError("not readable by this prefix")

    broken = Compose([LoadImaged("image", reader="PILReader", image_only=True), Lambdad("image", fail)])
    assert task_cache_bytes([(entries, broken)], 1.0) == (3 * 40 * 30 * 4, 3, 3)
    monkeypatch.setattr(cache_module, "available_memory", lambda: None)  # no memory figure: nothing refused
    assert check_task_cache_memory([(entries, broken), ([], None)], 1.0) == 3 * 40 * 30 * 4
    assert check_task_cache_memory([(entries, broken)], 0.0) == 0


def test_evaluate_json_caches_no_test_entry_even_where_a_cache_would_not_fit(tmp_path, monkeypatch):
    """The test evaluation reads each test entry once: evaluate.json cached them all first (LUNA16's test subsets 7-9,
    about 225k cubes: 110 GiB) for nothing. It caches none now, so memory never refuses it, and it scores every entry."""
    datalist = write_cxr(tmp_path, "cxr.json", 14, train=4, test=6, size=(120, 100))
    monkeypatch.setattr(cache_module, "available_memory", lambda: 1.0)  # not even one entry would fit
    dataset = _parser("chestxray14_cls", datalist, "evaluate.json", roi_size=[64, 64]).get_parsed_content("validate#dataset")
    assert len(dataset) == 6 and _held_bytes(dataset) == 0
    item = dataset[5]  # read and preprocessed at its use
    assert tuple(item["image"].shape[-2:]) == (64, 64) and item["label"].numel() == 14
