"""``dira3d experiment`` as a user runs it: settings refused before any run, a grid stopped mid-way, a datalist
prepared again, and what the runs record (found by a walkthrough of the evaluation docs, 2026-11-27)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import yaml

from dira3d.engines import StageSchedule
from dira3d.evaluation.experiment import load_config, main, run_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _config(tmp_path: Path, **extra) -> Path:
    (tmp_path / "dl.json").write_text('{"training": [], "test": []}')
    (tmp_path / "vw").mkdir(exist_ok=True)
    config = {"bundle": "luna16_nodule_fpr", "datalist": "dl.json", "metric": "auc", "output_dir": "out",
              "seeds": [0, 1], "label_fractions": [0.5, 1.0], "methods": {"random": None},
              "overrides": {"tiny": True}, **extra}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _runner(calls: list, fail=lambda overrides: False, stop_after: int | None = None):
    def run(bundle, overrides):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(overrides)
        if fail(overrides):
            raise RuntimeError("out of memory")
        return {"auc": 0.7 + 0.01 * overrides["seed"]}
    return run


TINY_PRETRAIN = {"dataset_dir": "vw", "configs": ["train.json", "tiny.json"]}  # tiny.json: stages end at 1, 2; 3 epochs


@pytest.mark.parametrize("extra, match", [
    # seed -1 passed the config and every run of it failed with numpy's 'expected non-negative integer'
    ({"seeds": [-1, 1]}, r"seeds in .* must be whole numbers >= 0, got -1"),
    # the grid sets these for every run: the override was replaced without a word
    ({"overrides": {"tiny": True, "seed": 3}}, r"overrides in .* set seed, which the experiment sets for every run from "
                                               r"`seeds`; remove seed from overrides and use seeds"),
    ({"overrides": {"label_fraction": 0.3}}, r"set label_fraction, .* from `label_fractions`"),
    ({"overrides": {"pretrained": "x.pt"}}, r"set pretrained, .* from `methods`"),
    ({"overrides": {"datalist": "x.json"}}, r"set datalist, .* from `datalist`"),
    ({"overrides": {"output_dir": "x"}}, r"set output_dir, .* from `output_dir`"),
    ({"overrides": {"ckpt_dir": "x"}}, r"set ckpt_dir, .* from `output_dir`"),
    # bool("no") is True: the runs were tiny
    ({"overrides": {"tiny": "no"}}, r"tiny in the overrides of .* must be true or false, got 'no'"),
    # a YAML key 2024 is a number, which results.csv gives back as text: its runs were redone and added on every rerun
    ({"methods": {"random": None, 2024: None}}, r"method 2024 in .* is read as int, not a name; quote it \('2024': \.\.\.\)"),
    ({"methods": {"random": None, True: None}}, r"method True in .* is read as bool"),
    # a path as a name wrote its runs outside runs/ (and its pretraining outside pretrain/)
    ({"methods": {"random": None, "a/b": None}}, r"method 'a/b' in .* must be a plain name"),
    ({"methods": {"random": None, "../../x": None}}, r"method '\.\./\.\./x' in .* must be a plain name"),
    ({"methods": {"random": None, "..": None}}, r"method '\.\.' in .* must be a plain name"),
])
def test_settings_the_grid_would_misread_are_refused_before_any_run(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        load_config(_config(tmp_path, **extra))


@pytest.mark.parametrize("where, key, match", [
    # run_bundle(..., dataset_dir=..., **overrides): a TypeError traceback when the method's turn came
    ("section", "dataset_dir", r"pretrain overrides in .* set dataset_dir, .*the setting to use: pretrain: \{dataset_dir"),
    ("method", "bundle_root", r"pretrain of method 'dira' in .* set bundle_root"),
    # the checkpoint went elsewhere: done.json written, then every run of the method failed on a missing last.pt
    ("section", "ckpt_dir", r"pretrain overrides in .* set ckpt_dir, which the experiment sets for each method's "
                            r"pretraining \(<output_dir>/pretrain/<method>\)"),
])
def test_pretraining_overrides_that_move_its_folders_are_refused(tmp_path, where, key, match):
    pretrain = {**TINY_PRETRAIN, "overrides": {key: "elsewhere"} if where == "section" else {}}
    method = {"pretrain": {key: "elsewhere"} if where == "method" else {}}
    with pytest.raises(ValueError, match=match):
        load_config(_config(tmp_path, methods={"random": None, "dira": method}, pretrain=pretrain))


def test_pretraining_stages_are_checked_per_method_before_any_pretraining(tmp_path):
    """A bad stage of the last method stopped the experiment only when its turn came, after the other methods had
    pretrained, and its error did not name the method."""
    methods = {"random": None, "dis": {"pretrain": {"stages": [{"name": "dis", "losses": ["dis"]}]}},
               "dira": {"pretrain": {"stages": [{"name": "dira", "losses": ["dis", "res", "advv"]}]}}}
    with pytest.raises(ValueError, match=r"pretrain stages of method 'dira' in .*: stages\[0\] \(dira\): unknown loss "
                                         r"term\(s\) \['advv'\]"):
        load_config(_config(tmp_path, methods=methods, pretrain=TINY_PRETRAIN))


def test_a_stage_that_max_epochs_never_reaches_is_refused_naming_the_method(tmp_path):
    """`dira` with the stages of train.json (dis to epoch 20, dis+res to 60) and max_epochs 10 was pretrained with L_dis
    alone and reported as dis+res+adv in the ablation table."""
    pretrain = {"dataset_dir": "vw", "configs": ["train.json"], "overrides": {"max_epochs": 10}}
    with pytest.raises(ValueError, match=r"pretrain stages of method 'dira' in .*: stages 'dis_res', 'dira' \(losses "
                                         r"dis\+res, dis\+res\+adv\) never run: stage 'dis' lasts until epoch 20 and "
                                         r"max_epochs is 10; its pretraining would be reported as 'dira' without them"):
        load_config(_config(tmp_path, methods={"random": None, "dira": {"pretrain": {}}}, pretrain=pretrain))
    # the method's own max_epochs wins over the section's; tiny.json's stages end at epochs 1 and 2 of its 3
    ok = {"random": None, "dira": {"pretrain": {"max_epochs": 61}}, "tiny": {"pretrain": {"stages": [
        {"name": "dis", "until_epoch": 1, "losses": ["dis"]}, {"name": "dira", "losses": ["dis", "res", "adv"]}]}}}
    load_config(_config(tmp_path, methods=ok, pretrain={**pretrain, "overrides": {"width": 0.125}}))  # tiny fine-tuning's
    load_config(_config(tmp_path, methods={"random": None, "dira": {"pretrain": {}}}, pretrain=TINY_PRETRAIN))
    with pytest.raises(ValueError, match=r"stage 'dira' \(losses dis\+res\+adv\) never runs: stage 'dis_res' lasts "
                                         r"until epoch 2 and max_epochs is 2"):
        load_config(_config(tmp_path, methods={"random": None, "dira": {"pretrain": {"max_epochs": 2}}},
                            pretrain=TINY_PRETRAIN))


def test_stage_schedule_names_the_stages_a_run_never_enters():
    schedule = StageSchedule([{"name": "dis", "until_epoch": 2, "losses": ["dis"]},
                              {"name": "dis_res", "until_epoch": 4, "losses": ["dis", "res"]},
                              {"name": "dira", "losses": ["dis", "res", "adv"]}])
    assert [s.name for s in schedule.unreached(2)] == ["dis_res", "dira"]
    assert [s.name for s in schedule.unreached(3)] == [s.name for s in schedule.unreached(4)] == ["dira"]
    assert schedule.unreached(5) == [] and StageSchedule(None).unreached(1) == []
    by_iteration = StageSchedule([{"name": "a", "until_iteration": 6, "losses": ["dis"]}, {"name": "b", "losses": ["res"]}])
    assert by_iteration.unreached(2) == []  # the epoch length is not known: not judged
    assert [s.name for s in by_iteration.unreached(2, epoch_length=3)] == ["b"]
    assert by_iteration.unreached(3, epoch_length=3) == []


def test_the_trainer_warns_when_max_epochs_ends_the_run_before_a_stage(caplog):
    from test_engine import make_trainer

    stages = [{"name": "dis", "until_iteration": 1, "losses": ["dis"]}, {"name": "dira", "losses": ["dis", "res", "adv"]}]
    with caplog.at_level(logging.WARNING):
        make_trainer(stages=stages, max_epochs=1, volumes=4, batch=4).run()  # one iteration in all
    said = [r.getMessage() for r in caplog.records if "never run" in r.getMessage()]
    assert said == ["stage 'dira' (losses dis+res+adv) never runs: stage 'dis' lasts until iteration 1 and max_epochs is "
                    "1: this run trains without them; raise max_epochs or lower the stages' until_epoch / until_iteration "
                    "(a rerun with a higher max_epochs resumes from last.pt and trains them)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make_trainer(stages=stages, max_epochs=2, volumes=4, batch=4).run()
    assert not [r for r in caplog.records if "never run" in r.getMessage()]


def test_the_grid_keeps_failures_json_up_to_date_when_it_is_stopped(tmp_path):
    """The table says 'see failures.json', but the file was written only when the grid ended: after Ctrl-C (or
    SIGTERM, or a kill) it was missing, or held an older call's failures."""
    config = load_config(_config(tmp_path, seeds=[0, 1, 2], label_fractions=[1.0]))
    failures = tmp_path / "out" / "failures.json"
    calls: list = []
    with pytest.raises(KeyboardInterrupt):  # seed 0 fails, seed 1 runs, Ctrl-C before seed 2
        run_experiment(config, runner=_runner(calls, fail=lambda o: o["seed"] == 0, stop_after=2), log=lambda _: None)
    assert [(f["method"], f["seed"]) for f in json.loads(failures.read_text())] == [("random", 0)]
    # the next call stops at once: the failure it has not retried yet is still listed
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, runner=_runner([], stop_after=0), log=lambda _: None)
    assert [(f["method"], f["seed"]) for f in json.loads(failures.read_text())] == [("random", 0)]
    # retried with success, then stopped: no failure is left to list
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, runner=_runner([], stop_after=1), log=lambda _: None)
    assert not failures.exists()
    assert run_experiment(config, runner=_runner([]), log=lambda _: None) and not failures.exists()


