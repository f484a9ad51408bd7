"""A 1-seed tiny experiment through the real fine-tuning bundle (issue 7's CI run)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from dira3d.evaluation.datalists import load_split
from dira3d.evaluation.experiment import load_config, run_experiment
from dira3d.networks import UNet
from dira3d.utils import atomic_save
from test_bundles_finetune import make_classification


@pytest.mark.slow
def test_tiny_experiment_writes_csv_table_and_plots(tmp_path):
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    torch.manual_seed(0)
    unet = UNet(spatial_dims=3, width=0.125)
    atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                 "meta": {"width": 0.125}}, tmp_path / "pretrained.pt")
    config = {"bundle": "luna16_nodule_fpr", "datalist": str(datalist), "metric": "auc",
              "output_dir": str(tmp_path / "out"), "baseline": "random", "seeds": [0], "label_fractions": [1.0],
              "methods": {"random": None, "pretrained": str(tmp_path / "pretrained.pt")},
              "overrides": {"tiny": True, "max_epochs": 2}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    torch.set_num_threads(1)
    rows = run_experiment(load_config(tmp_path / "experiment.yaml"), log=lambda _: None)
    assert [r["method"] for r in rows] == ["random", "pretrained"]
    with open(tmp_path / "out" / "results.csv") as handle:
        values = [float(r["value"]) for r in csv.DictReader(handle)]
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| random |" in table and "| pretrained |" in table
    assert (tmp_path / "out" / "auc_vs_label_fraction.png").stat().st_size > 1000
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 1000
    result = json.loads((tmp_path / "out" / "runs" / "pretrained_lf1_seed0" / "metrics.json").read_text())
    test = result["splits"]["test"]  # results.csv gives the test split the value was scored on
    assert (rows[1]["test_cases"], rows[1]["test_positive"]) == (str(test["cases"]), str(test["positive"]))
    assert int(rows[1]["test_cases"]) > 0
    # which cases each split held: splits.json lists them (image paths relative to the datalist), metrics.json and
    # results.csv give their digests, and both methods' runs of seed 0 drew the same ones
    record = json.loads((tmp_path / "out" / "runs" / "pretrained_lf1_seed0" / "splits.json").read_text())
    assert result["split_digests"] == {name: record[name]["digest"] for name in ("train", "holdout", "test")}
    for name, split in (("train", "train"), ("holdout", "holdout"), ("test", "test")):
        cases = sorted(Path(e["image"]).relative_to(datalist.parent).as_posix() for e in load_split(datalist, split))
        assert record[name]["cases"] == cases
        assert rows[0][f"{name}_digest"] == rows[1][f"{name}_digest"] == result["split_digests"][name] \
            == hashlib.sha256("\n".join(cases).encode()).hexdigest()[:16]


@pytest.mark.slow
def test_tiny_cross_validation_experiment_runs_each_fold_and_averages_them(tmp_path):
    """PE-CAD's protocol through the real bundle: one seed, folds 0-2, each fold the test set once."""
    datalist = make_classification(tmp_path / "data", "pecad_datalist.json", (16, 16, 16), folds=True)
    config = {"bundle": "pecad_embolism_fpr", "datalist": str(datalist), "metric": "auc",
              "output_dir": str(tmp_path / "out"), "seeds": [0], "label_fractions": [1.0], "folds": [0, 1, 2],
              "methods": {"random": None}, "overrides": {"tiny": True, "max_epochs": 1}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    torch.set_num_threads(1)
    rows = run_experiment(load_config(tmp_path / "experiment.yaml"), log=lambda _: None)
    assert [r["fold"] for r in rows] == ["0", "1", "2"]
    for fold in range(3):  # each run had the bundle's fold set to its own fold
        result = json.loads((tmp_path / "out" / "runs" / f"random_lf1_seed0_fold{fold}" / "metrics.json").read_text())
        assert result["settings"]["fold"] == fold
    mean = sum(float(r["value"]) for r in rows) / 3
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary[0]["n"] == 1 and summary[0]["mean"] == pytest.approx(mean)
    assert f"| random | {100 * mean:.2f} |" in (tmp_path / "out" / "table.md").read_text()
