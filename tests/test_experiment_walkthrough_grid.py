"""``dira3d experiment`` as a researcher reruns it: a method switched to the experiment's own pretraining, and label
fractions the run folders and the table write alike (found by a walkthrough of docs/results.md, 2026-11-27)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from dira3d.evaluation.experiment import load_config, run_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TINY_PRETRAIN = {"dataset_dir": "vw", "configs": ["train.json", "tiny.json"]}


def write_experiment_config(tmp_path: Path, **extra) -> Path:
    (tmp_path / "dl.json").write_text('{"training": [], "test": []}')
    (tmp_path / "vw").mkdir(exist_ok=True)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    config = {"bundle": "luna16_nodule_fpr", "datalist": "dl.json", "metric": "auc", "output_dir": "out",
              "baseline": "random", "seeds": [0, 1], "label_fractions": [1.0], "methods": {"random": None, "dira": None},
              "overrides": {"tiny": True}, **extra}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _runner(calls: list):
    def run(bundle, overrides):
        calls.append(overrides)
        return {"auc": 0.7 + 0.01 * overrides["seed"] + (0.1 if overrides["pretrained"] else 0.0)}
    return run


@pytest.mark.parametrize("before", [None, "ckpt.pt"])
def test_rows_of_a_method_now_pretrained_by_the_experiment_are_not_reused(tmp_path, before):
    """`dira: null` (or `dira: ckpt.pt`) run first, then `dira: {pretrain: {}}`: every row of `dira` was taken as done,
    nothing was pretrained, and the table reported random-init (or the other checkpoint's) numbers as the pretrained
    method's."""
    run_experiment(load_config(write_experiment_config(tmp_path, methods={"random": None, "dira": before})), runner=_runner([]),
                   log=lambda _: None)
    now = load_config(write_experiment_config(tmp_path, methods={"random": None, "dira": {"pretrain": {}}}, pretrain=TINY_PRETRAIN))
    calls: list = []
    what = "random init" if before is None else r".*ckpt\.pt"
    with pytest.raises(ValueError, match=rf"results\.csv holds runs of method 'dira' fine-tuned from {what}, but the "
                                         r"config now pretrains it \(\{pretrain: \.\.\.\}, into pretrain/dira\)"):
        run_experiment(now, runner=_runner(calls), log=lambda _: None)
    assert calls == []


def test_rows_of_the_experiments_own_pretraining_are_reused_also_after_the_output_dir_moved(tmp_path):
    """The rows a pretrained method made itself (``.../pretrain/<method>/models/best.pt``) are its own, also when
    the output_dir was moved since (the path's start differs): nothing is run again."""
    path = write_experiment_config(tmp_path, methods={"random": None, "dira": {"pretrain": {}}}, pretrain=TINY_PRETRAIN)
    config = load_config(path)
    out = tmp_path / "out"
    out.mkdir()
    fields = ["method", "checkpoint", "label_fraction", "seed", "metric", "value", "seconds", "run_dir"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for method, checkpoint in (("random", ""), ("dira", "/elsewhere/out/pretrain/dira/models/best.pt")):
            for seed in (0, 1):
                writer.writerow({"method": method, "checkpoint": checkpoint, "label_fraction": "1.0", "seed": seed,
                                 "metric": "auc", "value": 0.7, "seconds": 1, "run_dir": "r"})
    calls: list = []
    assert len(run_experiment(config, runner=_runner(calls), log=lambda _: None)) == 4
    assert calls == []


@pytest.mark.parametrize("fractions, name", [
    ([0.1, 0.1000001], "'0.1'"),              # runs/<method>_lf0.1_seed0 for both
    ([0.3333333, 0.33333334], "'0.333333'"),
])
def test_label_fractions_named_alike_are_refused_before_any_run(tmp_path, fractions, name):
    """0.1 and 0.1000001 both ran into runs/<method>_lf0.1_seed<s> (the second replaced the first's folders, and both
    rows pointed to it) and the table had two columns '10 % labels'."""
    with pytest.raises(ValueError, match=rf"label_fractions in .* lists {fractions[0]!r} and {fractions[1]!r}, which "
                                         rf"the run folders or the table's columns both name {name}"):
        load_config(write_experiment_config(tmp_path, label_fractions=fractions))


def test_label_fractions_named_apart_are_accepted(tmp_path):
    config = load_config(write_experiment_config(tmp_path, label_fractions=[0.01, 0.1, 0.125, 1.0]))
    assert config["label_fractions"] == [0.01, 0.1, 0.125, 1.0]


def test_a_checkpoint_replaced_while_the_grid_runs_stops_it_before_its_runs_mix(tmp_path):
    """A `dira3d pretrain` still writing the method's best.pt: its sha256 was checked only when the command started,
    so the method's later seeds were fine-tuned from another file than its first ones, in one cell, without a word."""
    config = load_config(write_experiment_config(tmp_path, methods={"dira": "ckpt.pt", "random": None}, seeds=[0, 1, 2]))
    calls: list = []

    def run(bundle, overrides):
        calls.append(overrides)
        if len(calls) == 2:  # the pretraining writes a new best.pt while the second run loads it
            (tmp_path / "ckpt.pt").write_bytes(b"a better epoch")
        return {"auc": 0.7}

    with pytest.raises(ValueError, match=r"checkpoint .*ckpt\.pt of method 'dira' changed while the experiment ran "
                                         r"\(sha256 .* when it started, now .*\): the run dira labels=1 seed=1 is not "
                                         r"added to .*results\.csv"):
        run_experiment(config, runner=run, log=lambda _: None)
    assert len(calls) == 2
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        assert [(r["method"], r["seed"]) for r in csv.DictReader(handle)] == [("dira", "0")]
    # the rerun refuses the new file for the method's row, as for a file replaced between two calls
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt\.pt of method 'dira' changed since 1 run\(s\)"):
        run_experiment(config, runner=_runner([]), log=lambda _: None)


def test_an_unchanged_checkpoint_lets_every_run_of_the_grid_through(tmp_path):
    config = load_config(write_experiment_config(tmp_path, methods={"dira": "ckpt.pt", "random": None}, seeds=[0, 1, 2]))
    calls: list = []
    assert len(run_experiment(config, runner=_runner(calls), log=lambda _: None)) == len(calls) == 6


def test_the_plots_say_what_their_error_bars_are():
    """The error bars of auc_vs_label_fraction.png and ablation.png are the sample std over seeds, but the plots said
    only 'auc': a figure copied into a draft could not tell std from a standard error or a confidence interval."""
    from dira3d.evaluation.result_figures import ablation_figure, metric_figure
    from dira3d.evaluation.stats import CellSummary

    cells = [CellSummary(m, f, 3, 0.7, 0.05, (0.65, 0.7, 0.75)) for m in ("random", "dira") for f in (0.5, 1.0)]
    for make in (metric_figure, ablation_figure):
        figure = make(cells, "auc", ["random", "dira"])
        assert figure.axes[0].get_ylabel() == "auc (mean ± sample std over seeds)"


def _patients_datalist(tmp_path: Path, count: int) -> None:
    entries = [{"image": f"p{i}_image.nii.gz", "label": f"p{i}_label.nii.gz", "case_id": f"p{i}"} for i in range(count)]
    (tmp_path / "dl.json").write_text(json.dumps({"training": entries, "test": entries[:1]}))


@pytest.mark.parametrize("count, fractions, same", [
    (4, [0.1, 0.25, 0.5, 1.0], (0.1, 0.25)),  # both keep 1 of 4 patients (at least one)
    (3, [0.67, 0.8], (0.67, 0.8)),             # both keep 2 of 3
    (4, [0.5, 0.9, 1.0], (0.9, 1.0)),          # 3.6 rounds to all 4
])
def test_label_fractions_that_keep_the_same_entries_are_refused_before_any_run(tmp_path, count, fractions, same):
    """On a small labelled set the counts are rounded to whole patients: 10 % and 25 % of 4 patients both kept one,
    the subsets nest, so the two fractions' runs were the same runs, shown as two points of the curve."""
    from dira3d.evaluation import select_fraction

    path = write_experiment_config(tmp_path, label_fractions=fractions, bundle="lits_liver_seg", metric="dice")
    _patients_datalist(tmp_path, count)
    training = [{"case_id": f"p{i}"} for i in range(count)]
    for seed in (0, 1):  # what the refusal says: the same entries for every seed
        assert select_fraction(training, same[0], seed) == select_fraction(training, same[1], seed)
    with pytest.raises(ValueError, match=rf"label_fractions in .*: {same[0]:g} and {same[1]:g} keep the same \d+ of the "
                                         rf"{count} training entries of datalist .*dl\.json for every seed"):
        load_config(path)


def test_label_fractions_that_keep_different_entries_are_accepted(tmp_path):
    path = write_experiment_config(tmp_path, label_fractions=[0.25, 0.5, 1.0], bundle="lits_liver_seg", metric="dice")
    _patients_datalist(tmp_path, 8)  # 2, 4 and 8 patients
    assert load_config(path)["label_fractions"] == [0.25, 0.5, 1.0]


# dira3d's warning on rows with split sizes but no split digests (_runner_writing_splits writes no splits.json)
OLDER_ROWS = r"4 of its runs .* were made before dira3d recorded which cases each split holds .*on the split sizes only"


def _runner_writing_splits(calls: list, train_cases):
    """A runner that writes metrics.json as run_finetune does, its training split of ``train_cases(overrides)``."""
    def run(bundle, overrides):
        calls.append(overrides)
        value = 0.7 + 0.01 * overrides["seed"]
        out = Path(overrides["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        splits = {"train": {"cases": train_cases(overrides), "patients": 4, "positive": 2},
                  "test": {"cases": 20, "patients": 5, "positive": 6}}
        (out / "metrics.json").write_text(json.dumps({"metrics": {"auc": value}, "splits": splits}))
        return {"auc": value}
    return run


def test_a_run_that_drew_another_split_than_its_pairs_stops_the_grid(tmp_path):
    """A grid resumed after an upgrade that changed the split rules (the rounding of 2026-11-27: 25 % of 10 patients
    kept 2, then 3) added runs of other label subsets to the same cells and paired them by seed without a word;
    results.csv records each run's train_cases, so the clash is seen."""
    config = load_config(write_experiment_config(tmp_path, seeds=[0, 1]))
    run_experiment(config, runner=_runner_writing_splits([], lambda o: 43), log=lambda _: None)
    more = load_config(write_experiment_config(tmp_path, seeds=[0, 1], methods={"random": None, "dira": None, "dis": None}))
    calls: list = []
    with pytest.warns(UserWarning, match=OLDER_ROWS), \
            pytest.raises(ValueError, match=r"the run dis labels=1 seed=0 drew another split than the runs of the same "
                                            r"label fraction and seed in .*results\.csv \(dis labels=1 seed=0 has "
                                            r"train_cases 44, random labels=1 seed=0 43\)"):
        run_experiment(more, runner=_runner_writing_splits(calls, lambda o: 44), log=lambda _: None)
    assert len(calls) == 1
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        assert {r["method"] for r in csv.DictReader(handle)} == {"random", "dira"}
    # the same split: the new method's runs are added
    with pytest.warns(UserWarning, match=OLDER_ROWS):
        assert len(run_experiment(more, runner=_runner_writing_splits([], lambda o: 43), log=lambda _: None)) == 6


def test_rows_of_one_seed_with_different_splits_are_refused_before_any_run(tmp_path):
    """A results.csv that already mixes them (made before the check) is refused, naming the two runs."""
    config = load_config(write_experiment_config(tmp_path, seeds=[0, 1]))
    run_experiment(config, runner=_runner_writing_splits([], lambda o: 43), log=lambda _: None)
    path = tmp_path / "out" / "results.csv"
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows, fields = list(reader), reader.fieldnames
    rows[-1]["train_cases"] = "41"  # dira, seed 1
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    calls: list = []
    with pytest.raises(ValueError, match=r"results\.csv holds runs of one label fraction and seed that drew different "
                                         r"splits \(.*seed=1 has train_cases \d+, .*seed=1 \d+\)"):
        run_experiment(config, runner=_runner_writing_splits(calls, lambda o: 43), log=lambda _: None)
    assert calls == []
    # unknown (empty) split columns, as in a results.csv of before them, are not compared
    rows[-1]["train_cases"] = ""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.warns(UserWarning, match=OLDER_ROWS):
        assert len(run_experiment(config, runner=_runner_writing_splits(calls, lambda o: 43), log=lambda _: None)) == 4
    assert calls == []


@pytest.mark.parametrize("extra, named", [({"overrides": {"learning_rate": 0.0001}}, "overrides"),
                                          ({"seeds": [5]}, "seeds")])
def test_settings_beside_a_methods_pretrain_are_refused_not_ignored(tmp_path, extra, named):
    """`dira: {pretrain: {}, overrides: {learning_rate: 1e-4}}` (a lower fine-tuning rate for the pretrained method, as
    some papers use) ran the whole grid with the grid's rate, without a word."""
    path = write_experiment_config(tmp_path, methods={"random": None, "dira": {"pretrain": {}, **extra}}, pretrain=TINY_PRETRAIN)
    with pytest.raises(ValueError, match=rf"method 'dira' in .* sets {named} beside pretrain; a method takes only "
                                         r"\{pretrain: \{\.\.\.\}\}"):
        load_config(path)


@pytest.mark.parametrize("spec, match", [
    # "" (a template's unset variable) ran every run of `dira` from random init, reported as `dira`
    ("", r"method 'dira' in .* has an empty checkpoint path; give the checkpoint file, or null for random init"),
    # a pretraining's folder was said not to exist
    ("pre", r"checkpoint .*pre of method 'dira' in .* is a folder; give the checkpoint file in it"),
])
def test_an_empty_or_folder_checkpoint_is_refused_naming_the_method(tmp_path, spec, match):
    (tmp_path / "pre").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_config(write_experiment_config(tmp_path, methods={"random": None, "dira": spec}))
