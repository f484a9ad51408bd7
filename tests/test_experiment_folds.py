"""The experiment grid's ``folds`` axis (PE-CAD's 3-fold cross-validation by patient), fine-tuning
replaced by a known function: one run per fold, the per-seed mean over folds in the statistics,
incomplete seeds left out and reported, resume and the refusal of changed settings."""

import csv
import json
import shutil

import pytest
import yaml

from dira3d.evaluation.experiment import ExperimentRunsFailed, load_config, run_experiment

FOLD_DATALIST = {"training": [{"image": f"c{i}.nii.gz", "label": i % 2, "case_id": f"p{i // 2}", "fold": (i // 2) % 3}
                              for i in range(12)], "meta": {"dataset": "synthetic"}}


def _config(tmp_path, **extra):
    if not (tmp_path / "dl.json").exists():
        (tmp_path / "dl.json").write_text(json.dumps(FOLD_DATALIST))
    (tmp_path / "ckpt.pt").write_bytes(b"")
    cfg = {"bundle": "pecad_embolism_fpr", "datalist": "dl.json", "metric": "auc", "output_dir": "out",
           "seeds": [0, 1, 2], "label_fractions": [0.5, 1.0], "folds": [0, 1, 2],
           "methods": {"random": None, "dira": "ckpt.pt"}, "overrides": {"tiny": True}, **extra}
    cfg = {k: v for k, v in cfg.items() if v != "<absent>"}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(path)


def fake_runner(calls, fail=lambda overrides: False):
    """AUC 0.6 (+0.1 pretrained) + 0.01 seed + 0.1 fraction + 0.03 fold: the mean over folds 0-2 adds 0.03."""
    def run(bundle, overrides):
        calls.append(overrides)
        if fail(overrides):
            raise RuntimeError("out of memory")
        bonus = 0.1 if overrides["pretrained"] else 0.0
        fold = overrides.get("fold", 0)
        return {"auc": 0.6 + bonus + 0.01 * overrides["seed"] + 0.1 * overrides["label_fraction"] + 0.03 * fold}
    return run


def _rows(tmp_path):
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_cell_runs_once_per_fold_and_a_seed_counts_the_mean_over_its_folds(tmp_path):
    config = _config(tmp_path)
    calls = []
    rows = run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
    assert len(rows) == len(calls) == 2 * 2 * 3 * 3
    # the folds of one seed run one after the other, each in its own run folder, with the bundle's fold set
    assert [(c["label_fraction"], c["seed"], c["fold"]) for c in calls[:4]] == [
        (0.5, 0, 0), (0.5, 0, 1), (0.5, 0, 2), (0.5, 1, 0)]
    assert len({c["output_dir"] for c in calls}) == 36
    assert calls[5]["output_dir"].endswith("random_lf0.5_seed1_fold2")
    written = _rows(tmp_path)
    assert list(written[0]) == ["method", "checkpoint", "label_fraction", "seed", "fold", "metric", "value", "seconds",
                                "run_dir", "test_cases", "test_positive", "train_cases", "train_digest",
                                "holdout_digest", "test_digest"]
    assert sorted({(r["method"], r["label_fraction"], r["seed"], r["fold"]) for r in written}) == sorted(
        {(m, str(f), str(s), str(k)) for m in ("random", "dira") for f in (0.5, 1.0) for s in (0, 1, 2) for k in (0, 1, 2)})
    table = (tmp_path / "out" / "table.md").read_text()
    # per-seed means over folds: dira @ 0.5 -> 0.78, 0.79, 0.80 (76 + 3 for the folds) ± 1.00; pooling the
    # 9 fold values instead would give a std of 2.6
    assert "| dira | 79.00 ± 1.00 (p<0.001) | 84.00 ± 1.00 (p<0.001) |" in table
    assert "| random | 69.00 ± 1.00 | 74.00 ± 1.00 |" in table
    assert "mean over folds 0, 1, 2" in table and "Left out" not in table
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    dira = next(c for c in summary if c["method"] == "dira" and c["label_fraction"] == 0.5)
    assert dira["n"] == 3 and dira["values"] == pytest.approx([0.78, 0.79, 0.80])
    assert json.loads((tmp_path / "out" / "experiment.json").read_text())["folds"] == [0, 1, 2]


def test_a_seed_with_a_missing_fold_is_left_out_and_named_then_retried(tmp_path):
    config = _config(tmp_path)
    logged = []
    broken = lambda o: o["pretrained"] and o["seed"] == 1 and o["fold"] == 2  # noqa: E731
    with pytest.raises(ExperimentRunsFailed, match=r"2 of 36 runs failed.*dira labels=0.5 seed=1 fold=2: RuntimeError"):
        run_experiment(config, runner=fake_runner([], fail=broken), log=logged.append)
    assert len(_rows(tmp_path)) == 34
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert [(f["label_fraction"], f["seed"], f["fold"]) for f in failures] == [(0.5, 1, 2), (1.0, 1, 2)]
    table = (tmp_path / "out" / "table.md").read_text()
    # seeds 0 and 2 only (0.78, 0.80), never seed 1 averaged over its folds 0 and 1
    assert "| dira | 79.00 ± 1.41 (p" in table
    assert "Left out (not all folds finished, or some failed: see failures.json): dira @ 50 % labels, seed 1 (fold 2 missing); " \
           "dira @ 100 % labels, seed 1 (fold 2 missing)." in table
    assert any("left out of the statistics" in line and "seed 1 (fold 2 missing)" in line for line in logged)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {c["n"] for c in summary if c["method"] == "dira"} == {2}

    calls = []
    run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
    assert [(c["label_fraction"], c["seed"], c["fold"]) for c in calls] == [(0.5, 1, 2), (1.0, 1, 2)]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| dira | 79.00 ± 1.00 (p<0.001) |" in table and "Left out" not in table


def test_an_interrupted_fold_grid_resumes_where_it_stopped(tmp_path):
    config = _config(tmp_path, seeds=[0, 1], label_fractions=[1.0])
    calls = []

    def interrupted(bundle, overrides):
        if len(calls) == 4:
            raise KeyboardInterrupt
        return fake_runner(calls)(bundle, overrides)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, runner=interrupted, log=lambda _: None)
    assert [(r["method"], r["seed"], r["fold"]) for r in _rows(tmp_path)] == [
        ("random", "0", "0"), ("random", "0", "1"), ("random", "0", "2"), ("random", "1", "0")]
    assert "Left out" in (tmp_path / "out" / "table.md").read_text()  # random seed 1 has fold 0 only
    calls2 = []
    rows = run_experiment(config, runner=fake_runner(calls2), log=lambda _: None)
    assert [(c["pretrained"] != "", c["seed"], c["fold"]) for c in calls2] == [
        (False, 1, 1), (False, 1, 2), (True, 0, 0), (True, 0, 1), (True, 0, 2), (True, 1, 0), (True, 1, 1), (True, 1, 2)]
    assert len(rows) == 12
    assert "| random | 73.50 ± 0.71 |" in (tmp_path / "out" / "table.md").read_text()
    calls3 = []
    run_experiment(config, runner=fake_runner(calls3), log=lambda _: None)
    assert calls3 == []  # all done


def test_another_folds_list_or_none_on_the_same_results_is_refused(tmp_path):
    config = _config(tmp_path, seeds=[0], label_fractions=[1.0], folds=[0, 1])
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    calls = []
    with pytest.raises(ValueError, match=r"other fine-tuning settings \(folds changed"):
        run_experiment(_config(tmp_path, seeds=[0], label_fractions=[1.0]), runner=fake_runner(calls), log=lambda _: None)
    with pytest.raises(ValueError, match=r"holds runs of a cross-validation grid \(a fold column\).*put folds back"):
        run_experiment(_config(tmp_path, seeds=[0], label_fractions=[1.0], folds="<absent>"),
                       runner=fake_runner(calls), log=lambda _: None)
    assert calls == []
    # a grid made without folds (fold 0 of the bundle's default) does not get fold rows added to it
    plain = _config(tmp_path, seeds=[0], label_fractions=[1.0], folds="<absent>", output_dir="plain")
    run_experiment(plain, runner=fake_runner(calls), log=lambda _: None)
    assert "fold" not in calls[0] and len(calls) == 2
    (tmp_path / "plain" / "experiment.json").unlink()  # also without the recorded settings
    with pytest.raises(ValueError, match=r"holds runs made without folds \(no fold column\)"):
        run_experiment(_config(tmp_path, seeds=[0], label_fractions=[1.0], output_dir="plain"),
                       runner=fake_runner(calls), log=lambda _: None)
    assert len(calls) == 2


def test_without_folds_the_files_are_as_before(tmp_path):
    """No folds: results.csv (but for the split columns, added at its end), experiment.json (but for the datalist's
    sha256, added at its end) and the table note keep the layout they had before the fold axis."""
    config = _config(tmp_path, seeds=[0, 1], label_fractions=[1.0], folds=None)
    assert "folds" not in config
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    out = tmp_path / "out"
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header == ("method,checkpoint,label_fraction,seed,metric,value,seconds,run_dir,test_cases,test_positive,"
                      "train_cases,train_digest,holdout_digest,test_digest")
    assert list(json.loads((out / "experiment.json").read_text())) == ["bundle", "datalist", "metric", "overrides",
                                                                       "datalist_sha256", "versions"]
    assert (out / "table.md").read_text().split("\n| method | AUC 95 % CI")[0].endswith(  # the interval table follows
        "\n\nmean ± sample std over 2 seeds, ×100; p: independent two-sample Student's t-test against `random` at the "
        "same label fraction.\n")
    assert (out / "runs").exists() is False  # the fake runner writes nothing; folder names are checked below
    assert {r["run_dir"].rsplit("/", 1)[-1] for r in _rows(tmp_path)} == {
        "random_lf1_seed0", "random_lf1_seed1", "dira_lf1_seed0", "dira_lf1_seed1"}


def bundle_without_setting(tmp_path, key: str = "fold") -> str:
    """A copy of the LUNA16 bundle whose train.json lacks the top-level setting ``key`` (an older or own bundle)."""
    from dira3d.evaluation.finetune import bundle_path

    folder = tmp_path / f"no{key}_bundle"
    shutil.copytree(bundle_path("luna16_nodule_fpr"), folder)
    train = json.loads((folder / "configs" / "train.json").read_text())
    del train[key]
    (folder / "configs" / "train.json").write_text(json.dumps(train))
    return str(folder)


@pytest.mark.parametrize("extra, match", [
    ({"folds": []}, r"folds in .* must be a non-empty list of the datalist's fold numbers, e.g. folds: \[0, 1, 2\]"),
    ({"folds": 3}, r"folds in .* must be a non-empty list"),
    ({"folds": [0, 1.5]}, r"folds in .* must be whole numbers >= 0 .*got 1.5"),
    ({"folds": [-1]}, r"folds in .* must be whole numbers >= 0 .*got -1"),
    ({"folds": [True]}, r"folds in .* must be whole numbers >= 0 .*got True"),
    ({"folds": ["0"]}, r"folds in .* must be whole numbers >= 0 .*got '0'"),
    ({"folds": [0, 1, 1]}, r"folds in .* lists 1 more than once"),
    ({"overrides": {"tiny": True, "fold": 1}}, r"overrides in .* set fold, but folds runs every listed fold; remove fold"),
    ({"folds": [0, 3]}, r"folds in .* lists fold 3, which datalist .*dl.json does not have \(folds present: \[0, 1, 2\]\)"),
    ({"datalist": "plain.json"}, r"folds in .*: datalist .*plain.json has no cross-validation folds .*remove folds"),
    ({"datalist": "empty.json"}, r"folds in .*: datalist .*empty.json has no 'training' key.*remove folds"),
    ({"bundle": "<no fold>"}, r"folds in .*: bundle .*nofold_bundle' has no `fold` setting.*remove folds"),
])
def test_fold_config_errors_name_the_setting_before_any_run(tmp_path, extra, match):
    (tmp_path / "plain.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": 0, "case_id": "p"}],
                                                     "test": []}))
    (tmp_path / "empty.json").write_text("{}")
    if extra.get("bundle") == "<no fold>":
        extra = {"bundle": bundle_without_setting(tmp_path)}
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **extra)
    assert not (tmp_path / "out").exists()


def test_fold_in_overrides_without_folds_still_fixes_one_fold(tmp_path):
    """The existing way to run one other fold keeps working (a single-split grid, no fold column)."""
    config = _config(tmp_path, folds="<absent>", overrides={"tiny": True, "fold": 2}, seeds=[0], label_fractions=[1.0])
    calls = []
    run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
    assert {c["fold"] for c in calls} == {2} and "fold" not in _rows(tmp_path)[0]
