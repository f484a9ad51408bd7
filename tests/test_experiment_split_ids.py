"""``dira3d experiment`` pairs methods on the same cases, not only on splits of the same size, and records what made
its runs (dira3d's and the bundles' versions) in experiment.json (a walkthrough, 2026-11-27: a change of the subset
rules that kept the sizes went unnoticed, and nothing said which bundle version made the rows)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import yaml
from test_experiment_walkthrough_grid import write_experiment_config

import dira3d
from dira3d.evaluation.experiment import load_config, run_experiment
from dira3d.evaluation.experiment_versions import bundle_version, current_versions
from dira3d.evaluation.finetune import bundle_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def fake_runner(calls: list, train_digest=lambda o: "a" * 16, digests: bool = True):
    """A runner that writes metrics.json as run_finetune does: the same sizes for every run, the training split's
    digest ``train_digest(overrides)`` (``digests=False``: no split_digests, as dira3d wrote before them)."""
    def run(bundle, overrides):
        calls.append(overrides)
        value = 0.7 + 0.01 * overrides["seed"]
        out = Path(overrides["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        splits = {"train": {"cases": 43, "patients": 4, "positive": 2}, "test": {"cases": 20, "patients": 5, "positive": 6}}
        record = {"metrics": {"auc": value}, "splits": splits}
        if digests:
            record["split_digests"] = {"train": train_digest(overrides), "holdout": "b" * 16,
                                       "test": f"{overrides.get('fold', 0):016d}"}
        (out / "metrics.json").write_text(json.dumps(record))
        return {"auc": value}
    return run


def _rows(tmp_path: Path) -> tuple[list[dict], list[str]]:
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader), list(reader.fieldnames or ())


def _write_rows(tmp_path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(tmp_path / "out" / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_results_csv_records_each_runs_split_digests(tmp_path):
    run_experiment(load_config(write_experiment_config(tmp_path)), runner=fake_runner([]), log=lambda _: None)
    rows, fields = _rows(tmp_path)
    assert fields[-3:] == ["train_digest", "holdout_digest", "test_digest"]
    assert {(r["train_digest"], r["holdout_digest"], r["test_digest"]) for r in rows} == {("a" * 16, "b" * 16, "0" * 16)}


def test_a_run_of_the_same_sizes_but_other_cases_stops_the_grid_naming_both_runs(tmp_path):
    """The nested label fractions of 2026-11-26 drew other subsets of the same size: the size check let a grid resumed
    across that change pair runs of other cases. The digest sees it; the run is not added and the grid stops."""
    run_experiment(load_config(write_experiment_config(tmp_path)), runner=fake_runner([]), log=lambda _: None)
    more = load_config(write_experiment_config(tmp_path, methods={"random": None, "dira": None, "dis": None}))
    calls: list = []
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"the run dis labels=1 seed=0 drew another split than the runs of the same "
                                         rf"label fraction and seed in .*results\.csv \(dis labels=1 seed=0 has "
                                         rf"train_digest c{{16}}, random labels=1 seed=0 a{{16}}; the cases are listed in "
                                         rf"{out / 'runs' / 'dis_lf1_seed0' / 'splits.json'} and "
                                         rf"{out / 'runs' / 'random_lf1_seed0' / 'splits.json'}\)"):
        run_experiment(more, runner=fake_runner(calls, lambda o: "c" * 16), log=lambda _: None)
    assert len(calls) == 1
    assert {r["method"] for r in _rows(tmp_path)[0]} == {"random", "dira"}
    # the same cases: the new method's runs are added
    assert len(run_experiment(more, runner=fake_runner([]), log=lambda _: None)) == 6


def test_a_results_csv_whose_pairs_differ_in_their_cases_is_refused_before_any_run(tmp_path):
    config = load_config(write_experiment_config(tmp_path))
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    rows, fields = _rows(tmp_path)
    rows[-1]["test_digest"] = "d" * 16  # dira, seed 1
    _write_rows(tmp_path, rows, fields)
    calls: list = []
    with pytest.raises(ValueError, match=r"results\.csv holds runs of one label fraction and seed that drew different "
                                         r"splits \(.*seed=1 has test_digest [0d]{16}, .*seed=1 [0d]{16}; the cases are "
                                         r"listed in .*splits\.json and .*splits\.json\)"):
        run_experiment(load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2])), runner=fake_runner(calls), log=lambda _: None)
    assert calls == []


def test_rows_without_digests_are_kept_with_one_warning(tmp_path):
    """A results.csv of before the digests (sizes only) is resumed, not refused; one warning says its runs are paired
    on the sizes only. New runs (with digests) are added beside them."""
    run_experiment(load_config(write_experiment_config(tmp_path)), runner=fake_runner([], digests=False), log=lambda _: None)
    rows, fields = _rows(tmp_path)
    _write_rows(tmp_path, rows, [f for f in fields if not f.endswith("_digest")])  # the columns of before
    more = load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2]))
    with pytest.warns(UserWarning) as caught:
        rows = run_experiment(more, runner=fake_runner([]), log=lambda _: None)
    ours = [str(w.message) for w in caught if "split digest" in str(w.message) or "_digest" in str(w.message)]
    assert len(ours) == 1 and "4 of its runs" in ours[0] and "split sizes only" in ours[0], ours
    assert [r.get("train_digest") or "" for r in rows] == [""] * 4 + ["a" * 16] * 2
    # a results.csv whose runs all have digests gives no such warning
    (tmp_path / "new").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_experiment(load_config(write_experiment_config(tmp_path / "new")), runner=fake_runner([]), log=lambda _: None)
        run_experiment(load_config(write_experiment_config(tmp_path / "new")), runner=fake_runner([]), log=lambda _: None)


def test_runs_of_other_folds_may_test_on_other_cases(tmp_path):
    """With folds each (seed, fold) has its own test split: only runs of the same fold are compared."""
    (tmp_path / "dl.json").write_text(json.dumps({"training": [
        {"image": "x.nii.gz", "label": i % 2, "case_id": f"p{i}", "fold": i // 2 % 2} for i in range(8)]}))
    config = {"bundle": "pecad_embolism_fpr", "datalist": "dl.json", "metric": "auc", "output_dir": "out",
              "seeds": [0], "label_fractions": [1.0], "folds": [0, 1], "methods": {"random": None, "dira": None},
              "overrides": {"tiny": True}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = run_experiment(load_config(tmp_path / "experiment.yaml"), runner=fake_runner([]), log=lambda _: None)
    assert sorted(r["test_digest"] for r in rows) == ["0" * 16] * 2 + [f"{1:016d}"] * 2


def test_experiment_json_records_dira3ds_and_the_bundles_versions(tmp_path):
    run_experiment(load_config(write_experiment_config(tmp_path)), runner=fake_runner([]), log=lambda _: None)
    recorded = json.loads((tmp_path / "out" / "experiment.json").read_text())
    version = json.loads((bundle_path("luna16_nodule_fpr") / "configs" / "metadata.json").read_text())["version"]
    assert recorded["versions"] == {"dira3d": dira3d.__version__, "bundles": {"luna16_nodule_fpr": version}}
    assert "earlier_versions" not in recorded


def test_a_method_pretrained_by_the_experiment_records_the_pretraining_bundles_version():
    config = {"bundle": "luna16_nodule_fpr", "methods": {"random": None, "dira": {"pretrain": {}}}}
    versions = current_versions(config)["bundles"]
    assert set(versions) == {"luna16_nodule_fpr", "dira_pretrain"}
    assert versions["dira_pretrain"] == bundle_version(Path(dira3d.__file__).parents[1] / "bundles" / "dira_pretrain")
    assert versions["dira_pretrain"].count(".") == 2


def test_a_bundle_upgraded_since_the_rows_were_made_is_warned_about_not_refused(tmp_path):
    config = load_config(write_experiment_config(tmp_path))
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    path = tmp_path / "out" / "experiment.json"
    recorded = json.loads(path.read_text())
    now = recorded["versions"]["bundles"]["luna16_nodule_fpr"]
    before = {"dira3d": "0.0.9", "bundles": {"luna16_nodule_fpr": "0.0.1"}}
    path.write_text(json.dumps({**recorded, "versions": before}))
    more = load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2]))
    with pytest.warns(UserWarning, match=rf"bundle version changed since its 4 runs were made \(luna16_nodule_fpr "
                                         rf"0\.0\.1 -> {now.replace('.', '[.]')};"):
        rows = run_experiment(more, runner=fake_runner([]), log=lambda _: None)
    assert len(rows) == 6  # not refused: the new runs are added
    recorded = json.loads(path.read_text())
    assert recorded["versions"]["bundles"]["luna16_nodule_fpr"] == now
    assert recorded["earlier_versions"] == [before]  # what the earlier rows were made with is kept
    # resumed again with the same versions: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_experiment(more, runner=fake_runner([]), log=lambda _: None)
    assert json.loads(path.read_text())["earlier_versions"] == [before]


def test_rows_of_before_the_versions_record_are_not_passed_off_as_the_current_versions(tmp_path):
    config = load_config(write_experiment_config(tmp_path))
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    path = tmp_path / "out" / "experiment.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "versions"}))
    with warnings.catch_warnings():  # nothing to compare: no warning, and no refusal
        warnings.simplefilter("error")
        run_experiment(load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2])), runner=fake_runner([]), log=lambda _: None)
    recorded = json.loads(path.read_text())
    assert recorded["earlier_versions"] == ["not recorded (before 2026-11-27)"]
    assert recorded["versions"]["dira3d"] == dira3d.__version__
