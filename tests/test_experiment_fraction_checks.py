"""``dira3d experiment`` refuses, before any run, a label fraction that no run could train on (found by a walkthrough
of docs/results.md, 2026-11-27): each run of it was refused at its start and the grid listed every one as failed.
The config check must refuse exactly the (fraction, seed) that the runs refuse: those whose ``load_split`` (the
bundle's train.json) raises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dira3d.evaluation.datalists import load_split
from dira3d.evaluation.experiment import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

FRACTIONS = (0.1, 0.2, 0.25, 0.5, 1.0)
SEEDS = (0, 1, 2)


def _datalist(tmp_path: Path, entries: list[dict]) -> Path:
    for entry in entries:  # the runs check that their entries' files exist: they must, for a like-for-like comparison
        for key in ("image", "label"):
            if isinstance(entry.get(key), str):
                (tmp_path / entry[key]).touch()
    classification = isinstance(entries[0]["label"], int)
    test = [{"image": f"t{i}.nii.gz", "label": i if classification else f"t{i}.nii.gz", "case_id": f"t{i}"} for i in (0, 1)]
    for entry in test:
        (tmp_path / entry["image"]).touch()
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": entries, "test": test}))
    return path


def _segmentation(count: int) -> list[dict]:
    return [{"image": f"p{i}_image.nii.gz", "label": f"p{i}_label.nii.gz", "case_id": f"p{i}"} for i in range(count)]


def _classification(negatives: int, positives: int) -> list[dict]:
    labels = [0] * negatives + [1] * positives
    return [{"image": f"c{i}.nii.gz", "label": label, "case_id": f"p{i}"} for i, label in enumerate(labels)]


def _config(tmp_path: Path, bundle: str, metric: str, fractions, seeds, **extra) -> Path:
    config = {"bundle": bundle, "datalist": "dl.json", "metric": metric, "output_dir": "out", "seeds": list(seeds),
              "label_fractions": list(fractions), "methods": {"random": None}, "overrides": {"tiny": True}, **extra}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run_refuses(datalist: Path, fraction: float, seed: int) -> bool:
    """Whether a run's splits (train.json: load_split of 'train', then 'holdout', holdout 0.1) are refused."""
    try:
        for split in ("train", "holdout"):
            load_split(datalist, split, label_fraction=fraction, seed=seed, holdout=0.1, fold=None)
    except ValueError:
        return True
    return False


def _config_refuses(tmp_path: Path, bundle: str, metric: str, fraction: float, seed: int) -> bool:
    try:
        load_config(_config(tmp_path, bundle, metric, [fraction], [seed]))
    except ValueError as err:
        assert "label_fractions in" in str(err), err
        return True
    return False


@pytest.mark.parametrize("bundle, metric, entries, mixed", [
    ("lits_liver_seg", "dice", _segmentation(1), False),   # no fraction helps
    ("lits_liver_seg", "dice", _segmentation(2), False),
    ("lits_liver_seg", "dice", _segmentation(6), True),
    ("lits_liver_seg", "dice", _segmentation(12), True),
    ("luna16_nodule_fpr", "auc", _classification(5, 1), False),   # one positive: a holdout of it starves training
    ("luna16_nodule_fpr", "auc", _classification(6, 3), True),
    ("luna16_nodule_fpr", "auc", _classification(12, 2), True),
], ids=["seg1", "seg2", "seg6", "seg12", "cls5+1", "cls6+3", "cls12+2"])
def test_the_config_check_refuses_exactly_the_fractions_the_runs_refuse(tmp_path, bundle, metric, entries, mixed):
    datalist = _datalist(tmp_path, entries)
    expected = {(f, s) for f in FRACTIONS for s in SEEDS if _run_refuses(datalist, f, s)}
    refused = {(f, s) for f in FRACTIONS for s in SEEDS if _config_refuses(tmp_path, bundle, metric, f, s)}
    assert refused == expected
    if mixed:  # the comparison means something: some refused, some accepted
        assert expected and len(expected) < len(FRACTIONS) * len(SEEDS)


