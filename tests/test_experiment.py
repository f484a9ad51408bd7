"""The experiment grid: resumable CSV, aggregation, table and plots (fine-tuning replaced by a known function)."""

import csv

import pytest
import yaml

from dira3d.evaluation.experiment import load_config, run_experiment


def _config(tmp_path, **extra):
    (tmp_path / "dl.json").write_text("{}")
    (tmp_path / "ckpt.pt").write_bytes(b"")
    cfg = {"bundle": "luna16_nodule_fpr", "datalist": "dl.json", "metric": "auc", "output_dir": "out",
           "seeds": [0, 1, 2], "label_fractions": [0.5, 1.0], "methods": {"random": None, "dira": "ckpt.pt"},
           "overrides": {"tiny": True}, **extra}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(path)


def fake_runner(calls):
    def run(bundle, overrides):
        calls.append(overrides)
        bonus = 0.1 if overrides["pretrained"] else 0.0
        return {"auc": 0.6 + bonus + 0.01 * overrides["seed"] + 0.1 * overrides["label_fraction"]}
    return run


def test_grid_resume_and_report(tmp_path):
    config = _config(tmp_path)
    calls = []
    rows = run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
    assert len(rows) == len(calls) == 12
    assert calls[0]["tiny"] is True and calls[0]["datalist"] == str(tmp_path / "dl.json")
    assert {c["pretrained"] for c in calls} == {"", str(tmp_path / "ckpt.pt")}
    out = tmp_path / "out"
    with open(out / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 12
    table = (out / "table.md").read_text()
    # dira @ 0.5: values 0.75, 0.76, 0.77 -> 76.00 ± 1.00; random 66.00 ± 1.00; identical spread -> t = 12.25, p < 0.001
    assert "| dira | 76.00 ± 1.00 (p<0.001) | 81.00 ± 1.00 (p<0.001) |" in table
    assert "| random | 66.00 ± 1.00 | 71.00 ± 1.00 |" in table
    for png in ("auc_vs_label_fraction.png", "ablation.png"):
        assert (out / png).stat().st_size > 1000

    # resume: a second call with one row removed re-runs exactly that run
    lines = (out / "results.csv").read_text().splitlines()
    (out / "results.csv").write_text("\n".join(lines[:-1]) + "\n")
    calls2 = []
    rows = run_experiment(config, runner=fake_runner(calls2), log=lambda _: None)
    assert len(calls2) == 1 and len(rows) == 12


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="baseline 'scratch'"):
        _config(tmp_path, baseline="scratch")
    with pytest.raises(ValueError, match="label fraction 1.5"):
        _config(tmp_path, label_fractions=[1.5])
    (tmp_path / "bad.yaml").write_text("bundle: x\n")
    with pytest.raises(ValueError, match="lacks datalist"):
        load_config(tmp_path / "bad.yaml")
