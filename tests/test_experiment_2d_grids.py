"""2D grids of ``dira3d experiment``, found by a user walkthrough (2026-11-28).

It refuses a datalist of images in other dimensions than the bundle's network before any run
(found by a user walkthrough of 2D grids, 2026-11-28): a 3D datalist (LUNA16's NIfTI cubes) given to a 2D bundle
failed every run one after the other, after the methods' pretrainings, with an error about its labels or the caching
of a volume; a 2D datalist given to a 3D bundle failed every run saying `3D pretraining needs 3D volumes`. A method's own pretraining with the pretraining bundle's
tiny configs (``2d_tiny.json``, ``tiny.json``) in a grid without ``overrides: {tiny: true}`` is refused naming that
way out too, not only the network settings (which fine-tuned at full size and for the bundle's full epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from PIL import Image

from dira3d.evaluation.experiment import load_config


def _datalist(root: Path, suffix: str, shape: tuple[int, ...]) -> Path:
    """A segmentation datalist of 6 patients whose images and masks are ``suffix`` files of ``shape``."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(8):
        names = {}
        for key in ("image", "label"):
            name = f"{key}_{i}{suffix}"
            array = np.zeros(shape, np.uint8)
            array[(slice(1, 4),) * len(shape)] = 1 if key == "label" else 200
            if suffix == ".png":
                Image.fromarray(array).save(root / name)
            else:
                sitk.WriteImage(sitk.GetImageFromArray(array), str(root / name))
            names[key] = name
        entries.append({**names, "case_id": f"p{i}"})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": entries[:6], "test": entries[6:]}))
    return path


def _config(tmp_path: Path, bundle: str, datalist: Path, **extra) -> Path:
    config = {"bundle": bundle, "datalist": str(datalist), "metric": "dice", "output_dir": "out", "seeds": [0],
              "label_fractions": [1.0], "methods": {"random": None}, "overrides": {"tiny": True}, **extra}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_3d_datalist_for_a_2d_bundle_is_refused_before_any_run(tmp_path):
    datalist = _datalist(tmp_path / "ct", ".nii.gz", (4, 8, 8))
    with pytest.raises(ValueError) as err:
        load_config(_config(tmp_path, "montgomery_lung_seg", datalist))
    message = str(err.value)
    assert f"datalist {datalist} in " in message and "experiment.yaml holds 3D images (training entry 0: " in message
    assert "image_0.nii.gz), but bundle 'montgomery_lung_seg' is 2D" in message
    assert "`dira3d prepare chestxray14`, `chexpert`, `siim`, `montgomery` or `radiographs`" in message
    assert not (tmp_path / "out").exists()


def test_a_2d_datalist_for_a_3d_bundle_is_refused_before_any_run(tmp_path):
    datalist = _datalist(tmp_path / "xr", ".png", (16, 16))
    with pytest.raises(ValueError, match=r"holds 2D images \(training entry 0: .*image_0\.png\), but bundle "
                                         r"'lits_liver_seg' is 3D, .*give the bundle a 3D datalist"):
        load_config(_config(tmp_path, "lits_liver_seg", datalist))


def test_a_2d_datalist_of_one_slice_volumes_is_not_taken_for_3d(tmp_path):
    """A NIfTI of one slice is a 2D image (the 2D bundles read it): its name alone does not refuse it."""
    datalist = _datalist(tmp_path / "slices", ".nii.gz", (16, 16))
    config = load_config(_config(tmp_path, "montgomery_lung_seg", datalist))
    assert config["bundle"] == "montgomery_lung_seg"
    datalist = _datalist(tmp_path / "png", ".png", (16, 16))  # and the datalist the bundle takes, of course
    assert load_config(_config(tmp_path, "montgomery_lung_seg", datalist))["bundle"] == "montgomery_lung_seg"


@pytest.mark.parametrize("bundle, suffix, shape, configs, built", [
    ("montgomery_lung_seg", ".png", (16, 16), ["train.json", "2d.json", "2d_moco.json", "2d_tiny.json"],
     "backbone resnet10, decoder_channels [16, 16, 8, 8, 8] from the pretrain configs"),
    ("lits_liver_seg", ".nii.gz", (4, 8, 8), ["train.json", "tiny.json"], "width 0.125 from the pretrain configs"),
])
def test_a_tiny_pretraining_in_a_full_size_grid_names_tiny_true(tmp_path, bundle, suffix, shape, configs, built):
    datalist = _datalist(tmp_path / "data", suffix, shape)
    methods = {"random": None, "dira": {"pretrain": {}}}
    pretrain = {"dataset_dir": str(tmp_path / "data"), "configs": configs}
    with pytest.raises(ValueError) as err:
        load_config(_config(tmp_path, bundle, datalist, methods=methods, pretrain=pretrain, overrides={}))
    message = str(err.value)
    assert f"method 'dira' pretrains its network with {built}" in message
    assert "in the experiment config; or, for a CPU-scale grid, `tiny: true` in those overrides: the bundle's " \
           "tiny.json, which builds that network" in message
    # a full-size pretraining in a tiny grid: tiny: true is set already, and is not the way out
    pretrain["configs"] = configs[:-1]
    with pytest.raises(ValueError) as err:
        load_config(_config(tmp_path, bundle, datalist, methods=methods, pretrain=pretrain))
    assert "pretrains its network with" in str(err.value) and "tiny: true" not in str(err.value)
    pretrain["configs"] = configs  # and both tiny: no error
    assert load_config(_config(tmp_path, bundle, datalist, methods=methods, pretrain=pretrain))["bundle"] == bundle


