"""The bundles' disk cache (``cache_dir``, dira3d.engines.diskcache): a restart or a resume reads the preprocessed
entries back from disk instead of caching them again (about 17 minutes for 100 LiTS CTs at each start; LiTS at
native spacing and LUNA16 do not fit in memory at all).

What is pinned: the second run reads the files (the preprocessing is not run again) and gets what the memory cache
gives; a rewritten source or a changed preprocessing setting is never served from a stale file; the disk, not the
memory, is checked before anything is written, and a cache_dir without room is refused naming it; the temporary file
is written on cache_dir's file system (an atomic rename, so ranks never read a half-written file); files in cache_dir
that dira3d did not write are left alone.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import CacheDataset
from monai.transforms import Compose, Lambdad, LoadImaged, Resized, ScaleIntensityRanged, Spacingd
from monai.utils import set_determinism

import dira3d.engines.cache as cache_module
import dira3d.engines.diskcache as diskcache
from dira3d.engines import DiskCacheDataset, cached_dataset
from dira3d.engines.diskcache import SignalSafeCacheDataset
from dira3d.engines.diskcache import PARTIAL, transform_hashing
from dira3d.engines.inputs import setting_error_in
from dira3d.utils.warning_format import Dira3dWarning
from test_bundle_pretrain import write_volumes
from test_bundles_finetune import make_segmentation

REPO = Path(__file__).resolve().parents[1]
TASK_BUNDLES = ["brats_tumor_seg", "chestxray14_cls", "chexpert_cls", "lidc_nodule_seg", "lits_liver_seg",
                "luna16_nodule_fpr", "montgomery_lung_seg", "pecad_embolism_fpr", "siim_pneumothorax_seg"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _lidc(datalist: Path, **settings) -> ConfigParser:
    configs = REPO / "bundles" / "lidc_nodule_seg" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "tiny.json")])
    parser.update({"datalist": str(datalist), "num_workers": 0, **settings})
    parser.parse(True)
    return parser


def _pretrain(datalist: Path, **settings) -> ConfigParser:
    configs = REPO / "bundles" / "dira_pretrain" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "tiny.json")])
    parser.update({"datalist": str(datalist), "num_workers": 0, "patch_size": [16, 16, 8], **settings})
    parser.parse(True)
    return parser


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pt"))


def _count_preprocessing(monkeypatch) -> list:
    """Every entry DiskCacheDataset preprocesses (a cache miss), recorded."""
    calls = []
    original = DiskCacheDataset._pre_transform

    def counted(self, item):
        calls.append(item)
        return original(self, item)

    monkeypatch.setattr(DiskCacheDataset, "_pre_transform", counted)
    return calls


def _refusal(build) -> str:
    """The message of the setting error that stops ``build()`` (behind MONAI's config wrappers)."""
    with pytest.raises(Exception) as err:
        build()
    found = setting_error_in(err.value)
    assert found is not None, err.value
    return str(found)


def _fill(*datasets) -> list:
    return [dataset[i] for dataset in datasets for i in range(len(dataset))]


def test_every_bundle_builds_its_datasets_through_the_factory_with_cache_dir():
    for bundle in TASK_BUNDLES + ["dira_pretrain"]:
        config = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())
        assert config["cache_dir"] == "", bundle  # default: the memory cache, as before
        for part in ("train", "validate"):
            assert config[part]["dataset"]["_target_"] == "dira3d.engines.cached_dataset", (bundle, part)
            assert config[part]["dataset"]["cache_dir"] == "@cache_dir", (bundle, part)
        assert "cache_dir=@cache_dir" in config["train"]["dataset"]["data"], bundle  # the disk check
    for bundle in TASK_BUNDLES:  # the test split is read once: neither memory nor disk
        evaluate = json.loads((REPO / "bundles" / bundle / "configs" / "evaluate.json").read_text())
        assert evaluate["validate#dataset#cache_dir"] == "", bundle


def test_default_is_the_memory_cache(tmp_path):
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    parser = _lidc(datalist)
    assert type(parser.get_parsed_content("train#dataset")) is SignalSafeCacheDataset  # a MONAI CacheDataset
    assert type(parser.get_parsed_content("validate#dataset")) is SignalSafeCacheDataset
    assert not list(tmp_path.rglob("*.pt"))


