"""``split_seed``: a seed of the label subset and early-stopping holdout apart from the seed of training (2026-11-28).

One ``seed`` drove, in every task bundle, the label-fraction subset, the patient holdout (``load_split``) and the
initialisation / augmentation (``set_determinism``), so the spread over the seeds of a ``dira3d experiment`` grid mixed
"which cases were labelled" with "how training went". Every task bundle's train.json now has ``split_seed`` (default
``@seed``: the same splits as before), which every ``load_split`` of train.json and evaluate.json takes;
``dira3d finetune --split-seed`` and the experiment config's ``split_seed`` set it."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from test_bundles_finetune import make_classification
from test_experiment_walkthrough_grid import write_experiment_config
from test_experiment_folds import bundle_without_setting
from test_experiment_split_ids import fake_runner

from dira3d.evaluation import load_split
from dira3d.evaluation.experiment import load_config, run_experiment
from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D, bundle_path, main, run_finetune
from dira3d.utils import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TASK_BUNDLES = sorted(BUNDLES + BUNDLES_2D)


def test_there_are_nine_task_bundles():
    assert len(TASK_BUNDLES) == 9 and "dira_pretrain" not in TASK_BUNDLES


# ------------------------------------------------------------------------------------------------ the bundles' configs


@pytest.mark.parametrize("bundle", TASK_BUNDLES)
def test_every_load_split_of_a_task_bundle_draws_with_split_seed_whose_default_is_seed(bundle):
    """Each load_split call of every config of the bundle passes seed=@split_seed (none draws with @seed), and
    train.json's split_seed is "@seed", so a run given no split_seed draws the splits it drew before."""
    configs = bundle_path(bundle) / "configs"
    train = json.loads((configs / "train.json").read_text(encoding="utf-8"))
    assert train["seed"] == 0 and train["split_seed"] == "@seed"
    calls = 0
    for path in sorted(configs.glob("*.json")):
        text = path.read_text(encoding="utf-8")
        for call in re.findall(r"load_split\([^\"]*\)", text):
            calls += 1
            assert "seed=@split_seed," in call and "@seed" not in call.replace("@split_seed", ""), (path.name, call)
    assert calls == 3  # train.json's training and holdout lists, evaluate.json's scored split


def _flow(bundle: str, tmp_path: Path, name: str, datalist: Path, evaluate: bool = False, **overrides):
    from monai.bundle import ConfigWorkflow

    configs = bundle_path(bundle) / "configs"
    files = [configs / "train.json", configs / "tiny.json"] + ([configs / "evaluate.json"] if evaluate else [])
    return ConfigWorkflow(config_file=[str(f) for f in files], meta_file=str(configs / "metadata.json"),
                          logging_file=False, workflow_type=None, bundle_root=str(tmp_path / name),
                          datalist=str(datalist), device="cpu", cache_rate=0.0, label_fraction=0.5, **overrides)


def _drawn(bundle: str, tmp_path: Path, name: str, datalist: Path, **overrides) -> dict:
    """The training and holdout lists (their images), evaluate.json's holdout (eval_split=holdout) and the network's
    weights the bundle builds after ``initialize`` (set_determinism) with ``overrides``."""
    flow = _flow(bundle, tmp_path, name, datalist, **overrides)
    flow.initialize()
    try:
        drawn = {key: [e["image"] for e in flow.parser.get_parsed_content(f"{key}#datalist")] for key in ("train", "validate")}
        drawn["split_seed"] = flow.parser.get_parsed_content("split_seed")
        drawn["network"] = {k: v.clone() for k, v in flow.parser.get_parsed_content("network").state_dict().items()}
    finally:
        flow.finalize()
    flow = _flow(bundle, tmp_path, name + "_eval", datalist, evaluate=True, eval_split="holdout", **overrides)
    drawn["evaluate"] = [e["image"] for e in flow.parser.get_parsed_content("validate#datalist")]
    return drawn


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seeds_0_and_1_with_one_split_seed_draw_the_same_cases_and_another_initialisation(tmp_path):
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    bundle = "luna16_nodule_fpr"
    # without split_seed, seeds 0 and 1 draw other training cases at 50 % labels (so the test below tells them apart)
    today = {s: load_split(datalist, "train", label_fraction=0.5, seed=s) for s in (0, 1)}
    assert [e["image"] for e in today[0]] != [e["image"] for e in today[1]]
    runs = {seed: _drawn(bundle, tmp_path, f"s{seed}", datalist, seed=seed, split_seed=5) for seed in (0, 1)}
    for key in ("train", "validate", "evaluate"):
        assert runs[0][key] == runs[1][key] and runs[0][key], key
    assert runs[0]["validate"] == runs[0]["evaluate"]  # evaluate.json's holdout is train.json's
    expected = {split: [e["image"] for e in load_split(datalist, split, label_fraction=0.5, seed=5)]
                for split in ("train", "holdout")}
    assert runs[0]["train"] == expected["train"] and runs[0]["validate"] == expected["holdout"]
    assert not _same_weights(runs[0]["network"], runs[1]["network"])  # seed still seeds the initialisation
    # and the reverse: one seed, another split_seed: other cases, the same initialisation
    other = _drawn(bundle, tmp_path, "s0_split6", datalist, seed=0, split_seed=6)
    assert other["train"] != runs[0]["train"] and _same_weights(other["network"], runs[0]["network"])


