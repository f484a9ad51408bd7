"""Reference checks of the records of an evaluation of another split than ``test`` (``eval_split``), found by a
mutation audit: every split but ``test`` is another split (``validation`` and ``train`` as much as ``holdout``), an
earlier ``metrics.json`` with ``settings: null`` is read, and the once-per-process warning names the scored split.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dira3d.evaluation.experiment import load_config, run_experiment
from dira3d.evaluation.split_checks import warn_test_split
from dira3d.evaluation.split_ids import scored_split, split_columns

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _run(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"metrics": {"auc": 0.5}, "splits": {"train": {"cases": 8}, "holdout": {"cases": 3, "positive": 2},
                                                  "test": {"cases": 11, "positive": 4}},
              "split_digests": {"train": "1" * 16, "holdout": "2" * 16, "test": "3" * 16}, **fields}
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def test_scored_split_of_a_metrics_json_with_null_settings_is_the_test_split():
    assert scored_split({"settings": None}) == "test"
    assert scored_split({"eval_split": None, "settings": None}) == "test"


@pytest.mark.parametrize("split", ["validation", "train", "holdout"])
def test_split_columns_leave_the_test_columns_empty_for_any_other_split(tmp_path, split):
    expected = {"test_cases": "", "test_positive": "", "train_cases": "8", "train_digest": "1" * 16,
                "holdout_digest": "2" * 16, "test_digest": ""}
    assert split_columns(_run(tmp_path / "now", eval_split=split), "auc", 0.5) == expected
    assert split_columns(_run(tmp_path / "before", settings={"eval_split": split}), "auc", 0.5) == expected
    assert split_columns(_run(tmp_path / "test", eval_split="test"), "auc", 0.5)["test_cases"] == "11"


def test_split_columns_of_a_run_with_null_settings_read_its_test_split(tmp_path):
    columns = split_columns(_run(tmp_path / "r", settings=None), "auc", 0.5)
    assert (columns["test_cases"], columns["test_positive"], columns["test_digest"]) == ("11", "4", "3" * 16)


def test_warn_test_split_names_the_scored_split(tmp_path):
    datalist = tmp_path / "warned_once.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_test_split(datalist, "segmentation", {"cases": 5, "positive": 0}, split="validation")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"the validation split of datalist {datalist} (eval_split=validation) has no case "
                                  "with foreground (0 of 5 ground-truth masks)")
    assert messages[0].endswith("score a split with cases with foreground (the test split: eval_split=test)")


def _experiment(tmp_path: Path) -> dict:
    (tmp_path / "dl.json").write_text("{}")
    (tmp_path / "ckpt.pt").write_bytes(b"")
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"bundle": "luna16_nodule_fpr", "datalist": "dl.json", "metric": "auc",
                                    "output_dir": "out", "seeds": [0], "label_fractions": [1.0],
                                    "methods": {"random": None, "dira": "ckpt.pt"}, "overrides": {"tiny": True}}))
    return load_config(path)


@pytest.mark.parametrize("other", ["validation", "train"])
def test_experiment_refuses_a_run_that_scored_any_other_split(tmp_path, other):
    def runner(bundle, overrides):
        scored = other if overrides["pretrained"] else "test"
        _run(Path(overrides["output_dir"]), eval_split=scored)
        return {"auc": 0.5}

    with pytest.raises(Exception, match="1 of 2 runs failed"):
        run_experiment(_experiment(tmp_path), runner=runner, log=lambda _: None)
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == ["random"]
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert [f["method"] for f in failures] == ["dira"]
    assert f"was scored on the {other} split (eval_split={other}), not the test split" in failures[0]["error"]


def test_experiment_takes_a_runner_that_writes_no_metrics_json_at_its_word(tmp_path):
    rows = run_experiment(_experiment(tmp_path), runner=lambda bundle, overrides: {"auc": 0.5}, log=lambda _: None)
    assert sorted(row["method"] for row in rows) == ["dira", "random"]


@pytest.mark.slow  # one tiny SIIM-ACR fine-tuning run (2D), ~10-20 s
def test_finetune_scoring_the_training_split_needs_no_test_list(tmp_path):
    """eval_split=train scores the training list, which train.json loaded: a datalist without a 'test' list is not
    refused before training (as with eval_split=holdout)."""
    from test_bundles_2d import write_cxr

    from dira3d.evaluation.finetune import run_finetune

    datalist = write_cxr(tmp_path / "data", "siim_datalist.json", None, train=8, test=4)
    content = json.loads(datalist.read_text())
    for entry in content["training"]:
        Image.fromarray(np.zeros((56, 72), np.uint8)).save(tmp_path / "data" / entry["label"])
    del content["test"]
    datalist.write_text(json.dumps(content))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_finetune("siim_pneumothorax_seg", {"datalist": str(datalist), "seed": 0, "eval_split": "train"},
                              output_dir=tmp_path / "out", tiny=True)
    assert [str(w.message)[:len("the train split")] for w in caught if "ground-truth masks" in str(w.message)] == [
        "the train split"]  # its empty masks (the training images') named as the training split's
    assert result["eval_split"] == "train" and "test" not in result["splits"]
    assert result["train_cases"] == "train_cases.csv" and (tmp_path / "out" / "train_cases.csv").is_file()