def test_a_datalist_prepared_again_at_the_same_path_is_not_mixed_into_its_rows(tmp_path):
    """experiment.json recorded the datalist's path only: prepared again with other scans, the same path gave other
    label subsets and another test split, and the rerun added their runs to the old ones' cells."""
    path = _config(tmp_path, seeds=[0], label_fractions=[1.0])
    run_experiment(load_config(path), runner=_runner([]), log=lambda _: None)
    record = tmp_path / "out" / "experiment.json"
    assert json.loads(record.read_text())["datalist_sha256"]
    more_path = _config(tmp_path, seeds=[0, 1], label_fractions=[1.0])
    (tmp_path / "dl.json").write_text('{"training": [{"image": "more.nii.gz"}], "test": []}')
    more = load_config(more_path)
    with pytest.raises(ValueError, match=r"datalist .*dl\.json changed since the runs in .*results\.csv were made from it "
                                         r"\(sha256 .* recorded in .*experiment\.json"):
        run_experiment(more, runner=_runner([]), log=lambda _: None)
    # an experiment.json of before (no sha256) is not refused for it; the datalist is recorded from then on
    old = json.loads(record.read_text())
    del old["datalist_sha256"]
    record.write_text(json.dumps(old))
    calls: list = []
    run_experiment(more, runner=_runner(calls), log=lambda _: None)
    assert [c["seed"] for c in calls] == [1] and "datalist_sha256" in json.loads(record.read_text())