def _multilabel(root: Path) -> Path:
    """A prepared-layout chexpert_cls datalist (5 classes, meta.labels as `dira3d prepare chexpert` writes them) whose
    training images never have the last class, and whose test images never have the fourth."""
    from monai.bundle import ConfigParser

    from dira3d.evaluation.finetune import bundle_path

    names = ConfigParser.load_config_file(str(bundle_path("chexpert_cls") / "configs" / "train.json"))["class_names"]
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def entries(count: int, prefix: str, never: int) -> list[dict]:
        items = []
        for i in range(count):
            Image.fromarray((rng.random((64, 64)) * 200).astype(np.uint8)).save(root / "images" / f"{prefix}{i}.png")
            label = [0.0 if k == never else float((i + k) % 2) for k in range(5)]
            items.append({"image": f"images/{prefix}{i}.png", "case_id": f"{prefix}{i // 2}", "label": label})
        return items

    path = root / "chexpert_datalist.json"
    path.write_text(json.dumps({"training": entries(8, "tr", 4), "test": entries(4, "te", 3),
                                "meta": {"dataset": "chexpert", "labels": names}}))
    return path


def test_a_grid_names_the_classes_its_mean_auc_left_out_and_the_runs_trained_without_a_positive(tmp_path):
    """A class of one value in the test split is left out of every run's mean AUC, and a class of no positive in a
    run's training split was never shown to it: the runs warned of the first once, of the second not at all, and
    table.md said nothing of either, nor did a rerun that had nothing left to run."""
    from dira3d.evaluation.experiment import run_experiment
    from dira3d.utils.warning_format import Dira3dWarning

    datalist = _multilabel(tmp_path / "cxr")
    config = {"bundle": "chexpert_cls", "datalist": str(datalist), "metric": "auc", "output_dir": str(tmp_path / "grid"),
              "baseline": "random", "seeds": [0], "label_fractions": [1.0], "methods": {"random": None},
              "overrides": {"tiny": True, "max_epochs": 1}}
    with pytest.warns(Dira3dWarning) as caught:
        rows = run_experiment(dict(config), log=lambda message: None)
    assert len(rows) == 1
    warned = [str(w.message) for w in caught if "the training split of datalist" in str(w.message)]
    assert len(warned) == 1 and f"datalist {datalist} (label_fraction=1.0, split_seed=0): 1 of 5 classes have no " \
                                "positive in its 6 image(s): Pleural Effusion; " in warned[0]
    table = (tmp_path / "grid" / "table.md").read_text()
    assert ("\nMean AUC over 4 of 5 classes: the test split (4 images) holds Edema (all negative), one value "
            "only: no AUC, left out of the mean; not comparable with a mean over all the classes.\n") in table
    assert ("\nTrained without a positive of some class (the classifier learned to call it absent, so its test AUC "
            "says nothing of the initialisation; use a larger label fraction): random @ 100 % labels, seed 0 "
            "(Pleural Effusion).\n") in table
    (tmp_path / "grid" / "table.md").unlink()
    run_experiment(dict(config), log=lambda message: None)  # nothing left to run: the table says it again
    assert (tmp_path / "grid" / "table.md").read_text() == table


def test_the_training_split_warning_names_the_classes_and_where_their_only_positives_went():
    from dira3d.evaluation.split_checks import warning_for_training_split

    def entry(i: int, label: list[float]) -> dict:
        return {"image": f"{i}.png", "case_id": str(i), "label": label}

    train = [entry(0, [1.0, 0.0, 0.0]), entry(1, [0.0, 0.0, 1.0])]
    holdout = [entry(2, [0.0, 1.0, 0.0])]
    message = warning_for_training_split(Path("dl.json"), train, holdout, ["A", "B", "C"], "label_fraction=0.05")
    assert message == ("the training split of datalist dl.json (label_fraction=0.05): 1 of 3 classes have no positive "
                       "in its 2 image(s): B; the classifier learns to call them absent, so their test AUCs (in the mean "
                       "AUC) say nothing of what it learned; use a larger label fraction (B: the label subset's only "
                       "positive(s) went to the early-stopping holdout)")
    assert "went to" not in warning_for_training_split(Path("dl.json"), train, [], None)  # nowhere: class 1 named
    assert "class 1" in warning_for_training_split(Path("dl.json"), train, [], None)
    assert warning_for_training_split(Path("dl.json"), train + holdout, [], None) is None  # every class has one
    assert warning_for_training_split(Path("dl.json"), [{"image": "a", "case_id": "a", "label": "m.png"}], []) is None