def test_task_bundle_second_run_reads_the_files_and_matches_the_memory_cache(tmp_path, monkeypatch, caplog):
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    cache_dir = tmp_path / "cache"
    calls = _count_preprocessing(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        first = _lidc(datalist, cache_dir=str(cache_dir))
        train, val = first.get_parsed_content("train#dataset"), first.get_parsed_content("validate#dataset")
    assert isinstance(train, DiskCacheDataset) and isinstance(val, DiskCacheDataset)
    assert f"caching on disk in {cache_dir} (cache_dir): 0 entries already there" in caplog.text
    assert "6 to write" in caplog.text
    _fill(train, val)
    assert len(calls) == 6 and len(_cache_files(cache_dir)) == 6
    calls.clear()
    caplog.clear()

    set_determinism(seed=0)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        second = _lidc(datalist, cache_dir=str(cache_dir))
        train, val = second.get_parsed_content("train#dataset"), second.get_parsed_content("validate#dataset")
    assert "6 entries already there" in caplog.text and "0 to write" in caplog.text
    from_disk = _fill(train, val)
    assert calls == []  # nothing preprocessed again: every entry came from its file
    assert len(_cache_files(cache_dir)) == 6

    set_determinism(seed=0)
    memory = _lidc(datalist)
    mem_train, mem_val = memory.get_parsed_content("train#dataset"), memory.get_parsed_content("validate#dataset")
    in_memory = _fill(mem_train, mem_val)
    set_determinism(seed=None)
    for cached, entry in zip(mem_train._cache, mem_train.data):  # the cached preprocessing, tensor for tensor
        on_disk = torch.load(train.cache_file(entry), weights_only=True)
        for key in ("image", "label"):
            assert torch.equal(torch.as_tensor(on_disk[key]), torch.as_tensor(cached[key]))
    for a, b in zip(from_disk, in_memory):  # and the random augmentation after it, for the same seed
        for key in ("image", "label"):
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))


def test_a_rewritten_source_is_preprocessed_again(tmp_path, monkeypatch):
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    cache_dir = tmp_path / "cache"
    train = _lidc(datalist, cache_dir=str(cache_dir)).get_parsed_content("train#dataset")
    _fill(train)
    entry = train.data[0]
    image = Path(entry["image"])
    import nibabel as nib

    before = os.stat(image)
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), 0.5, np.float32), np.eye(4)), str(image))  # prepared again
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    calls = _count_preprocessing(monkeypatch)
    train = _lidc(datalist, cache_dir=str(cache_dir)).get_parsed_content("train#dataset")
    index = [e["case_id"] for e in train.data].index(entry["case_id"])
    item = train[index]
    assert [c["case_id"] for c in calls] == [entry["case_id"]]
    assert torch.allclose(torch.as_tensor(item["image"]), torch.tensor(0.5))  # the new content, not the stale file


def test_a_changed_preprocessing_setting_is_cached_again(tmp_path, monkeypatch):
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    cache_dir = tmp_path / "cache"
    _fill(_lidc(datalist, cache_dir=str(cache_dir)).get_parsed_content("train#dataset"))
    assert len(_cache_files(cache_dir)) == 5
    calls = _count_preprocessing(monkeypatch)
    train = _lidc(datalist, cache_dir=str(cache_dir), intensity_range=[0.0, 2.0]).get_parsed_content("train#dataset")
    _fill(train)
    assert len(calls) == 5 and len(_cache_files(cache_dir)) == 10


def test_runs_of_other_seeds_and_label_fractions_share_the_files(tmp_path, monkeypatch):
    """An experiment grid (methods x seeds x label fractions, `overrides: {cache_dir: FOLDER}`) preprocesses each
    entry once: the seed and the label fraction choose entries and drive the random transforms, not the cached
    prefix, so a run of another seed or fraction finds every entry it uses already there (docs/results.md)."""
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    cache_dir = tmp_path / "cache"
    parser = _lidc(datalist, cache_dir=str(cache_dir), seed=0)
    _fill(parser.get_parsed_content("train#dataset"), parser.get_parsed_content("validate#dataset"))
    written = len(_cache_files(cache_dir))
    assert written == 6  # 5 training entries and 1 holdout entry
    calls = _count_preprocessing(monkeypatch)
    for seed, fraction in ((1, 1.0), (2, 0.5)):
        other = _lidc(datalist, cache_dir=str(cache_dir), seed=seed, label_fraction=fraction)
        _fill(other.get_parsed_content("train#dataset"), other.get_parsed_content("validate#dataset"))
    assert calls == [] and len(_cache_files(cache_dir)) == written