def test_the_default_runner_reads_tiny_as_a_boolean(monkeypatch):
    from dira3d.evaluation import experiment_grid, finetune

    seen = []
    monkeypatch.setattr(finetune, "run_finetune", lambda bundle, overrides, tiny, overwrite: seen.append(tiny) or
                        {"metrics": {"auc": 0.5}})
    for value in (False, "false", "no", True):
        experiment_grid._default_runner("luna16_nodule_fpr", {"tiny": value, "seed": 0})
    assert seen == [False, False, False, True]


def test_each_run_records_what_it_trained_on_and_the_command_names_its_outputs(tmp_path, capsys):
    """metrics.json gave the holdout and the test split but not the training split: the label fraction a run used
    could not be checked against what it trained on. It now gives ``splits.train`` (results.csv: train_cases), and
    the command ends by naming its outputs, as every dira3d command does."""
    from test_bundles_finetune import make_classification

    from dira3d.evaluation import load_split

    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    config = {"bundle": "luna16_nodule_fpr", "datalist": str(datalist), "metric": "auc", "output_dir": "out",
              "seeds": [0], "label_fractions": [0.5, 1.0], "methods": {"random": None},
              "overrides": {"tiny": True, "max_epochs": 1}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["--config", str(tmp_path / "experiment.yaml")]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    assert f"results:     {out / 'results.csv'} (one row per run; mean ± std, 95 % CI and p-values in {out / 'summary.json'})" in printed
    assert f"TensorBoard: tensorboard --logdir {out / 'runs'}" in printed
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        fraction = float(row["label_fraction"])
        train = load_split(datalist, "train", label_fraction=fraction, seed=0)
        holdout = load_split(datalist, "holdout", label_fraction=fraction, seed=0)
        splits = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["splits"]
        assert splits["train"] == {"cases": len(train), "patients": len({e["case_id"] for e in train}),
                                   "positive": sum(e["label"] for e in train)}
        assert row["train_cases"] == str(len(train))
        assert splits["train"]["cases"] + splits["holdout"]["cases"] == round(16 * fraction)  # 16 training entries
        assert not {e["case_id"] for e in train} & {e["case_id"] for e in holdout}  # by patient
    assert sorted(int(r["train_cases"]) for r in rows)[0] < sorted(int(r["train_cases"]) for r in rows)[1]


def test_summary_json_is_strict_json_with_a_one_seed_cell(tmp_path):
    """A cell of one seed (the others failed or not run yet) has no std: summary.json wrote NaN, which is no JSON
    (jq, JavaScript's JSON.parse and pandas' strict readers refuse the file); it is null, as its p_value."""
    from dira3d.evaluation.experiment import ExperimentRunsFailed

    config = load_config(_config(tmp_path, seeds=[0, 1], label_fractions=[1.0]))
    with pytest.raises(ExperimentRunsFailed):
        run_experiment(config, runner=_runner([], fail=lambda o: o["seed"] == 1), log=lambda _: None)

    def no_constants(name):
        raise ValueError(f"{name} in summary.json")
    cells = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=no_constants)
    assert [(c["n"], c["mean"], c["std"], c["p_value"]) for c in cells] == [(1, 0.7, None, None)]