@pytest.mark.parametrize("seed", [0, 3])
def test_without_split_seed_a_bundle_draws_what_it_drew_before_with_its_seed(tmp_path, seed):
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    drawn = _drawn("luna16_nodule_fpr", tmp_path, "run", datalist, seed=seed)
    assert drawn["split_seed"] == seed  # the default, "@seed"
    assert drawn["train"] == [e["image"] for e in load_split(datalist, "train", label_fraction=0.5, seed=seed)]
    assert drawn["validate"] == drawn["evaluate"] == [
        e["image"] for e in load_split(datalist, "holdout", label_fraction=0.5, seed=seed)]
    same = _drawn("luna16_nodule_fpr", tmp_path, "same", datalist, seed=seed, split_seed=seed)
    assert same["train"] == drawn["train"] and _same_weights(same["network"], drawn["network"])


@pytest.mark.parametrize("value", [None, 1.5, -1, True, "2"])
def test_a_split_seed_that_is_no_whole_number_is_refused_naming_it(tmp_path, value):
    """int(1.5) drew seed 1's split without a word; null and -1 failed in numpy, in MONAI's traceback."""
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    with pytest.raises(ValueError, match=r"seed=.* of the label subset and early-stopping holdout \(a task bundle's "
                                         r"split_seed, by default its seed\) must be a whole number >= 0"):
        load_split(datalist, "train", label_fraction=0.5, seed=value)


@pytest.mark.slow
def test_finetune_runs_of_seeds_0_and_1_with_one_split_seed_train_on_the_same_cases(tmp_path, capsys):
    """Two real (tiny) fine-tunings: the same split_digests and splits.json, split_seed recorded in metrics.json, and
    other weights; the second through `dira3d finetune --split-seed`."""
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    first = run_finetune("luna16_nodule_fpr", {"datalist": str(datalist), "seed": 0, "split_seed": 4, "label_fraction": 0.5,
                                               "max_epochs": 1}, output_dir=tmp_path / "s0", tiny=True)
    code = main(["--bundle", "luna16_nodule_fpr", "--datalist", str(datalist), "--label-fraction", "0.5", "--seed", "1",
                 "--split-seed", "4", "--output-dir", str(tmp_path / "s1"), "--tiny", "--set", "max_epochs=1"])
    assert code == 0, capsys.readouterr().err
    second = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    assert first["split_digests"] == second["split_digests"] and set(first["split_digests"]) == {"train", "holdout", "test"}
    splits = [json.loads((tmp_path / s / "splits.json").read_text()) for s in ("s0", "s1")]
    assert splits[0]["train"]["cases"] == splits[1]["train"]["cases"]
    assert (first["settings"]["seed"], first["settings"]["split_seed"]) == (0, 4)
    assert (second["settings"]["seed"], second["settings"]["split_seed"]) == (1, 4)
    weights = [load_checkpoint(tmp_path / s / "models" / "model.pt") for s in ("s0", "s1")]
    assert not _same_weights(*weights)
    # a run given no split_seed records the seed it drew with (the default, @seed)
    third = run_finetune("luna16_nodule_fpr", {"datalist": str(datalist), "seed": 4, "label_fraction": 0.5, "max_epochs": 1},
                         output_dir=tmp_path / "s4", tiny=True)
    assert third["settings"]["split_seed"] == 4 and third["split_digests"] == first["split_digests"]


# ------------------------------------------------------------------------------------------------ dira3d experiment


@pytest.mark.parametrize("value", [1.5, "3", True, -1, [3]])
def test_an_experiment_split_seed_that_is_no_whole_number_is_refused_naming_file_and_key(tmp_path, value):
    path = write_experiment_config(tmp_path, split_seed=value)
    with pytest.raises(ValueError, match=rf"split_seed in {re.escape(str(path))} must be a whole number >= 0 .*got "
                                         rf"{re.escape(repr(value))}; e\.g\. split_seed: 0"):
        load_config(path)


