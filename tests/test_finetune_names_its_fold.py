"""`dira3d finetune --fold K` names the fold it tested in what it prints, not only in metrics.json.

A PE-CAD cross-validation (`dira3d prepare pecad` writes folds, no 'test' list; docs/data.md, 'Cross-validation')
printed `{"auc": ...}` alone: three runs of `--fold 0/1/2` printed lines that could not be told apart.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dira3d.data import pecad
from dira3d.evaluation.finetune import main
from dira3d.evaluation.finetune_messages import scored_line
from test_data_pecad import write_volume


def test_finetune_prints_the_fold_it_tested_on_a_prepared_pecad_datalist(tmp_path: Path, capsys) -> None:
    src = tmp_path / "PE-CAD"
    rows = [("patient_id", "x", "y", "z", "coords", "label")]
    for n in range(6):  # one embolus and one false positive per patient; 3 folds of 2 patients
        blob = (10 + n, 12, 9)
        write_volume(src / "volumes" / f"PE{n:02d}.nii.gz", blob, (0.8, 0.8, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        rows += [(f"PE{n:02d}", *blob, "voxel", 1), (f"PE{n:02d}", 22, 6, 12, "voxel", 0)]
    with open(src / "candidates.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert pecad.main(["--src", str(src), "--dst", str(tmp_path / "pecad"), "--cube-size", "16", "16", "16"]) == 0
    datalist = tmp_path / "pecad" / "pecad_datalist.json"
    tested = [e["case_id"] for e in json.loads(datalist.read_text())["training"] if e["fold"] == 1]
    capsys.readouterr()

    out = tmp_path / "fold1"
    assert main(["--bundle", "pecad_embolism_fpr", "--datalist", str(datalist), "--fold", "1", "--tiny",
                 "--set", "max_epochs=1", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["fold"] == 1 and metrics["splits"]["test"]["cases"] == len(tested) == 4
    line = ("scored on:   fold 1, the test split of the cross-validation (4 cases, 2 patients, 2 positive); trained on "
            "the other folds (--fold K tests fold K)")
    assert line in printed.splitlines(), printed
    assert printed.index('"auc"') < printed.index(line) < printed.index("metrics:     ")  # under the metrics


@pytest.mark.parametrize("result, expected", [
    ({"eval_split": "test", "settings": {"fold": 2}, "splits": {"test": {"cases": 9, "patients": 3, "positive": 4}}},
     "scored on:   fold 2, the test split of the cross-validation (9 cases, 3 patients, 4 positive); trained on the "
     "other folds (--fold K tests fold K)"),
    ({"eval_split": "test", "settings": {"fold": 0}, "splits": {}},  # no summary of the split: the fold alone
     "scored on:   fold 0, the test split of the cross-validation; trained on the other folds (--fold K tests fold K)"),
    ({"eval_split": "holdout", "settings": {"fold": 2}},
     "scored on:   the holdout split (eval_split=holdout), not the test split; test fold 2 was held out of training"),
    ({"eval_split": "holdout", "settings": {"fold": None}},
     "scored on:   the holdout split (eval_split=holdout), not the test split"),
    ({"eval_split": "test", "settings": {"fold": None}}, None),  # the datalist's 'test' list: as before, no line
    ({"eval_split": "test", "settings": {"fold": -1}}, None),  # fold < 0: no cross-validation (load_split)
    ({"metrics": {"auc": 0.5}}, None),  # a result of before eval_split and settings
])
def test_the_scored_line_names_the_fold_and_the_split(result, expected):
    assert scored_line(result) == expected
