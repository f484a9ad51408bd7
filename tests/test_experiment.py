"""The experiment grid: resumable CSV, aggregation, table and plots (fine-tuning replaced by a known function)."""

import csv
import json

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


def test_baseline_listed_after_another_method_does_not_stop_the_grid(tmp_path):
    """The first run is `dira`: the report written after it has no baseline yet (used to raise)."""
    config = _config(tmp_path, baseline="random", methods={"dira": "ckpt.pt", "random": None})
    calls = []
    rows = run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
    assert len(rows) == len(calls) == 12
    assert "| dira | 76.00 ± 1.00 (p<0.001) |" in (tmp_path / "out" / "table.md").read_text()


def test_a_failing_run_does_not_stop_the_others_and_is_retried_on_rerun(tmp_path):
    from dira3d.evaluation.experiment import ExperimentRunsFailed

    config = _config(tmp_path)

    def flaky(bundle, overrides):
        if overrides["seed"] == 1 and overrides["pretrained"]:
            raise RuntimeError("Failed to instantiate component") from ValueError("checkpoint width 0.25 does not fit")
        return fake_runner([])(bundle, overrides)

    with pytest.raises(ExperimentRunsFailed, match="2 of 12 runs failed.*checkpoint width 0.25"):
        run_experiment(config, runner=flaky, log=lambda _: None)
    with open(tmp_path / "out" / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 10  # every other run finished
    assert (tmp_path / "out" / "failures.json").is_file()
    calls = []
    run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
    assert [(c["label_fraction"], c["seed"]) for c in calls] == [(0.5, 1), (1.0, 1)]
    assert not (tmp_path / "out" / "failures.json").exists()


def test_the_table_states_n_and_names_a_failed_run_it_leaves_out(tmp_path):
    """Found by a user walkthrough: a failed seed vanished from the table (mean ± std over fewer seeds, no n, no
    word of it under the table), and a missing p-value looked like the baseline's."""
    from dira3d.evaluation.experiment import ExperimentRunsFailed

    config = _config(tmp_path)
    logged = []

    def flaky(bundle, overrides):
        if overrides["seed"] == 2 and overrides["pretrained"] and overrides["label_fraction"] == 0.5:
            raise RuntimeError("holdout is empty")
        if overrides["label_fraction"] == 1.0:  # every seed scores the same: the t-test is undefined
            return {"auc": 0.9}
        return fake_runner([])(bundle, overrides)

    with pytest.raises(ExperimentRunsFailed, match="1 of 12 runs failed"):
        run_experiment(config, runner=flaky, log=logged.append)
    table = (tmp_path / "out" / "table.md").read_text()
    # dira @ 0.5: seeds 0 and 1 only (0.75, 0.76), against random's three seeds
    assert "| dira | 75.50 ± 0.71 (p=0.001; n=2) | 90.00 ± 0.00 (p n/a) |" in table
    assert "| random | 66.00 ± 1.00 | 90.00 ± 0.00 |" in table
    assert "mean ± sample std over 3 seeds, ×100; p: independent two-sample Student's t-test" in table
    assert "n=…: a cell of fewer seeds" in table and "p n/a: the test is undefined" in table
    assert "Left out (not run yet, or failed: see failures.json): dira @ 50 % labels, seed 2." in table
    assert any("left out of the statistics" in line and "dira @ 50 % labels, seed 2" in line for line in logged)

    run_experiment(config, runner=fake_runner([]), log=lambda _: None)  # the rerun completes the grid
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Left out" not in table and "n=" not in table and "| dira | 76.00 ± 1.00 (p<0.001) |" in table


def test_an_undefined_test_metric_is_a_failed_run_not_a_crash_of_the_grid(tmp_path):
    from dira3d.evaluation.experiment import ExperimentRunsFailed

    config = _config(tmp_path)

    def nan_auc(bundle, overrides):  # run_finetune writes a NaN AUC (test split of one class) as None
        if overrides["seed"] == 2 and not overrides["pretrained"]:
            return {"auc": None}
        return fake_runner([])(bundle, overrides)

    with pytest.raises(ExperimentRunsFailed, match="2 of 12 runs failed.*'auc' is undefined"):
        run_experiment(config, runner=nan_auc, log=lambda _: None)
    with open(tmp_path / "out" / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 10  # the runs after it were not lost
    assert (tmp_path / "out" / "failures.json").is_file()


def test_report_counts_each_run_of_the_current_grid_once(tmp_path):
    """Duplicated rows (two processes on one output_dir) and runs no longer in the grid stay out of the stats."""
    config = _config(tmp_path)
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    csv_path = tmp_path / "out" / "results.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines + lines[1:4]) + "\n")  # random @ 0.5, seeds 0-2 twice
    smaller = _config(tmp_path, seeds=[0, 1], label_fractions=[1.0])
    run_experiment(smaller, runner=fake_runner([]), log=lambda _: None)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "50 % labels" not in table
    assert "| random | 70.50 ± 0.71 |" in table  # seeds 0 and 1 only: 0.70, 0.71


@pytest.mark.parametrize("extra, error, match", [
    ({"welsh": True}, ValueError, "unknown setting 'welsh' \\(did you mean 'welch'\\?\\)"),
    ({"methods": {"random": None, "dira": "missing.pt"}}, FileNotFoundError, "missing.pt of method 'dira'"),
    ({"datalist": "nope.json"}, FileNotFoundError, "datalist .*nope.json"),
    ({"bundle": "luna16_nodule"}, FileNotFoundError, "bundle 'luna16_nodule' not found"),
    ({"label_fractions": 0.5}, ValueError, "label_fractions .* must be a non-empty list"),
    # found by a user walkthrough: these ran (seed 0.5 as seed 0) or failed mid-grid without naming the setting
    ({"seeds": [0.5]}, ValueError, "seeds in .* must be whole numbers, got 0.5"),
    ({"seeds": ["a"]}, ValueError, "seeds in .* must be whole numbers, got 'a'"),
    ({"seeds": [0, 0]}, ValueError, "seeds in .* lists 0 more than once"),
    ({"label_fractions": ["ten"]}, ValueError, "label_fractions in .* must be numbers in \\(0, 1\\], got 'ten'"),
    ({"metric": "acc"}, ValueError, "metric 'acc' .*bundle 'luna16_nodule_fpr' reports 'auc'"),
    ({"methods": {"random": None, "dira": {"pretrain": {}}}, "pretrain": {"dataset_dir": "no_such_vw"}},
     FileNotFoundError, "pretrain dataset_dir .*no_such_vw.* does not exist"),
])
def test_config_errors_name_the_setting_before_any_run(tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        _config(tmp_path, **extra)


def test_finetune_refuses_an_override_no_config_defines(tmp_path):
    from dira3d.evaluation.finetune import run_finetune

    with pytest.raises(ValueError, match="'max_epoch' \\(did you mean 'max_epochs'\\?\\)"):
        run_finetune("luna16_nodule_fpr", {"max_epoch": 1, "output_dir": str(tmp_path / "ft")}, tiny=True)


def test_finetune_refuses_text_for_a_number_setting_before_training(tmp_path):
    # max_epochs=two used to fail inside the run as MONAI's "Failed to evaluate ConfigExpression"
    from dira3d.evaluation.finetune import run_finetune

    with pytest.raises(ValueError, match=r"max_epochs='two' is text, but the setting is a number \(default 200\)"):
        run_finetune("luna16_nodule_fpr", {"max_epochs": "two", "output_dir": str(tmp_path / "ft")})
    assert not (tmp_path / "ft").exists()


def test_a_changed_checkpoint_or_pretraining_is_not_reused_silently(tmp_path):
    """Rows (and a finished pretraining) made with other settings than the config now gives would
    be reported under the new settings: refused, with the method named."""
    import json

    config = _config(tmp_path)
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    (tmp_path / "other.pt").write_bytes(b"")
    changed = _config(tmp_path, methods={"random": None, "dira": "other.pt"})
    with pytest.raises(ValueError, match=r"holds runs of method 'dira' fine-tuned from .*ckpt\.pt.*now gives .*other\.pt"):
        run_experiment(changed, runner=fake_runner([]), log=lambda _: None)

    (tmp_path / "vw").mkdir()
    spec = {"pretrain": {"dataset_dir": "vw", "overrides": {"max_epochs": 200}},
            "methods": {"random": None, "dira": {"pretrain": {"lambda_adv": 0.5}}}, "output_dir": "out2",
            "overrides": {"tiny": True, "width": 1.0}}  # the width train.json pretrains at (load_config checks it)
    config = _config(tmp_path, **spec)
    folder = tmp_path / "out2" / "pretrain" / "dira"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "best.pt").write_bytes(b"")
    # a pretraining finished by an earlier version (done.json only) with the same overrides is reused
    (folder / "done.json").write_text(json.dumps({"method": "dira", "overrides": {"max_epochs": 200, "lambda_adv": 0.5}}))
    calls = []
    run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
    assert len(calls) == 12 and {c["pretrained"] for c in calls} == {"", str(folder / "models" / "best.pt")}
    # ... and once its settings are recorded, a change of one override is refused, even with every run done
    (folder / "settings.json").write_text(json.dumps({"configs": [], "dataset_dir": str(tmp_path / "vw"),
                                                       "overrides": {"max_epochs": 200, "lambda_adv": 0.5}}))
    with pytest.raises(ValueError, match=r"method 'dira' was pretrained in .* \(configs changed\)"):
        run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    changed = _config(tmp_path, **{**spec, "methods": {"random": None, "dira": {"pretrain": {"lambda_adv": 0.1}}}})
    with pytest.raises(ValueError, match=r"overrides\.lambda_adv changed"):
        run_experiment(changed, runner=fake_runner([]), log=lambda _: None)


def test_a_checkpoint_replaced_at_the_same_path_is_not_mixed_into_its_rows(tmp_path):
    """Found by a user walkthrough: a pretraining rerun into the same folder replaced best.pt, and the next
    `dira3d experiment` (more seeds, or a retried run) added runs of the new weights to the old ones' cells."""
    config = _config(tmp_path)
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    results = (tmp_path / "out" / "results.csv").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(b"other weights")
    calls = []
    more = dict(config, seeds=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt\.pt of method 'dira' changed since 6 run\(s\) in "
                                         r".*results\.csv.*Give the method a new name"):
        run_experiment(more, runner=fake_runner(calls), log=lambda _: None)
    assert calls == [] and (tmp_path / "out" / "results.csv").read_bytes() == results
    (tmp_path / "ckpt.pt").write_bytes(b"")  # the earlier file back: the grid goes on
    run_experiment(more, runner=fake_runner(calls), log=lambda _: None)
    assert [(c["pretrained"] != "", c["seed"]) for c in calls] == [(False, 3), (True, 3)] * 2
    # a method without runs yet records the new file; so does a fresh output_dir
    (tmp_path / "ckpt.pt").write_bytes(b"other weights")
    run_experiment(dict(config, output_dir=str(tmp_path / "out2")), runner=fake_runner([]), log=lambda _: None)


def test_a_checkpoint_without_runs_may_change_and_a_method_left_out_keeps_its_record(tmp_path):
    """checkpoints.json guards rows, not files: a method whose every run failed may get a new checkpoint; and the
    record of a method left out of one run of the config (its rows stay in results.csv) is kept, so that its rows are
    still guarded when it comes back."""
    from dira3d.evaluation.experiment import ExperimentRunsFailed

    config = _config(tmp_path)
    record = tmp_path / "out" / "checkpoints.json"

    def pretrained_fails(bundle, overrides):
        if overrides["pretrained"]:
            raise RuntimeError("the checkpoint does not load")
        return fake_runner([])(bundle, overrides)

    with pytest.raises(ExperimentRunsFailed, match="6 of 12 runs failed"):
        run_experiment(config, runner=pretrained_fails, log=lambda _: None)
    first = json.loads(record.read_text())["dira"]["sha256"]
    (tmp_path / "ckpt.pt").write_bytes(b"the fixed checkpoint")  # no row of dira yet: taken, and recorded
    calls = []
    run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
    assert len(calls) == 6 and all(c["pretrained"] for c in calls)
    assert json.loads(record.read_text())["dira"]["sha256"] not in ("", first)
    # a run of the baseline alone, then dira again with a replaced checkpoint: its 6 rows are still guarded
    run_experiment(dict(config, methods={"random": None}, seeds=[0, 1, 2, 3]), runner=fake_runner([]),
                   log=lambda _: None)
    assert "dira" in json.loads(record.read_text())
    (tmp_path / "ckpt.pt").write_bytes(b"other weights")
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt\.pt of method 'dira' changed since 6 run\(s\)"):
        run_experiment(dict(config, seeds=[0, 1, 2, 3]), runner=fake_runner([]), log=lambda _: None)


def test_the_table_names_the_first_20_runs_left_out_and_counts_the_others(tmp_path):
    from dira3d.evaluation.experiment import ExperimentRunsFailed

    def dira_fails(bundle, overrides):
        if overrides["pretrained"]:
            raise RuntimeError("out of memory")
        return fake_runner([])(bundle, overrides)

    for seeds, shown, more in ((10, 20, ""), (11, 20, "; and 2 more")):
        config = _config(tmp_path, seeds=list(range(seeds)), output_dir=f"out{seeds}")
        with pytest.raises(ExperimentRunsFailed):
            run_experiment(config, runner=dira_fails, log=lambda _: None)
        note = (tmp_path / f"out{seeds}" / "table.md").read_text().split("Left out (not run yet, or failed: see "
                                                                         "failures.json): ")[1]
        names = [f"dira @ {f} % labels, seed {s}" for f in (50, 100) for s in range(seeds)]
        assert note == "; ".join(names[:shown]) + more + ".\n", note


def test_a_second_experiment_on_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl", reason="the output-folder lock uses POSIX flock")
    import subprocess
    import sys

    from dira3d.evaluation.experiment import ExperimentBusy, main

    config = _config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # another process holds the folder (as a running `dira3d experiment` does), then ends
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"h = open({str(out / '.dira3d.lock')!r}, 'a+'); fcntl.flock(h, fcntl.LOCK_EX); h.write('process 4242'); "
        "h.flush(); print('locked', flush=True); sys.stdin.readline()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        calls = []
        with pytest.raises(ExperimentBusy, match=r"output_dir .* is in use by process 4242: a second `dira3d experiment`"):
            run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
        assert calls == [] and not (out / "results.csv").exists()  # nothing ran, nothing written
        assert main(["--config", str(tmp_path / "experiment.yaml")]) == 2
        assert "choose another output folder" in capsys.readouterr().err
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    rows = run_experiment(config, runner=fake_runner(calls), log=lambda _: None)  # the holder ended: free again
    assert len(rows) == 12
    with open(out / ".dira3d.lock", "a+") as handle:  # and this process released it when it returned
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_changed_finetuning_setting_is_not_mixed_into_the_table(tmp_path):
    """Rows fine-tuned for 1 epoch must not be reported together with new ones of 8 epochs (or on another
    datalist / metric): the rerun is refused with the changed setting named; put back, it resumes."""
    config = _config(tmp_path, seeds=[0, 1])
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    changed = _config(tmp_path, seeds=[0, 1, 2], overrides={"tiny": True, "max_epochs": 8})
    calls = []
    with pytest.raises(ValueError, match=r"other fine-tuning settings \(overrides\.max_epochs changed"):
        run_experiment(changed, runner=fake_runner(calls), log=lambda _: None)
    assert calls == []
    (tmp_path / "dl2.json").write_text('{"training": []}')  # another content ("{}" too is dl.json renamed: the same)
    with pytest.raises(ValueError, match=r"\(datalist changed.*datalist was .*dl\.json, now .*dl2\.json, whose data are not"):
        run_experiment(_config(tmp_path, seeds=[0, 1, 2], datalist="dl2.json"), runner=fake_runner(calls), log=lambda _: None)
    assert calls == []
    run_experiment(_config(tmp_path, seeds=[0, 1, 2]), runner=fake_runner(calls), log=lambda _: None)
    assert len(calls) == 4  # seed 2 only


def test_a_pretraining_that_failed_at_its_start_does_not_lock_the_method(tmp_path, monkeypatch):
    """A pretraining that failed before writing any checkpoint (e.g. a bad setting) made nothing with the
    settings it recorded: after fixing the config the method is pretrained, not refused as 'changed'."""
    import json

    from dira3d.evaluation import experiment

    (tmp_path / "vw").mkdir()
    spec = {"pretrain": {"dataset_dir": "vw", "overrides": {"max_epochs": 200}},
            "methods": {"random": None, "dira": {"pretrain": {"lambda_adv": 0.5}}},
            "overrides": {"tiny": True, "width": 1.0}}  # the width train.json pretrains at (load_config checks it)
    folder = tmp_path / "out" / "pretrain" / "dira"
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({"configs": [], "dataset_dir": str(tmp_path / "vw_typo"),
                                                       "overrides": {"max_epochs": 200, "lambda_adv": 0.5}}))
    runs = []

    def fake_bundle(configs, **kwargs):
        runs.append(kwargs)
        (folder / "models").mkdir(exist_ok=True)
        (folder / "models" / "best.pt").write_bytes(b"")

    monkeypatch.setattr("dira3d.utils.overrides.run_bundle", fake_bundle)
    run_experiment(_config(tmp_path, **spec), runner=fake_runner([]), log=lambda _: None)
    assert len(runs) == 1 and runs[0]["dataset_dir"] == str(tmp_path / "vw")
    assert json.loads((folder / experiment.SETTINGS_NAME).read_text())["dataset_dir"] == str(tmp_path / "vw")


def test_welch_in_the_config_gives_welchs_p_values_in_the_report(tmp_path):
    """welch: true must reach the t-test (here the spreads differ 50-fold, so Student's p is far off)."""
    import json

    from scipy.stats import ttest_ind

    def runner(bundle, overrides):
        seed = overrides["seed"]
        value = 0.7 + 0.05 * seed ** 2 if overrides["pretrained"] else 0.6 + 0.001 * seed
        return {"auc": value + 0.1 * overrides["label_fraction"]}

    dira, random = [0.75, 0.80, 0.95], [0.65, 0.651, 0.652]  # @ 50 % labels, seeds 0, 1, 2
    for welch in (True, False):
        config = _config(tmp_path, welch=welch, output_dir=f"out_{welch}")
        run_experiment(config, runner=runner, log=lambda _: None)
        out = tmp_path / f"out_{welch}"
        cell = next(c for c in json.loads((out / "summary.json").read_text())
                    if c["method"] == "dira" and c["label_fraction"] == 0.5)
        expected = ttest_ind(dira, random, equal_var=not welch).pvalue
        assert cell["p_value"] == pytest.approx(expected, rel=1e-6), welch
        assert ("Welch's t-test" if welch else "Student's t-test") in (out / "table.md").read_text()
    assert ttest_ind(dira, random, equal_var=False).pvalue != pytest.approx(ttest_ind(dira, random).pvalue, rel=0.05)


def test_a_results_row_cut_short_is_refused_and_rows_are_written_atomically(tmp_path, monkeypatch):
    """results.csv was appended to: a full disk could leave half a row, which the next run took as a
    finished run (a value cut to fewer digits) or as a run of another checkpoint, and appended its own
    row onto the same line."""
    from dira3d.evaluation import results  # writes results.csv

    config = _config(tmp_path)
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    csv_path = tmp_path / "out" / "results.csv"
    whole = csv_path.read_text()
    lines = whole.splitlines()
    seconds_end = len(",".join(lines[-1].split(",")[:7]))
    # inside the checkpoint path; inside the seconds; inside run_dir (the empty test split columns are lost)
    for cut in (25, seconds_end - 1, len(lines[-1]) - 5):
        csv_path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:cut])
        calls = []
        with pytest.raises(ValueError, match=rf"{csv_path} line 13 is incomplete or garbled .*delete that line"):
            run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
        assert not calls

    csv_path.write_text("\n".join(lines[:-1]) + "\n")  # the last run is redone; the disk fills as its row is written
    real = results.atomic_write_text

    def full_disk(path, text, *args):
        if path.name == "results.csv":
            raise OSError(28, "No space left on device", str(path))
        return real(path, text, *args)

    monkeypatch.setattr(results, "atomic_write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    assert csv_path.read_text() == "\n".join(lines[:-1]) + "\n"  # the previous file, whole
    monkeypatch.setattr(results, "atomic_write_text", real)
    assert len(run_experiment(config, runner=fake_runner([]), log=lambda _: None)) == 12
    assert csv_path.read_text().splitlines()[:-1] == lines[:-1]


# dira3d's warning on rows with split sizes but no split digests (these fake runners write no splits.json)
OLDER_ROWS = r"were made before dira3d recorded which cases each split holds .*checked .* on the split sizes only"


def _runner_writing_metrics(calls, positive, earlier=False):
    """fake_runner that also writes the run's metrics.json as run_finetune does (``splits.test`` of 20 cases with
    ``positive``); ``earlier``: the metrics.json of an earlier attempt (another AUC) stays in the folder."""
    import json
    from pathlib import Path

    inner = fake_runner(calls)

    def run(bundle, overrides):
        metrics = inner(bundle, overrides)
        out = Path(overrides["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        splits = {"holdout": {"cases": 3, "patients": 3, "positive": 1},
                  "test": {"cases": 20, "patients": 20, "positive": positive}}
        (out / "metrics.json").write_text(json.dumps({"metrics": {"auc": metrics["auc"] - 0.5 * earlier}, "splits": splits}))
        return metrics
    return run


@pytest.mark.parametrize("positive, shown", [(7, "7"), ([3, 0, 12], "3;0;12"), (None, "")])
def test_results_csv_records_the_test_split_of_each_run(tmp_path, positive, shown):
    """Each row gives the test split's cases and positives from its run's metrics.json (a multi-label split's
    positives per class, ';'-joined; a segmentation split's unknown count empty), so a table's numbers can be read
    against what they were scored on."""
    config = _config(tmp_path, seeds=[0], label_fractions=[1.0])
    run_experiment(config, runner=_runner_writing_metrics([], positive), log=lambda _: None)
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames[-6:] == ["test_cases", "test_positive", "train_cases", "train_digest", "holdout_digest",
                                      "test_digest"]
    assert [(r["test_cases"], r["test_positive"]) for r in rows] == [("20", shown)] * 2
    with pytest.warns(UserWarning, match=OLDER_ROWS):  # the fake runner writes no splits.json: rows without digests
        assert len(run_experiment(config, runner=fake_runner([]), log=lambda _: None)) == 2  # read back: nothing to redo


def test_results_csv_leaves_the_test_split_empty_without_this_runs_metrics_json(tmp_path):
    config = _config(tmp_path, seeds=[0], label_fractions=[1.0])
    run_experiment(config, runner=_runner_writing_metrics([], 7, earlier=True), log=lambda _: None)
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        assert [(r["test_cases"], r["test_positive"]) for r in csv.DictReader(handle)] == [("", "")] * 2


def test_an_older_results_csv_without_the_test_split_columns_loads_and_resumes(tmp_path):
    """A results.csv written before the test split columns is read, its rows kept, and the rerun adds the missing
    runs (with the columns; the older rows' are empty) without a settings refusal; the file then reads back."""
    config = _config(tmp_path, seeds=[0, 1])
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    csv_path = tmp_path / "out" / "results.csv"
    older = [",".join(line.split(",")[:8]) for line in csv_path.read_text().splitlines()]  # the columns of before
    assert older[0] == "method,checkpoint,label_fraction,seed,metric,value,seconds,run_dir"
    csv_path.write_text("\n".join(older) + "\n")
    calls = []
    rows = run_experiment(_config(tmp_path, seeds=[0, 1, 2]), runner=_runner_writing_metrics(calls, 7), log=lambda _: None)
    assert len(calls) == 4 and len(rows) == 12  # seed 2 only
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        written = list(reader)
    assert reader.fieldnames == older[0].split(",") + ["test_cases", "test_positive", "train_cases", "train_digest",
                                                       "holdout_digest", "test_digest"]
    assert [",".join(list(r.values())[:8]) for r in written[:8]] == older[1:]  # the older rows, as they were
    assert {(r["test_cases"], r["test_positive"]) for r in written[:8]} == {("", "")}
    assert {(r["test_cases"], r["test_positive"]) for r in written[8:]} == {("20", "7")}
    calls = []
    with pytest.warns(UserWarning, match=r"4 of its runs \(e\.g\. random labels=0\.5 seed=2\) " + OLDER_ROWS):  # seed 2's
        assert len(run_experiment(_config(tmp_path, seeds=[0, 1, 2]), runner=fake_runner(calls), log=lambda _: None)) == 12
    assert calls == []