def test_transform_hash_covers_the_settings_that_matter():
    def digest(*transforms):
        return transform_hashing(list(transforms))

    load = LoadImaged(keys="image")
    assert digest(load, Spacingd("image", pixdim=(1, 1, 2.0))) != digest(load, Spacingd("image", pixdim=(1, 1, 1.0)))
    assert digest(load, Resized("image", spatial_size=(64, 64))) != digest(load, Resized("image", spatial_size=(96, 9)))
    assert (digest(load, ScaleIntensityRanged("image", a_min=-1000, a_max=400, b_min=0, b_max=1))
            != digest(load, ScaleIntensityRanged("image", a_min=-1000, a_max=500, b_min=0, b_max=1)))
    assert (digest(load, Lambdad("label", func=lambda x: x * 2))  # a config's $lambda: its code
            != digest(load, Lambdad("label", func=lambda x: x * 3)))
    assert (digest(load, Lambdad("label", func=functools.partial(np.clip, a_min=0, a_max=1)))
            != digest(load, Lambdad("label", func=functools.partial(np.clip, a_min=0, a_max=2))))
    assert digest(LoadImaged(keys="image"), Resized("image", spatial_size=(64, 64))) == digest(
        LoadImaged(keys="image"), Resized("image", spatial_size=(64, 64)))


def _bundle_hashes(bundles: list[str]) -> dict[str, str]:
    """The transform hash each bundle's training preprocessing gets (its deterministic prefix)."""
    from monai.data import PersistentDataset

    out = {}
    for bundle in bundles:
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
        parser.parse(True)
        transform = parser.get_parsed_content("preprocessing" if bundle == "dira_pretrain" else "train#preprocessing")
        out[bundle] = PersistentDataset([], transform, None, hash_transform=transform_hashing).transform_hash
    return out


_HASHES = ("import json, sys; sys.path.insert(0, sys.argv[1]); from test_engines_diskcache import _bundle_hashes; "
           "print(json.dumps(_bundle_hashes(sys.argv[2:])))")


@pytest.mark.slow  # a second Python process parses the ten bundles (15-25 s on a loaded 2-core CPU)
def test_every_bundle_has_one_transform_hash_in_every_process():
    """MONAI's pickle_hashing fails on the classification bundles (a Lambdad of a config $lambda); the hash must
    also not depend on the process (PYTHONHASHSEED orders sets), or every start would write the cache again."""
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"  # another string hash than this process's
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _HASHES, str(Path(__file__).parent), *TASK_BUNDLES, "dira_pretrain"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    other = json.loads(done.stdout.strip().splitlines()[-1])
    assert _bundle_hashes(TASK_BUNDLES + ["dira_pretrain"]) == other
    assert len(set(other.values())) == len(other)  # every bundle's preprocessing its own


def test_pretrain_second_run_reads_the_files(tmp_path, monkeypatch, caplog):
    datalist = write_volumes(tmp_path, shape=(24, 24, 12))
    cache_dir = tmp_path / "cache"
    calls = _count_preprocessing(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        parser = _pretrain(datalist, cache_dir=str(cache_dir))
        train, val = parser.get_parsed_content("train#dataset"), parser.get_parsed_content("validate#dataset")
    assert isinstance(train, DiskCacheDataset) and isinstance(val, DiskCacheDataset)
    need = 4 * 24 * 24 * 12 * 4 / 2**20  # the 4 training volumes as float32 (validation reads the same files)
    assert f"0 entries already there (0.0 MiB), 4 to write at their first use (about {need:.1f} MiB)" in caplog.text
    _fill(train, val)  # validation on the training list (visual_words): the same files
    assert len(calls) == 4 and len(_cache_files(cache_dir)) == 4
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dira3d.engines.diskcache"):
        parser = _pretrain(datalist, cache_dir=str(cache_dir))
        train = parser.get_parsed_content("train#dataset")
    size = sum(f.stat().st_size for f in _cache_files(cache_dir)) / 2**20
    assert f"4 entries already there ({size:.1f} MiB), 0 to write at their first use (about 0.0 MiB)" in caplog.text
    item = train[0]
    assert calls == [] and tuple(item["image"].shape) == (1, 16, 16, 8)
    memory = _pretrain(datalist).get_parsed_content("train#dataset")
    for cached, entry in zip(memory._cache, memory.data):
        assert torch.equal(torch.load(train.cache_file(entry), weights_only=True)["image"], cached["image"])


def test_the_disk_is_checked_not_the_memory(tmp_path, monkeypatch, caplog):
    datalist = write_volumes(tmp_path, shape=(24, 24, 12))
    monkeypatch.setattr(cache_module, "available_memory", lambda: 1000)  # bytes: nothing fits in memory
    message = _refusal(lambda: _pretrain(datalist).get_parsed_content("train#dataset"))
    assert "num_samples_cache=1 caches 4 volume(s) in memory" in message
    assert message.endswith("or keep them on disk instead (--override cache_dir=FOLDER: read back at every restart)")
    _pretrain(datalist, cache_dir=str(tmp_path / "cache")).get_parsed_content("train#dataset")  # not refused

    seg, _ = make_segmentation(tmp_path / "seg", "lidc.json", (16, 16, 8), None)
    message = _refusal(lambda: _lidc(seg).get_parsed_content("train#dataset"))
    assert "cache_rate=1 caches 6 item(s) in memory" in message
    assert message.endswith("or keep them on disk instead (cache_dir=FOLDER: read back at every restart; "
                            "dira3d finetune --set cache_dir=FOLDER)")
    _lidc(seg, cache_dir=str(tmp_path / "cache2")).get_parsed_content("train#dataset")


@pytest.mark.parametrize("bundle", ["lidc_nodule_seg", "dira_pretrain"])
def test_a_cache_dir_without_room_is_refused_before_anything_is_written(bundle, tmp_path, monkeypatch):
    if bundle == "dira_pretrain":
        datalist, make = write_volumes(tmp_path, shape=(24, 24, 12)), _pretrain
    else:
        datalist, make = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)[0], _lidc
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(diskcache, "disk_free", lambda folder: 4096)
    message = _refusal(lambda: make(datalist, cache_dir=str(cache_dir)).get_parsed_content("train#dataset"))
    assert message.startswith(f"cache_dir={cache_dir}: the ") and "GiB is free on its file system" in message
    assert "set cache_dir to a folder on a larger disk" in message
    assert not cache_dir.exists()


