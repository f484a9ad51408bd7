"""An evaluation of a split other than ``test`` (``--set eval_split=holdout``) says so wherever it is recorded.

``dira3d finetune --set eval_split=holdout`` scored the holdout but filed it as the test split: ``splits.test`` and
``split_digests.test`` in ``metrics.json`` (``dira3d experiment`` read them into results.csv's ``test_cases``,
``test_positive``, ``test_digest``), the key ``test_cases`` (``"holdout_cases.csv"``), the TensorBoard scalars
``test/<metric>``, and a warning about "the test split of datalist ... (its 'test' list)" for the holdout's empty
masks; a datalist without a 'test' list was refused before training although no test split was to be scored.
``dira3d experiment`` put a holdout score into its table of test scores without a word: it refuses such runs now.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_bundles_2d import write_cxr
from test_experiment import _config, fake_runner

from dira3d.evaluation.experiment import run_experiment
from dira3d.evaluation.finetune import run_finetune
from dira3d.evaluation.split_checks import warning_for_test_split
from dira3d.evaluation.split_ids import split_columns, scored_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.slow
def test_a_finetune_that_scores_the_holdout_records_it_as_the_holdout_everywhere(tmp_path):
    # SIIM-ACR, 2D: the training images' masks all empty, so the holdout (drawn from them) has no foreground; the
    # datalist has no 'test' list at all
    datalist = write_cxr(tmp_path / "data", "siim_datalist.json", None, train=8, test=4)
    content = json.loads(datalist.read_text())
    for entry in content["training"]:
        Image.fromarray(np.zeros((56, 72), np.uint8)).save(tmp_path / "data" / entry["label"])
    del content["test"]
    datalist.write_text(json.dumps(content))
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_finetune("siim_pneumothorax_seg", {"datalist": str(datalist), "seed": 0, "eval_split": "holdout"},
                              output_dir=out, tiny=True)
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded == json.loads(json.dumps(result))
    # the scored split by its name: eval_split, splits.holdout and split_digests.holdout; no test split anywhere
    assert recorded["eval_split"] == "holdout"
    assert set(recorded["splits"]) == {"train", "holdout"} and set(recorded["split_digests"]) == {"train", "holdout"}
    assert recorded["splits"]["holdout"] == {"cases": 2, "patients": 1, "positive": 0}
    assert "test" not in json.loads((out / "splits.json").read_text())
    # the per-case file under the key of its split
    assert recorded["holdout_cases"] == "holdout_cases.csv" and "test_cases" not in recorded
    with open(out / "holdout_cases.csv", newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    # TensorBoard: holdout/<metric>, no test/<metric>
    events = EventAccumulator(str(out))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"holdout/{name}" for name in recorded["metrics"]} <= tags and not any(t.startswith("test/") for t in tags)
    assert events.Scalars("holdout/dice")[0].value == pytest.approx(recorded["metrics"]["dice"], rel=1e-6)
    # the warning about empty masks names the holdout, not "the test split (its 'test' list)"
    ours = [str(w.message) for w in caught if "ground-truth masks" in str(w.message)]
    assert ours == [f"the holdout split of datalist {datalist} (eval_split=holdout) has no case with foreground (0 of "
                    "2 ground-truth masks): its mean Dice and IoU score an empty prediction of an empty mask as 1, so "
                    "they only say how often the model predicts nothing, and predicting nothing everywhere scores 1.0; "
                    "score a split with cases with foreground (the test split: eval_split=test)"], ours
    # results.csv's test columns stay empty for it; its training and holdout columns are known
    columns = split_columns(out, "dice", recorded["metrics"]["dice"])
    assert (columns["test_cases"], columns["test_positive"], columns["test_digest"]) == ("", "", "")
    assert columns["train_cases"] == "6" and columns["holdout_digest"] == recorded["split_digests"]["holdout"]


def _metrics_json(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"metrics": {"auc": 0.75}, "splits": {"train": {"cases": 9}, "holdout": {"cases": 2, "positive": 1},
                                                   "test": {"cases": 20, "positive": 7}},
              "split_digests": {"train": "a" * 16, "holdout": "b" * 16, "test": "c" * 16}, **fields}
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def test_scored_split_reads_this_and_earlier_versions_metrics_json():
    assert scored_split({"eval_split": "holdout", "settings": {"eval_split": "test"}}) == "holdout"
    assert scored_split({"eval_split": "test"}) == "test"
    assert scored_split({"settings": {"eval_split": "validation"}}) == "validation"  # before eval_split was recorded
    assert scored_split({"settings": {"seed": 0}}) == "test" == scored_split({})


def test_split_columns_read_the_test_split_only_of_runs_that_scored_it(tmp_path):
    # an earlier version's metrics.json of a test run (no eval_split): read as before
    columns = split_columns(_metrics_json(tmp_path / "old_test"), "auc", 0.75)
    assert columns == {"test_cases": "20", "test_positive": "7", "train_cases": "9", "train_digest": "a" * 16,
                       "holdout_digest": "b" * 16, "test_digest": "c" * 16}
    assert split_columns(_metrics_json(tmp_path / "new_test", eval_split="test"), "auc", 0.75) == columns
    # an earlier version's run of --set eval_split=holdout filed the holdout under splits.test: not a test split
    old_holdout = _metrics_json(tmp_path / "old_holdout", settings={"eval_split": "holdout"})
    assert split_columns(old_holdout, "auc", 0.75) == {**columns, "test_cases": "", "test_positive": "", "test_digest": ""}


def test_warning_for_a_test_split_keeps_its_words_and_advice():
    message = warning_for_test_split(Path("dl.json"), "segmentation", {"cases": 4, "positive": 0})
    assert message.startswith("the test split of datalist dl.json (its 'test' list) has no case with foreground")
    assert message.endswith("or add such cases to its test list")
    few = warning_for_test_split(Path("dl.json"), "segmentation", {"cases": 9, "positive": 1}, split="validation")
    assert few.startswith("the validation split of datalist dl.json (eval_split=validation) has only 1 of 9 cases")
    assert few.endswith("prefer a split with more cases with foreground") and "test" not in few


@pytest.mark.parametrize("split", ["holdout", "validation", "train"])
def test_experiment_refuses_eval_split_other_than_test_before_any_run(tmp_path, split):
    with pytest.raises(ValueError, match=rf"overrides in .*experiment\.yaml set eval_split='{split}', but dira3d "
                                         r"experiment compares the methods on the test split .*remove eval_split"):
        _config(tmp_path, overrides={"tiny": True, "eval_split": split})
    assert _config(tmp_path, overrides={"tiny": True, "eval_split": "test"})["overrides"]["eval_split"] == "test"


def test_experiment_refuses_a_run_that_scored_another_split(tmp_path):
    """A bundle whose evaluate.json scores another split by default: the run fails with the reason, no row."""
    config = _config(tmp_path, seeds=[0], label_fractions=[1.0])
    inner = fake_runner([])

    def runner(bundle, overrides):
        metrics = inner(bundle, overrides)
        scored = "holdout" if overrides["pretrained"] else "test"  # dira's runs scored the holdout
        _metrics_json(Path(overrides["output_dir"]), metrics=metrics, eval_split=scored)
        return metrics

    with pytest.raises(Exception, match="1 of 2 runs failed"):
        run_experiment(config, runner=runner, log=lambda _: None)
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["random"] and rows[0]["test_cases"] == "20"
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert [f["method"] for f in failures] == ["dira"]
    assert "was scored on the holdout split (eval_split=holdout), not the test split" in failures[0]["error"]
