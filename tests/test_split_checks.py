"""What the early-stopping holdout and the test split hold for their metric (dira3d.evaluation.split_checks).

An AUC of one class is undefined (MONAI's ROCAUCMetric returned NaN with a generic warning: early stopping never
stopped, the first epoch's model was kept, metrics.json said null), and a mean Dice over empty masks rewards
predicting nothing (an empty prediction of an empty mask scores 1)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from dira3d.data.splits import assign_folds
from dira3d.evaluation import ForegroundDice, ForegroundIoU, load_split
from dira3d.evaluation.split_checks import describe_split, warn_test_split, warning_for_test_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _write(folder: Path, name: str, content: dict) -> Path:
    """A datalist and empty files for its entries (load_split checks that they exist)."""
    for key in ("training", "validation", "test"):
        for entry in content.get(key) or []:
            for field in ("image", "label"):
                if isinstance(entry.get(field), str):
                    (folder / entry[field]).write_bytes(b"")
    path = folder / name
    path.write_text(json.dumps(content))
    return path


def _pecad(n_patients: int = 12, per_patient: int = 2) -> list[dict]:
    """PE-CAD layout (`dira3d prepare pecad`): every candidate under training with the fold of its patient; the
    first candidate of a patient is an embolus, the others false positives."""
    fold_of = assign_folds([f"PE{p:02d}" for p in range(n_patients)], 3, 0)
    return [{"image": f"PE{p:02d}_{k}.nii.gz", "label": int(k == 0), "case_id": f"PE{p:02d}", "fold": fold_of[f"PE{p:02d}"]}
            for p in range(n_patients) for k in range(per_patient)]


def test_binary_holdout_of_one_class_is_refused_before_training(tmp_path):
    """PE-CAD at a small label fraction: one candidate per class is kept, the holdout could take neither the only
    positive nor the only negative patient from training, and its AUC was NaN every epoch (early stopping never
    stopped; the model of the first epoch was kept; `holdout` in metrics.json said null)."""
    path = _write(tmp_path, "pecad_datalist.json", {"training": _pecad(), "meta": {}})
    with pytest.raises(ValueError, match=r"AUC is undefined on the early-stopping holdout of datalist .*pecad_datalist\.json "
                                         r"\(label_fraction=0\.1, seed=0, holdout=0\.1, fold=0\): all its 1 candidate\(s\) "
                                         r"\(1 patient\(s\)\) are of class (0|1), because the 2 training candidates this "
                                         r"label fraction keeps have class .* in 1 patient\(s\) only.*--label-fraction"):
        load_split(path, "holdout", label_fraction=0.1, seed=0, fold=0)
    # the training part itself is not refused, and a larger fraction gives a holdout of both classes
    assert load_split(path, "train", label_fraction=0.1, seed=0, fold=0)
    held = load_split(path, "holdout", label_fraction=1.0, seed=0, fold=0)
    assert {e["label"] for e in held} == {0, 1}


def test_binary_test_split_of_one_class_is_refused_naming_the_split(tmp_path, capsys):
    training = [{"image": f"c{i}.nii.gz", "label": i % 2, "case_id": f"p{i // 2}"} for i in range(16)]
    test = [{"image": f"t{i}.nii.gz", "label": 0, "case_id": f"q{i}"} for i in range(4)]
    path = _write(tmp_path, "ncc_datalist.json", {"training": training, "test": test, "meta": {}})
    with pytest.raises(ValueError, match=r"AUC is undefined on the test split of datalist .*ncc_datalist\.json \(its 'test' "
                                         r"list\): all its 4 candidate\(s\) \(4 patient\(s\)\) are of class 0, none of class "
                                         r"1 \(positive\).*add candidates of the other class to its 'test' list"):
        load_split(path, "test")
    # a PE-CAD fold of false positives only
    entries = _pecad()
    for entry in entries:
        if entry["fold"] == 1:
            entry["label"] = 0
    folds = _write(tmp_path, "pecad_datalist.json", {"training": entries, "meta": {}})
    with pytest.raises(ValueError, match=r"test split of datalist .*pecad_datalist\.json \(fold 1 of its training entries\): "
                                         r"all its 8 candidate\(s\) \(4 patient\(s\)\) are of class 0.*test on another fold"):
        load_split(folds, "test", fold=1)
    assert {e["label"] for e in load_split(folds, "test", fold=0)} == {0, 1}
    # dira3d finetune says so before any training, in one error line
    from dira3d.evaluation.finetune import main

    code = main(["--bundle", "luna16_nodule_fpr", "--tiny", "--datalist", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("dira3d finetune: error: AUC is undefined on the test split of datalist"), err
    assert not (tmp_path / "out" / "models" / "model.pt").exists()


def test_multilabel_test_split_without_a_class_of_both_values_is_refused_before_training(tmp_path):
    """It was refused by the mean AUC at the end of the evaluation, after the whole training."""
    training = [{"image": f"{i}.png", "label": [float(i % 2), float(i % 3 == 0)], "case_id": f"p{i}"} for i in range(12)]
    test = [{"image": f"t{i}.png", "label": [1.0, 0.0], "case_id": f"q{i}"} for i in range(3)]
    path = _write(tmp_path, "cxr.json", {"training": training, "test": test, "meta": {}})
    with pytest.raises(ValueError, match=r"mean AUC is undefined on the test split \(3 sample\(s\)\): no class has both .*"
                                         r"\(the test split of datalist .*cxr\.json \(its 'test' list\)"):
        load_split(path, "test")
    test[0]["label"] = [0.0, 0.0]  # class 0 has both values now: scored (class 1 is left out, and named after the run)
    path = _write(tmp_path, "cxr.json", {"training": training, "test": test, "meta": {}})
    assert len(load_split(path, "test")) == 3
    # only the last class has both values: scored too (every class is looked at, the last one included)
    test = [{"image": f"t{i}.png", "label": [1.0, float(i == 0)], "case_id": f"q{i}"} for i in range(3)]
    path = _write(tmp_path, "cxr.json", {"training": training, "test": test, "meta": {}})
    assert len(load_split(path, "test")) == 3


def test_a_label_that_is_not_numbers_gets_the_label_error_not_a_type_error(tmp_path):
    """The AUC check reads each label; a hand-made multi-label datalist with a blank (null) label value crashed it
    with a bare ``TypeError: float() argument must be ... not 'NoneType'`` naming no file, before the label check
    that names the datalist and the entry (and, without ``num_labels``, the split loaded as it did before)."""
    training = [{"image": f"{i}.png", "label": [float(i % 2), float(i % 3 == 0)], "case_id": f"p{i}"} for i in range(12)]
    test = [{"image": f"t{i}.png", "label": [float(i % 2), None], "case_id": f"q{i}"} for i in range(3)]
    path = _write(tmp_path, "cxr.json", {"training": training, "test": test, "meta": {}})
    with pytest.raises(ValueError, match=r"datalist .*cxr\.json: entry 0 of split 'test' .* has label \[0\.0, None\]; "
                                         r"expected a list of 2 numbers"):
        load_split(path, "test", num_labels=2)
    assert len(load_split(path, "test")) == 3  # dira3d finetune's up-front check (no num_labels): left to the above
    # a binary datalist given to a multi-label bundle: the label error, not the AUC advice for a one-class test list
    binary = [{"image": f"c{i}.nii.gz", "label": i % 2, "case_id": f"p{i}"} for i in range(8)]
    one_class = [{"image": f"t{i}.nii.gz", "label": 0, "case_id": f"q{i}"} for i in range(3)]
    path = _write(tmp_path, "ncc.json", {"training": binary, "test": one_class, "meta": {}})
    with pytest.raises(ValueError, match=r"entry 0 of split 'test' .* has label 0; expected a list of 14 numbers"):
        load_split(path, "test", num_labels=14)
    # true / false in place of 1.0 / 0.0 are not numbers either: left to the label check, not refused by the AUC check
    # (here every class has one value, which the AUC check would refuse with its own advice)
    flags = [{"image": f"t{i}.png", "label": [True, False], "case_id": f"q{i}"} for i in range(3)]
    path = _write(tmp_path, "flags.json", {"training": training, "test": flags, "meta": {}})
    assert len(load_split(path, "test")) == 3
    with pytest.raises(ValueError, match=r"entry 0 of split 'test' .* has label \[True, False\]"):
        load_split(path, "test", num_labels=2)


def test_describe_split_counts_positives_of_each_kind():
    binary = [{"label": k, "case_id": f"p{i}"} for i, k in enumerate([0, 1, 0, 0])]
    assert describe_split(binary) == {"cases": 4, "patients": 4, "positive": 1}
    multi = [{"label": [1.0, 0.7, 0.0], "case_id": "p"}, {"label": [0.0, 0.3, 0.0], "case_id": "q"}]
    assert describe_split(multi) == {"cases": 2, "patients": 2, "positive": [1, 1, 0]}  # soft labels at 0.5
    siim = [{"label": f"{i}.png", "case_id": f"p{i // 2}", "pneumothorax": int(i == 3)} for i in range(6)]
    assert describe_split(siim) == {"cases": 6, "patients": 3, "positive": 1}
    lidc = [{"label": f"{i}.nii.gz", "case_id": "p", "voxels": [0, 12][i]} for i in range(2)]
    assert describe_split(lidc)["positive"] == 1
    # LiTS, BraTS, Montgomery, generic: no flag, so not known from the datalist; the masks the metric scored tell
    plain = [{"label": f"{i}.nii.gz", "case_id": f"p{i}"} for i in range(3)]
    assert describe_split(plain) == {"cases": 3, "patients": 3, "positive": None}
    assert describe_split(plain, {"cases": 3, "positive": 2}) == {"cases": 3, "patients": 3, "positive": 2}
    assert describe_split(siim, {"cases": 6, "positive": 0})["positive"] == 0  # the masks win over the flags


def test_warning_for_a_segmentation_test_split_of_no_or_few_masks_with_foreground():
    path = Path("/data/siim_datalist.json")
    none = warning_for_test_split(path, "segmentation", {"cases": 12, "patients": 6, "positive": 0})
    assert none.startswith("the test split of datalist /data/siim_datalist.json (its 'test' list) has no case with "
                           "foreground (0 of 12 ground-truth masks)") and "predicting nothing everywhere scores 1.0" in none
    few = warning_for_test_split(path, "segmentation", {"cases": 12, "patients": 6, "positive": 3}, fold=2)
    assert few.startswith("the test split of datalist /data/siim_datalist.json (fold 2 of its training entries) has only "
                          "3 of 12 cases with foreground") and "predicting nothing everywhere scores 0.75" in few
    for fine in ({"cases": 100, "positive": 22},  # SIIM-ACR's share of pneumothoraces
                 {"cases": 3, "positive": 2},  # few cases, but mostly with foreground (a small Montgomery test list)
                 {"cases": 4, "positive": None}):  # not known
        assert warning_for_test_split(path, "segmentation", dict(fine, patients=1)) is None, fine
    # the bounds: fewer than FEW_POSITIVE (5) cases with foreground *and* fewer than half the cases
    assert "has only 4 of 20 cases" in warning_for_test_split(path, "segmentation", {"cases": 20, "positive": 4})
    assert warning_for_test_split(path, "segmentation", {"cases": 20, "positive": 5}) is None
    assert warning_for_test_split(path, "segmentation", {"cases": 8, "positive": 4}) is None  # half
    assert "has only 4 of 9 cases" in warning_for_test_split(path, "segmentation", {"cases": 9, "positive": 4})
    # a binary classification split is refused earlier when it has one class; its positives are not about Dice
    assert warning_for_test_split(path, "classification", {"cases": 12, "patients": 6, "positive": 0}) is None


def test_warning_names_the_classes_a_mean_auc_leaves_out_and_is_given_once(tmp_path):
    path = tmp_path / "chexpert_datalist.json"
    summary = {"cases": 4, "patients": 4, "positive": [2, 0, 4, 1]}
    message = warning_for_test_split(path, "multilabel", summary, class_names=["Atelectasis", "Cardiomegaly", "Consolidation"])
    assert message == (f"the test split of datalist {path} (its 'test' list): 2 of 4 classes have one value in all its 4 "
                       "image(s) and are left out of the mean AUC: Cardiomegaly (all negative), Consolidation (all positive); "
                       "the mean AUC is over the other 2 classes, so it is not comparable with a mean over all of them")
    assert warning_for_test_split(path, "multilabel", dict(summary, positive=[2, 1, 3, 1])) is None
    # every class of one value: refused before training (check_auc_defined), nothing to warn about after it
    assert warning_for_test_split(path, "multilabel", dict(summary, positive=[0, 4, 4, 0])) is None
    with pytest.warns(UserWarning, match="2 of 4 classes have one value"):
        warn_test_split(path, "multilabel", summary)
    with warnings.catch_warnings():  # an experiment grid tests the same split many times: warned once
        warnings.simplefilter("error")
        warn_test_split(path, "multilabel", summary)


def test_foreground_dice_counts_the_cases_with_foreground_it_scores():
    empty, full = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    engine = Engine(lambda engine, batch: batch)
    ForegroundDice(save_details=False).attach(engine, "dice")
    ForegroundIoU(save_details=False).attach(engine, "iou")
    # decollated lists (the bundles' from_engine) and batch-first tensors
    engine.run([[[empty, full], [empty, empty]], [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)]])
    assert engine.state.metrics["dice"] == pytest.approx(2 / 3)  # both empty scores 1: 1, 0, 1
    assert engine.state.foreground_cases == {"dice": {"cases": 3, "positive": 0}, "iou": {"cases": 3, "positive": 0}}
    engine.run([[[full], [full]]])  # counted again for every run (each validation of the holdout)
    assert engine.state.foreground_cases["dice"] == {"cases": 1, "positive": 1}
    one_voxel = torch.zeros(1, 4, 4)
    one_voxel[0, 1, 2] = 1
    engine.run([[[empty, empty], [one_voxel, empty]]])  # any voxel above 0 is foreground, one is enough
    assert engine.state.foreground_cases["dice"] == {"cases": 2, "positive": 1}


@pytest.mark.slow
def test_finetune_warns_about_a_test_split_of_empty_masks_and_records_the_splits(tmp_path):
    """SIIM-ACR: most images have no pneumothorax, so a small test list can hold none; its mean Dice then rewarded
    predicting nothing, without a word. The masks are counted as the metric scores them (no flag needed)."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from test_bundles_2d import write_cxr

    from dira3d.evaluation.finetune import run_finetune

    datalist = write_cxr(tmp_path / "data", "siim_datalist.json", None, train=8, test=4)
    for entry in json.loads(datalist.read_text())["test"]:
        Image.fromarray(np.zeros((56, 72), np.uint8)).save(tmp_path / "data" / entry["label"])
    with pytest.warns(UserWarning) as caught:
        result = run_finetune("siim_pneumothorax_seg", {"datalist": str(datalist), "seed": 0}, output_dir=tmp_path / "out",
                              tiny=True)
    ours = [str(w.message) for w in caught if "ground-truth masks" in str(w.message)]
    assert ours == [f"the test split of datalist {datalist} (its 'test' list) has no case with foreground (0 of 4 "
                    "ground-truth masks): its mean Dice and IoU score an empty prediction of an empty mask as 1, so they "
                    "only say how often the model predicts nothing, and predicting nothing everywhere scores 1.0; test on "
                    "a split with cases with foreground: prepare the datalist again with another split `--seed` (or a "
                    "larger `--test-fraction`), or add such cases to its test list"]
    recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert recorded["splits"] == result["splits"]
    assert recorded["splits"]["test"] == {"cases": 4, "patients": 2, "positive": 0}
    holdout = recorded["splits"]["holdout"]  # two images of one patient; write_cxr leaves every fourth image empty
    held = load_split(datalist, "holdout", seed=0)
    assert holdout == {"cases": len(held), "patients": 1,
                       "positive": sum(bool(np.asarray(Image.open(e["label"])).any()) for e in held)}
