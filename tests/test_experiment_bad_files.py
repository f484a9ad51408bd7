"""``dira3d experiment`` walked as a new user would (2026-11-28): a damaged scan in the datalist, and a t-test on values
that are one value up to float rounding.

A truncated or corrupt image among the fine-tuning entries failed every run of the grid with MONAI's wrapper
(``RuntimeError: Failed to instantiate component 'dira3d.engines.cached_dataset' ... set '_mode_=debug'``) in the log
and in ``failures.json``, and ``dira3d finetune`` ended in a 260-line traceback: the task bundles' ``train.json``
loaded images with plain ``LoadImaged``, whose reader error is no setting error the commands report in one line.
They now load with ``dira3d.engines.inputs.LoadVolumed`` (as their ``inference.json`` and the pretraining do), whose
error names the file and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml
from monai.bundle import ConfigParser
from monai.transforms import LoadImaged

from dira3d.engines.inputs import LoadVolumed, setting_error_in
from dira3d.evaluation.experiment import load_config, run_experiment
from dira3d.evaluation.stats import aggregate, compare_to_baseline
from test_bundles_finetune import make_classification

REPO = Path(__file__).resolve().parents[1]
TASK_BUNDLES = ["brats_tumor_seg", "chestxray14_cls", "chexpert_cls", "lidc_nodule_seg", "lits_liver_seg",
                "luna16_nodule_fpr", "montgomery_lung_seg", "pecad_embolism_fpr", "siim_pneumothorax_seg"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("bundle", TASK_BUNDLES)
def test_a_damaged_training_image_is_named_in_one_line(tmp_path, bundle):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    parser.update({"datalist": str(tmp_path / "none.json"), "num_workers": 0})
    parser.parse(True)
    for split in ("train", "validate"):
        loaders = [t for t in parser.get_parsed_content(f"{split}#preprocessing").transforms if isinstance(t, LoadImaged)]
        assert loaders, (bundle, split)
        for loader in loaders:
            suffix = ".png" if getattr(loader._loader, "reader", None) is not None else ".nii.gz"
            bad = tmp_path / f"case{suffix}"
            bad.write_bytes(b"\x1f\x8b\x08\x00 cut short")  # a gzip header and no more: a copy that did not finish
            with pytest.raises(Exception) as info:
                loader({key: str(bad) for key in loader.keys})
            error = setting_error_in(info.value)  # what dira3d finetune and dira3d experiment print as one line
            assert error is not None and str(bad) in str(error) and "\n" not in str(error), (bundle, split, info.value)
            assert isinstance(loader, LoadVolumed)


def test_a_damaged_png_in_2d_pretraining_is_named_in_one_line(tmp_path):
    """The pretraining bundle's 2d.json read its PNGs with plain LoadImaged(PILReader): a PNG cut short failed in
    MONAI's traceback without the file's name (dira_pretrain 0.1.41: LoadVolumed, the same reader)."""
    from PIL import Image

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / "dira_pretrain" / "configs" / name) for name in ("train.json", "2d.json")])
    preprocessing = parser.get_parsed_content("preprocessing")
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)).save(good)
    bad.write_bytes(good.read_bytes()[:60])
    assert preprocessing({"image": str(good)})["image"].shape == (1, 224, 224)  # read as before
    with pytest.raises(Exception) as info:
        preprocessing({"image": str(bad)})
    error = setting_error_in(info.value)
    assert error is not None and str(bad) in str(error) and "\n" not in str(error), info.value


@pytest.mark.slow
def test_a_damaged_cube_fails_the_grid_s_runs_naming_the_file(tmp_path):
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    bad = tmp_path / "data" / json.loads(datalist.read_text())["training"][3]["image"]
    bad.write_bytes(bad.read_bytes()[:100])
    config = {"bundle": "luna16_nodule_fpr", "datalist": str(datalist), "metric": "auc",
              "output_dir": str(tmp_path / "out"), "seeds": [0], "label_fractions": [1.0], "methods": {"random": None},
              "overrides": {"tiny": True, "max_epochs": 1}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    logged: list[str] = []
    with pytest.raises(Exception, match="1 of 1 runs failed"):
        run_experiment(load_config(tmp_path / "experiment.yaml"), log=logged.append)
    (failure,) = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert str(bad) in failure["error"] and "truncated, corrupt or not an image" in failure["error"]
    assert "_mode_=debug" not in failure["error"]
    assert any(str(bad) in line and "FAILED" in line for line in logged)


@pytest.mark.parametrize("equal_var", [True, False])  # Student's, Welch's
def test_values_equal_up_to_float_rounding_give_no_p_value(equal_var):
    # 0.75 in every seed but for one rounding step, against 0.65 in every seed: t ~ 1e15, p ~ 1e-61 (Student)
    dira = [0.75, 0.75, float(np.nextafter(0.75, 1.0))]
    rows = [{"method": method, "label_fraction": 1.0, "seed": seed, "auc": value}
            for method, values in (("random", [0.65] * 3), ("dira", dira)) for seed, value in enumerate(values)]
    cells = {c.method: c for c in compare_to_baseline(aggregate(rows, "auc"), "random", equal_var=equal_var)}
    assert cells["dira"].p_value is None
    # a real spread on one side is still tested
    rows[-1]["auc"] = 0.76
    cells = {c.method: c for c in compare_to_baseline(aggregate(rows, "auc"), "random", equal_var=equal_var)}
    assert cells["dira"].p_value is not None and cells["dira"].p_value < 0.05


def test_a_cropped_entry_is_written_to_cache_dir_at_its_own_size(tmp_path):
    """``overrides: {cache_dir: ...}`` (docs/results.md) with the tiny LUNA16 preset: each 16 x 16 x 8 crop of a
    64 x 64 x 32 cube was saved with the cube's whole storage, 512 KiB a file instead of 8 KiB; the start-up line had
    estimated 0.8 MiB for the 102 entries that then took 51 MiB."""
    from monai.data import MetaTensor
    from monai.transforms import CenterSpatialCropd, Compose

    from dira3d.engines.diskcache import DiskCacheDataset

    cube = MetaTensor(torch.rand(1, 64, 64, 32))
    for size in ((16, 16, 8), (16, 64, 32)):  # a strided view, and one whose elements lie together
        folder = tmp_path / "x".join(map(str, size))
        dataset = DiskCacheDataset([{"image": cube, "case": 0}], Compose([CenterSpatialCropd("image", size)]), folder)
        item = dataset[0]
        assert tuple(item["image"].shape) == (1, *size)
        (written,) = folder.glob("*.pt")
        own = int(np.prod(size)) * 4
        assert written.stat().st_size < own + 64 * 1024, (size, written.stat().st_size)  # the crop and the meta data
        again = DiskCacheDataset([{"image": cube, "case": 0}], Compose([CenterSpatialCropd("image", size)]), folder)[0]
        assert np.array_equal(np.asarray(again["image"]), np.asarray(item["image"]))  # read back from the file


def test_a_damaged_volume_of_a_prepared_segmentation_datalist_is_named_alone(tmp_path):
    """Walk of 2026-11-28: one truncated volume of a `dira3d prepare lits` datalist failed the grid's runs with
    `DataError: .../volumes/lits-002.nii.gz, .../labels/lits-002.nii.gz: cannot be loaded ...; the file is truncated`:
    both files of the entry were named as damaged, the intact mask too. Now the one that cannot be loaded is named."""
    import SimpleITK as sitk

    from dira3d.data import lits
    from dira3d.data.io import xyz_to_image
    from dira3d.evaluation import load_split

    src = tmp_path / "LiTS" / "Training Batch 1"
    src.mkdir(parents=True)
    for number in range(3):
        hu = np.full((24, 20, 12), -900, np.int16)
        hu[4:16, 4:14, 2:9] = 60
        for name, array in ((f"volume-{number}.nii", hu), (f"segmentation-{number}.nii", (hu > 0).astype(np.uint8))):
            sitk.WriteImage(xyz_to_image(array), str(src / name))
    dst = tmp_path / "prepared"
    lits.prepare(src.parent, dst, progress=False)
    volume = dst / "volumes" / "lits-001.nii.gz"
    volume.write_bytes(volume.read_bytes()[:-40])  # a copy cut short
    entry = next(e for e in load_split(dst / "lits_datalist.json", "train", holdout=0.34)
                 + load_split(dst / "lits_datalist.json", "holdout", holdout=0.34) if e["image"] == str(volume))
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "lits_liver_seg" / "configs" / "train.json"))
    parser.update({"datalist": str(dst / "lits_datalist.json"), "num_workers": 0})
    parser.parse(True)
    loader = next(t for t in parser.get_parsed_content("train#preprocessing").transforms if isinstance(t, LoadVolumed))
    with pytest.raises(Exception) as info:
        loader(entry)
    error = setting_error_in(info.value)
    assert error is not None and str(volume) in str(error), info.value
    assert entry["label"] not in str(error)  # the intact mask is not called truncated
    loader({"image": entry["label"], "label": entry["label"]})  # it loads