def test_an_experiment_split_seed_is_read_and_null_is_none(tmp_path):
    assert load_config(write_experiment_config(tmp_path, split_seed=3))["split_seed"] == 3
    assert "split_seed" not in load_config(write_experiment_config(tmp_path, split_seed=None))
    assert "split_seed" not in load_config(write_experiment_config(tmp_path))


def test_split_seed_in_the_overrides_is_refused_for_the_config_key(tmp_path):
    with pytest.raises(ValueError, match=r"overrides in .* set split_seed, which the experiment sets for every run from "
                                         r"`split_seed`"):
        load_config(write_experiment_config(tmp_path, overrides={"tiny": True, "split_seed": 3}))


def test_a_bundle_without_split_seed_is_refused_with_the_key(tmp_path):
    own = bundle_without_setting(tmp_path, "split_seed")
    assert load_config(write_experiment_config(tmp_path, bundle=str(own)))  # without split_seed: as before
    with pytest.raises(ValueError, match=r"split_seed in .*experiment\.yaml \(bundle .* must draw its splits with a "
                                         r"split_seed setting.*no setting 'split_seed'"):
        load_config(write_experiment_config(tmp_path, bundle=str(own), split_seed=2))


def _results(tmp_path: Path) -> tuple[list[dict], list[str]]:
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader), list(reader.fieldnames or ())


def test_a_grid_with_split_seed_gives_it_to_every_run_and_records_it(tmp_path):
    calls: list = []
    config = load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2], split_seed=7))
    run_experiment(config, runner=fake_runner(calls), log=lambda _: None)
    assert len(calls) == 6 and {c["split_seed"] for c in calls} == {7} and {c["seed"] for c in calls} == {0, 1, 2}
    rows, fields = _results(tmp_path)
    assert fields[:6] == ["method", "checkpoint", "label_fraction", "seed", "split_seed", "metric"]
    assert {r["split_seed"] for r in rows} == {"7"} and {r["seed"] for r in rows} == {"0", "1", "2"}
    assert json.loads((tmp_path / "out" / "experiment.json").read_text())["split_seed"] == 7
    table = (tmp_path / "out" / "table.md").read_text()
    assert "with split_seed 7: the spread over seeds, the intervals and the t-tests measure the variance of training" in table
    # read back: nothing to redo
    assert len(run_experiment(load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2], split_seed=7)),
                              runner=fake_runner(calls), log=lambda _: None)) == 6 and len(calls) == 6


def test_a_grid_without_split_seed_passes_none_and_writes_the_columns_of_before(tmp_path):
    calls: list = []
    run_experiment(load_config(write_experiment_config(tmp_path)), runner=fake_runner(calls), log=lambda _: None)
    assert all("split_seed" not in c for c in calls)
    assert "split_seed" not in _results(tmp_path)[1]
    assert "split_seed" not in json.loads((tmp_path / "out" / "experiment.json").read_text())
    assert "split_seed" not in (tmp_path / "out" / "table.md").read_text()


def test_with_split_seed_runs_of_other_seeds_that_drew_other_cases_stop_the_grid(tmp_path):
    """All seeds share split_seed's split, so a run whose cases differ from another seed's run (of any method) is
    not added: without split_seed the runs of each seed are compared among themselves only."""
    config = load_config(write_experiment_config(tmp_path, seeds=[0, 1], split_seed=7))
    with pytest.raises(ValueError, match=r"the run random labels=1 seed=1 drew another split than the runs of the same "
                                         r"label fraction and split_seed \(7, every seed\) in .*results\.csv \(random "
                                         r"labels=1 seed=1 has train_digest 0{15}1, random labels=1 seed=0 0{16}"):
        run_experiment(config, runner=fake_runner([], lambda o: f"{o['seed']:016d}"), log=lambda _: None)
    rows, _ = _results(tmp_path)
    assert [(r["method"], r["seed"]) for r in rows] == [("random", "0")]  # the clashing run is not added
    # without split_seed each seed draws its own cases: no clash
    (tmp_path / "out" / "results.csv").unlink()
    (tmp_path / "out" / "experiment.json").unlink()
    rows = run_experiment(load_config(write_experiment_config(tmp_path, seeds=[0, 1])),
                          runner=fake_runner([], lambda o: f"{o['seed']:016d}"), log=lambda _: None)
    assert len(rows) == 4