def test_a_fraction_keeping_one_patient_is_refused_naming_it_the_seed_the_count_and_what_to_do(tmp_path):
    _datalist(tmp_path, _segmentation(8))  # 10 % of 8 patients keeps 1 for every seed
    path = _config(tmp_path, "lits_liver_seg", "dice", [0.1, 0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match=r"label_fractions in .*experiment\.yaml: 0\.1 keeps 1 of the 8 training "
                                         r"patient\(s\) of datalist .*dl\.json with seed 0, and the early-stopping "
                                         r"holdout needs at least 2 .*use a larger label fraction \(at least 0\.25\)"):
        load_config(path)
    with pytest.raises(ValueError) as run:  # what each run said, at its start
        load_split(tmp_path / "dl.json", "holdout", label_fraction=0.1, seed=0)
    assert "keeps 1 of the 8 training patient(s)" in str(run.value)


def test_a_classification_fraction_whose_holdout_has_one_class_is_refused_naming_it(tmp_path):
    _datalist(tmp_path, _classification(12, 2))
    refused = [(f, s) for f in FRACTIONS for s in SEEDS if _run_refuses(tmp_path / "dl.json", f, s)
               and len(load_split(tmp_path / "dl.json", "train", label_fraction=f, seed=s)) >= 2]
    assert refused  # a fraction that keeps patients but whose holdout has one class
    fraction, seed = refused[0]
    with pytest.raises(ValueError, match=rf"label_fractions in .*: {fraction:g} with seed {seed} cannot be trained.*"
                                         r"AUC is undefined on the early-stopping holdout.*label_fractions in the "
                                         r"experiment config"):
        load_config(_config(tmp_path, "luna16_nodule_fpr", "auc", [fraction], [seed]))


def test_folds_configs_are_checked_fold_by_fold(tmp_path):
    # 2 patients per fold, each with a negative and a positive: testing fold 0 trains on 4 patients
    entries = [{"image": f"c{i}.nii.gz", "label": i % 2, "case_id": f"p{i // 2}", "fold": (i // 2) % 3}
               for i in range(12)]
    _datalist(tmp_path, entries)
    fine = load_config(_config(tmp_path, "pecad_embolism_fpr", "auc", [0.5, 1.0], [0, 1, 2], folds=[0, 1, 2]))
    assert fine["folds"] == [0, 1, 2]
    def runs_refuse(fraction):
        refused = set()
        for fold in (0, 1, 2):
            for seed in (0, 1, 2):
                try:
                    for split in ("train", "holdout"):
                        load_split(tmp_path / "dl.json", split, label_fraction=fraction, seed=seed, fold=fold)
                except ValueError:
                    refused.add((fold, seed))
        return refused

    assert runs_refuse(0.5) == set()
    refused = runs_refuse(0.1)  # one sample of each class: one patient, or a holdout of one class
    assert refused
    with pytest.raises(ValueError, match=r"label_fractions in .*: 0\.1 (keeps|with) .*seed (\d) \(fold (\d) tested\)") as err:
        load_config(_config(tmp_path, "pecad_embolism_fpr", "auc", [0.1, 1.0], [0, 1, 2], folds=[0, 1, 2]))
    seed, fold = re.search(r"seed (\d) \(fold (\d) tested\)", str(err.value)).groups()
    assert (int(fold), int(seed)) == min(refused)  # the first refused run, in the grid's order of folds and seeds


def test_run_finetune_fails_at_its_start_on_the_fraction_the_config_check_refuses(tmp_path):
    """The same (fraction, seed) through the real fine-tuning (lits_liver_seg, tiny): refused before any training,
    for the reason the config check gives; the fraction it accepts is not refused at that point."""
    from test_bundles_finetune import make_segmentation

    from dira3d.evaluation.finetune import run_finetune

    datalist, _ = make_segmentation(tmp_path, "dl.json", (32, 32, 16), None, n_train=6, n_test=2)
    assert datalist == tmp_path / "dl.json"
    with pytest.raises(ValueError, match=r"0\.1 keeps 1 of the 6 training patient\(s\)"):
        load_config(_config(tmp_path, "lits_liver_seg", "dice", [0.1], [0]))
    load_config(_config(tmp_path, "lits_liver_seg", "dice", [0.5], [0]))  # 3 patients: accepted
    with pytest.raises(Exception) as run:
        run_finetune("lits_liver_seg", {"datalist": str(datalist), "pretrained": "", "seed": 0, "label_fraction": 0.1},
                     output_dir=tmp_path / "run", tiny=True)
    chain, err = [], run.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("label_fraction=0.1 keeps 1 of the 6 training patient(s)" in text for text in chain), chain
    assert not (tmp_path / "run" / "models" / "model.pt").exists()


def test_holdout_0_is_refused_before_any_run_naming_the_setting(tmp_path):
    """Every run of holdout 0 fails at its start (load_split: no patient to select the model on), whatever the
    fraction; the grid listed each run as failed."""
    datalist = _datalist(tmp_path, _segmentation(12))
    with pytest.raises(ValueError, match="holdout"):
        load_split(datalist, "holdout", label_fraction=1.0, seed=0, holdout=0.0, fold=None)  # what a run does
    path = _config(tmp_path, "lits_liver_seg", "dice", [0.5, 1.0], [0], overrides={"tiny": True, "holdout": 0})
    with pytest.raises(ValueError, match=r"overrides in .*experiment\.yaml: holdout=0 holds out no training patient.*"
                                         r"holdout: validation"):
        load_config(path)
    load_config(_config(tmp_path, "lits_liver_seg", "dice", [0.5, 1.0], [0],
                        overrides={"tiny": True, "holdout": 0.2}))  # a share: accepted