def test_disk_free_reads_the_nearest_existing_folder(tmp_path):
    assert diskcache.disk_free(tmp_path / "not" / "yet") == shutil.disk_usage(tmp_path).free > 0


def test_a_cache_dir_that_is_a_file_is_named(tmp_path):
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    (tmp_path / "afile").write_text("mine")
    message = _refusal(lambda: _lidc(datalist, cache_dir=str(tmp_path / "afile")).get_parsed_content("train#dataset"))
    assert f"cache_dir={tmp_path / 'afile'} is not a folder" in message
    assert (tmp_path / "afile").read_text() == "mine"


def test_files_are_moved_into_place_within_the_cache_dir_file_system(tmp_path, monkeypatch):
    """MONAI writes the file to the system's temporary folder and then moves it: across file systems a copy, which
    another rank can read half-written and a killed run leaves truncated. Here it is written in cache_dir/.partial
    and renamed."""
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    cache_dir = tmp_path / "cache"
    moves = []
    original = shutil.move

    def move(src, dst, *args, **kwargs):
        moves.append((Path(src), Path(dst)))
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "move", move)
    _fill(_lidc(datalist, cache_dir=str(cache_dir)).get_parsed_content("train#dataset"))
    assert len(moves) == 5
    for src, dst in moves:
        assert src.parent.parent == cache_dir / PARTIAL and dst.parent == cache_dir
    assert list((cache_dir / PARTIAL).iterdir()) == []  # the temporary folders are gone


def test_files_dira3d_did_not_write_are_left_alone(tmp_path):
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "mine.txt").write_text("the user's")
    dataset = _lidc(datalist, cache_dir=str(cache_dir)).get_parsed_content("train#dataset")
    _fill(dataset)
    dataset.set_data(dataset.data[:2])  # MONAI's removes the whole folder
    assert (cache_dir / "mine.txt").read_text() == "the user's" and len(_cache_files(cache_dir)) == 5


def test_cached_dataset_passes_the_memory_settings_only_to_the_memory_cache(tmp_path):
    data = [{"x": 1}]
    memory = cached_dataset(data, Compose([]), cache_rate=0.0, cache_dir="", progress=False, copy_cache=False)
    assert type(memory) is SignalSafeCacheDataset and isinstance(memory, CacheDataset) and memory.cache_num == 0
    disk = cached_dataset(data, Compose([]), cache_rate=0.0, cache_dir=str(tmp_path / "c"), progress=False)
    assert isinstance(disk, DiskCacheDataset) and disk[0] == {"x": 1} and len(_cache_files(tmp_path / "c")) == 1


