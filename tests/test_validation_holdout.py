"""``holdout: validation``: fine-tuning early-stops on the datalist's own 'validation' list (opt-in).

By default the early-stopping holdout is 10 % of the selected training patients (the patent's protocol) and the
'validation' list that `dira3d prepare` writes is not read; with ``holdout="validation"`` the whole 'validation'
list is the holdout and training uses all the selected training entries.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser

from dira3d.data.datalist import DatalistFilesMissingError
from dira3d.evaluation import load_split, select_fraction
from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D, bundle_path
from dira3d.utils.overrides import check_overrides
from test_split_checks import _write as write_datalist_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _entries(prefix: str, patients: int, kind: str = "classification", per_patient: int = 2,
             classes: int = 3) -> list[dict]:
    """Entries of ``patients`` patients (``<prefix><p>``), ``per_patient`` each, both values of every class."""
    out = []
    for p in range(patients):
        for k in range(per_patient):
            i = p * per_patient + k
            entry = {"image": f"{prefix}{i}.nii.gz", "case_id": f"{prefix}{p}"}
            entry["label"] = (i % 2 if kind == "classification" else f"{prefix}{i}_seg.nii.gz" if kind == "segmentation"
                              else [float((i + c) % 2) for c in range(classes)])
            out.append(entry)
    return out


def _write(folder: Path, content: dict, name: str = "dl.json") -> Path:
    """The datalist and empty files for every entry (load_split checks that they exist)."""
    return write_datalist_files(folder, name, content)


def _ids(entries: list[dict]) -> list[str]:
    return [Path(e["image"]).name for e in entries]


@pytest.mark.parametrize("kind", ["classification", "segmentation", "multilabel"])
def test_validation_holdout_is_the_whole_validation_list_and_training_keeps_every_selected_entry(kind, tmp_path):
    content = {"training": _entries("tr", 10, kind), "validation": _entries("va", 3, kind), "test": _entries("te", 2, kind)}
    path = _write(tmp_path, content)
    for fraction in (1.0, 0.5):
        train = load_split(path, "train", label_fraction=fraction, seed=3, holdout="validation")
        held = load_split(path, "holdout", label_fraction=fraction, seed=3, holdout="validation")
        # training: the label fraction's selection, none of it held out; holdout: the validation list, not shrunk
        assert _ids(train) == _ids(select_fraction(content["training"], fraction, seed=3))
        assert _ids(held) == _ids(content["validation"]) and len(held) == 6
        assert all(e["image"] == str(tmp_path / Path(e["image"]).name) for e in held)  # resolved like the others
    # the default is unchanged: 10 % of the selected training patients, the validation list unread
    default = load_split(path, "holdout", seed=3)
    assert default and set(_ids(default)) <= set(_ids(content["training"]))
    assert len(load_split(path, "train", seed=3)) == 20 - len(default)


def _cross_validation(content: dict) -> dict:
    for i, entry in enumerate(content["training"]):
        entry["fold"] = i // 2 % 3
    return {k: v for k, v in content.items() if k != "test"}


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("validation"), r"it has no 'validation' list \(it has \['test', 'training'\]\)"),
    (lambda c: c.update(validation=[]), "its 'validation' list is empty"),
    (lambda c: c["validation"].append(dict(c["training"][0], image="va_leak.nii.gz")),
     r"1 patient\(s\) of the 'validation' list .* also in its 'training' list \(tr0\), so early stopping would select "
     "the model on patients it trains on"),
    (lambda c: c["validation"].append(dict(c["test"][0], image="va_leak.nii.gz")),
     r"also in its 'test' list \(te0\), so early stopping would select the model on patients it is tested on"),
    (lambda c: c.update(_cross_validation(c)), r"cannot be used with fold=1 .*every fold would select its model on the "
                                               "same cases outside the cross-validation"),
])
@pytest.mark.parametrize("split", ["train", "holdout"])
def test_validation_holdout_refusals_name_the_datalist_and_the_setting(change, match, split, tmp_path):
    content = {"training": _entries("tr", 10), "validation": _entries("va", 3), "test": _entries("te", 2)}
    change(content)
    path = _write(tmp_path, content)
    fold = 1 if "fold" in content["training"][0] else None
    # refused whichever split the bundle loads first, with the setting, the datalist and the way out
    with pytest.raises(ValueError, match=match) as caught:
        load_split(path, split, holdout="validation", fold=fold)
    message = str(caught.value)
    assert "holdout='validation'" in message and str(path) in message, message
    assert "holdout=0.1 (the default)" in message or "e.g. 0.1 (the default)" in message, message
    load_split(path, split, fold=fold)  # the default holdout takes the same datalist


def test_validation_holdout_of_one_class_or_bad_entries_is_refused_before_training(tmp_path):
    content = {"training": _entries("tr", 10), "validation": [e for e in _entries("va", 3) if e["label"] == 0],
               "test": _entries("te", 2)}
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=r"AUC is undefined on the early-stopping holdout, the 'validation' list of "
                                         r"datalist .*dl\.json \(.*holdout=validation.*\): all its 3 candidate\(s\) .* "
                                         r"class 0, none of class 1 .*Add candidates of class 1 \(positive\) to its "
                                         r"'validation' list, or set holdout to a share"):
        load_split(path, "holdout", holdout="validation")
    assert len(load_split(path, "train", holdout="validation")) == 20  # training itself is not refused
    # multi-label: no class of both values in the validation list
    multi = {"training": _entries("tr", 10, "multilabel"), "test": _entries("te", 2, "multilabel"),
             "validation": [dict(e, label=[1.0, 0.0, 1.0]) for e in _entries("va", 3, "multilabel")]}
    path = _write(tmp_path, multi, "multi.json")
    with pytest.raises(ValueError, match=r"mean AUC is undefined on the validation split \(6 sample\(s\)\).*multi\.json"
                                         r".*holdout=validation.*or set holdout to a share"):
        load_split(path, "holdout", holdout="validation", num_labels=3)
    # a label the classifier cannot take, and missing files, named as in the other splits
    with pytest.raises(ValueError, match=r"entry 0 of split 'holdout' .* has 3 labels, but the network has out_channels 5"):
        load_split(path, "holdout", holdout="validation", num_labels=5)
    (tmp_path / "va2.nii.gz").unlink()
    with pytest.raises(DatalistFilesMissingError, match=r"missing file.* in its 'validation' list.*case va1"):
        load_split(path, "holdout", holdout="validation", num_labels=3)
    with pytest.raises(ValueError, match=r"holdout='valid' is neither a share in \[0, 1\) .* nor 'validation'"):
        load_split(path, "train", holdout="valid")


def test_finetune_overrides_take_holdout_validation_and_refuse_other_text():
    configs = [bundle_path("luna16_nodule_fpr") / "configs" / name for name in ("train.json", "evaluate.json")]
    check_overrides(configs, {"holdout": "validation"}, where="--set")
    with pytest.raises(ValueError, match=r"--set: holdout='valid' is text, but the setting is a number \(default 0.1\) "
                                         "or 'validation'"):
        check_overrides(configs, {"holdout": "valid"}, where="--set")


def _kind(bundle: str) -> str:
    return "classification" if bundle.endswith("_fpr") else "multilabel" if bundle.endswith("_cls") else "segmentation"


@pytest.mark.parametrize("bundle", BUNDLES + BUNDLES_2D)
def test_every_bundle_and_its_multi_gpu_config_early_stop_on_the_validation_list(bundle, tmp_path):
    """train.json (with multi_gpu_train.json on top, as `torchrun` runs it) and evaluate.json pass `holdout` to
    load_split for both the training and the holdout split."""
    configs = bundle_path(bundle) / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
    classes = int(parser.get_parsed_content("out_channels"))
    content = {key: _entries(prefix, patients, _kind(bundle), classes=classes)
               for key, prefix, patients in (("training", "tr", 10), ("validation", "va", 3), ("test", "te", 2))}
    path = _write(tmp_path, content)
    parser.update({"datalist": str(path), "holdout": "validation", "label_fraction": 0.5, "fold": None})  # PE-CAD: 0
    assert _ids(parser.get_parsed_content("validate#datalist")) == _ids(content["validation"])
    assert _ids(parser.get_parsed_content("train#datalist")) == _ids(select_fraction(content["training"], 0.5))
    evaluation = ConfigParser()
    evaluation.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    evaluation.update({"datalist": str(path), "holdout": "validation", "eval_split": "holdout", "fold": None})
    assert _ids(evaluation.get_parsed_content("validate#datalist")) == _ids(content["validation"])


def _ncc_with_validation(root: Path) -> tuple[Path, list[dict]]:
    """The tiny NCC datalist of the bundle tests, its patients 6-7 moved from training to a 'validation' list,
    the labels of patient 7 swapped: a model that learns the task scores an AUC near 0.5 there, 1.0 elsewhere."""
    from test_bundles_finetune import make_classification

    path = make_classification(root, "ncc_datalist.json", (16, 16, 8), folds=False)
    content = json.loads(path.read_text())
    content["validation"] = content["training"][12:]  # 4 candidates of 2 patients, 2 of class 1
    content["training"] = content["training"][:12]
    for entry in content["validation"][2:]:
        entry["label"] = 1 - entry["label"]
    path.write_text(json.dumps(content))
    return path, content["validation"]


def test_finetune_cli_early_stops_and_selects_the_model_on_the_validation_list(tmp_path, capsys):
    from dira3d.evaluation.finetune import main

    datalist, validation = _ncc_with_validation(tmp_path / "data")
    out = tmp_path / "out"
    # scored after training on the holdout too (eval_split), with the model the holdout selected
    code = main(["--bundle", "luna16_nodule_fpr", "--tiny", "--datalist", str(datalist), "--output-dir", str(out),
                 "--set", "holdout=validation", "--set", "max_epochs=2", "--set", "eval_split=holdout"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # the printed metrics are said to be the holdout's
    assert "scored on:   the holdout split (eval_split=holdout), not the test split" in printed.out
    result = json.loads((out / "metrics.json").read_text())
    assert result["settings"]["holdout"] == "validation"
    # the holdout was the validation list: its cases, patients and positives (10 % of training: 2, 1, 1)
    assert result["splits"]["holdout"] == {"cases": 4, "patients": 2, "positive": 2}
    # the split scored is recorded as the holdout: no test split was scored (it was filed under splits.test)
    assert result["eval_split"] == "holdout" and "test" not in result["splits"] and "test" not in result["split_digests"]
    # and its metric was computed on those cases: far from the 1.0 of the easy training cases, and what the saved
    # (best) model scores on them
    best = result["holdout"]["best_val_auc"]
    assert best < 0.9 and result["metrics"]["auc"] == pytest.approx(best, abs=1e-6), result
    assert [e["label"] for e in validation] == [0, 1, 1, 0]
    # its per-case rows are named after the split scored, and metrics.json names that file under the split's key
    assert result["holdout_cases"] == "holdout_cases.csv" and "test_cases" not in result
    assert not (out / "test_cases.csv").exists()
    with open(out / "holdout_cases.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["case"] for r in rows) == sorted(e["image"] for e in validation)


@pytest.mark.slow
def test_experiment_runs_and_records_holdout_validation(tmp_path):
    from dira3d.evaluation.experiment import load_config, run_experiment

    datalist, _ = _ncc_with_validation(tmp_path / "data")
    config = {"bundle": "luna16_nodule_fpr", "datalist": str(datalist), "metric": "auc", "output_dir": str(tmp_path / "out"),
              "seeds": [0], "label_fractions": [1.0], "methods": {"random": None},
              "overrides": {"tiny": True, "max_epochs": 1, "holdout": "validation"}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = run_experiment(load_config(tmp_path / "experiment.yaml"), log=lambda _: None)
    assert len(rows) == 1
    recorded = json.loads((tmp_path / "out" / "experiment.json").read_text())
    assert recorded["overrides"]["holdout"] == "validation"  # a fine-tuning setting: not mixed with 0.1 rows
    result = json.loads((Path(rows[0]["run_dir"]) / "metrics.json").read_text())
    assert result["settings"]["holdout"] == "validation"
    assert result["splits"]["holdout"] == {"cases": 4, "patients": 2, "positive": 2}


def test_experiment_refuses_holdout_validation_before_any_run(tmp_path):
    from dira3d.evaluation.experiment import load_config

    content = {"training": _entries("tr", 10), "test": _entries("te", 2)}
    path = _write(tmp_path, content)

    def config(**extra):
        cfg = {"bundle": "pecad_embolism_fpr", "datalist": str(path), "metric": "auc", "output_dir": "out", "seeds": [0],
               "label_fractions": [1.0], "methods": {"random": None}, "overrides": {"holdout": "validation"}, **extra}
        (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        return load_config(tmp_path / "experiment.yaml")

    with pytest.raises(ValueError, match=r"overrides in .*experiment\.yaml: holdout='validation' .*it has no 'validation' list"):
        config()
    content["validation"] = _entries("va", 3)
    _write(tmp_path, content)
    assert config()["overrides"] == {"holdout": "validation"}  # accepted
    _write(tmp_path, _cross_validation(content))
    with pytest.raises(ValueError, match=r"overrides in .*experiment\.yaml set holdout: validation, but folds runs a "
                                         "cross-validation.*remove holdout \\(0.1, the default\\) or remove folds"):
        config(folds=[0, 1, 2])
    with pytest.raises(ValueError, match=r"holdout='valid' is text, but the setting is a number \(default 0.1\) or "
                                         "'validation'"):
        config(overrides={"holdout": "valid"})