def test_a_results_csv_whose_seeds_drew_other_cases_under_one_split_seed_is_refused_before_any_run(tmp_path):
    config = load_config(write_experiment_config(tmp_path, seeds=[0, 1], split_seed=7))
    run_experiment(config, runner=fake_runner([]), log=lambda _: None)
    rows, fields = _results(tmp_path)
    rows[-1]["train_digest"] = "f" * 16  # dira, seed 1: its pair (random, seed 1) agrees with it no more than seed 0
    rows[1]["train_digest"] = "f" * 16  # random, seed 1: both runs of seed 1 agree, but not with seed 0's
    assert [(r["method"], r["seed"]) for r in rows] == [("random", "0"), ("random", "1"), ("dira", "0"), ("dira", "1")]
    with open(tmp_path / "out" / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    calls: list = []
    with pytest.raises(ValueError, match=r"results\.csv holds runs of one label fraction and split_seed \(7, every "
                                         r"seed\) that drew different splits \(random labels=1 seed=0 has train_digest "
                                         r"a{16}, random labels=1 seed=1 f{16}"):
        run_experiment(load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2], split_seed=7)),
                       runner=fake_runner(calls), log=lambda _: None)
    assert calls == []


def test_split_seed_cannot_change_on_a_results_csv(tmp_path):
    """Rows of each seed's own split and rows of one split_seed's (or of two split_seeds) are never mixed in one table,
    whether or not experiment.json (which records split_seed) is there: results.csv's split_seed column says it."""
    run_experiment(load_config(write_experiment_config(tmp_path)), runner=fake_runner([]), log=lambda _: None)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"results\.csv holds runs that drew each seed's own label subset and "
                                             r"holdout \(no split_seed column\); adding runs that all draw split_seed 3's"):
            run_experiment(load_config(write_experiment_config(tmp_path, split_seed=3)), runner=fake_runner([]),
                           log=lambda _: None)
        (tmp_path / "out" / "experiment.json").unlink(missing_ok=True)
    for old in tmp_path.joinpath("out").iterdir():
        if old.is_file():
            old.unlink()
    run_experiment(load_config(write_experiment_config(tmp_path, split_seed=3)), runner=fake_runner([]), log=lambda _: None)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"holds runs drawn with split_seed 3, but the config gives split_seed 4"):
            run_experiment(load_config(write_experiment_config(tmp_path, split_seed=4)), runner=fake_runner([]),
                           log=lambda _: None)
        with pytest.raises(ValueError, match=r"holds runs that all drew one split \(a split_seed column\), but the "
                                             r"config has no split_seed"):
            run_experiment(load_config(write_experiment_config(tmp_path)), runner=fake_runner([]), log=lambda _: None)
        (tmp_path / "out" / "experiment.json").unlink(missing_ok=True)


# a classification datalist whose 30 % subset leaves a holdout of one class (AUC undefined) for every seed in 0..9 but
# 4 and 7 (found by a search over such lists)
_PATIENTS = ["p2", "p3", "p4", "p5", "p0", "p0", "p4", "p5", "p1", "p1", "p5", "p2"]
_LABELS = [1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]


def test_the_fraction_checks_draw_with_split_seed_alone(tmp_path):
    """The pre-run check of the label fractions draws the splits the runs draw: with split_seed, that seed's alone (a
    fraction refused for the grid's seeds passes when split_seed's draw can be trained on, and the reverse)."""
    (tmp_path / "c").mkdir()
    entries = []
    for i, (patient, label) in enumerate(zip(_PATIENTS, _LABELS)):
        (tmp_path / "c" / f"{i}.nii.gz").write_bytes(b"")
        entries.append({"image": f"c/{i}.nii.gz", "label": label, "case_id": patient})
    (tmp_path / "cls.json").write_text(json.dumps({"training": entries, "test": entries[:2]}))
    grid = {"datalist": "cls.json", "label_fractions": [0.3]}
    with pytest.raises(ValueError, match=r"label_fractions in .*: 0\.3 with seed 0 cannot be trained"):
        load_config(write_experiment_config(tmp_path, seeds=[0, 1], **grid))
    assert load_config(write_experiment_config(tmp_path, seeds=[0, 1], split_seed=4, **grid))["split_seed"] == 4
    assert load_config(write_experiment_config(tmp_path, seeds=[4, 7], **grid))
    with pytest.raises(ValueError, match=r"label_fractions in .*: 0\.3 with split_seed 0 cannot be trained"):
        load_config(write_experiment_config(tmp_path, seeds=[4, 7], split_seed=0, **grid))