def _ranks_worker(rank: int, init_file: str, out: str) -> None:
    """Both ranks read every entry of one dataset in one cache_dir at once (as two torchrun ranks do in validation)."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from dira3d.engines.diskcache import DiskCacheDataset as Disk
    from monai.transforms import EnsureChannelFirstd as Channel
    from monai.transforms import LoadImaged as Load

    folder = Path(out).parent
    entries = json.loads((folder / "entries.json").read_text())
    dataset = Disk(entries, Compose([Load(keys="image", image_only=True), Channel(keys="image")]), folder / "cache")
    sums = [float(dataset[i]["image"].sum()) for i in range(len(dataset))]
    torch.save(torch.tensor(sums, dtype=torch.float64), f"{out}.{rank}")


@pytest.mark.slow
def test_two_ranks_share_one_cache_dir(tmp_path):
    from conftest import run_two_gloo_ranks

    datalist = write_volumes(tmp_path, count=6, shape=(24, 24, 12))
    entries = [{"image": str(tmp_path / e["image"])} for e in json.loads(datalist.read_text())["training"]]
    (tmp_path / "entries.json").write_text(json.dumps(entries))
    sums = run_two_gloo_ranks(_ranks_worker, tmp_path)
    assert torch.equal(sums[0], sums[1])
    files = _cache_files(tmp_path / "cache")
    assert len(files) == len(entries)
    import nibabel as nib

    expected = sorted(float(np.asarray(nib.load(e["image"]).dataobj, dtype=np.float32).sum()) for e in entries)
    loaded = sorted(float(torch.load(f, weights_only=True)["image"].sum()) for f in files)
    assert np.allclose(loaded, expected) and np.allclose(sorted(sums[0].tolist()), expected)


def test_a_truncated_file_is_named_and_written_again(tmp_path):
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    cache_dir = tmp_path / "cache"
    dataset = _lidc(datalist, cache_dir=str(cache_dir)).get_parsed_content("validate#dataset")
    expected = dataset[0]
    path = dataset.cache_file(dataset.data[0])
    whole = path.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 30):  # what a killed copy across file systems leaves
        path.write_bytes(whole[:cut])
        with pytest.warns(Dira3dWarning, match=f"cache_dir: {path} is truncated or unreadable"):
            item = dataset[0]
        assert torch.equal(torch.as_tensor(item["image"]), torch.as_tensor(expected["image"]))
        assert torch.equal(torch.load(path, weights_only=True)["image"], torch.as_tensor(expected["image"]))


@pytest.mark.slow
def test_fine_tuning_twice_on_disk_trains_as_in_memory(tmp_path, monkeypatch):
    """dira3d finetune's run (train.json, then evaluate.json on the test split), tiny LIDC, 1 epoch: in memory, then
    with cache_dir twice; the second run preprocesses nothing and all three give the same metrics."""
    from dira3d.evaluation.finetune import run_finetune

    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    calls = _count_preprocessing(monkeypatch)
    results = []
    for name, extra in (("memory", {}), ("disk1", {"cache_dir": str(tmp_path / "cache")}),
                        ("disk2", {"cache_dir": str(tmp_path / "cache")})):
        calls.clear()
        result = run_finetune("lidc_nodule_seg", {"datalist": str(datalist), "max_epochs": 1, **extra},
                              output_dir=tmp_path / name, tiny=True)
        results.append((len(calls), result["metrics"], result["holdout"]))
    assert [r[0] for r in results] == [0, 6, 0]  # 5 training + 1 holdout entries written once, then read
    assert results[0][1:] == results[1][1:] == results[2][1:]
    assert len(_cache_files(tmp_path / "cache")) == 6


def test_a_cache_dir_that_cannot_take_the_partial_folder_still_serves_its_entries(tmp_path, monkeypatch):
    """A shared cache_dir that this user cannot write: cache_dir/.partial cannot be made; the entries there are read
    and a missing one is preprocessed (MONAI's own handling of an unwritable cache), not a PermissionError."""
    datalist, _ = make_segmentation(tmp_path, "lidc.json", (16, 16, 8), None)
    cache_dir = tmp_path / "cache"
    dataset = _lidc(datalist, cache_dir=str(cache_dir)).get_parsed_content("validate#dataset")
    expected = dataset[0]
    original = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name == PARTIAL:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    shutil.rmtree(cache_dir / PARTIAL)
    assert torch.equal(torch.as_tensor(dataset[0]["image"]), torch.as_tensor(expected["image"]))  # read back
    dataset.cache_file(dataset.data[0]).unlink()
    assert torch.equal(torch.as_tensor(dataset[0]["image"]), torch.as_tensor(expected["image"]))  # preprocessed
