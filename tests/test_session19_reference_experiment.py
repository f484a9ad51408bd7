"""Mutation audit of session 19 (mut19), the experiment's side: split ids and digests (dira3d.evaluation.split_ids),
the versions record and the warning about rows without digests (dira3d.evaluation.experiment_versions), and the
label fractions refused before any run (dira3d.evaluation.fraction_checks). References: hashlib's sha256 of the
documented text, counts and messages worked out by hand from the docstrings."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest

from dira3d.evaluation.experiment_versions import UNKNOWN, bundle_version, versions_record, warn_rows_without_digests
from dira3d.evaluation.fraction_checks import check_fractions_trainable, split_settings
from dira3d.evaluation.split_ids import case_id, split_columns, split_digest, split_ids, write_splits


# --- split ids -------------------------------------------------------------------------------------------------------

def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def test_case_ids_by_hand(tmp_path):
    root = tmp_path / "data"
    assert case_id({"image": str(root / "images" / "a.nii.gz")}, root) == "images/a.nii.gz"
    # several images of one entry (channels): joined by "+", each relative
    two = {"image": [str(root / "t1.nii.gz"), str(root / "t2.nii.gz")]}
    assert case_id(two, root) == "t1.nii.gz+t2.nii.gz"
    # a file whose name starts with two dots lies inside the folder; the folder's parent does not
    assert case_id({"image": str(root / "..hidden.nii.gz")}, root) == "..hidden.nii.gz"
    outside = tmp_path / "elsewhere" / "b.nii.gz"
    assert case_id({"image": str(outside)}, root) == outside.as_posix()
    assert case_id({"image": str(root / "images" / "a.nii.gz")}, None) == (root / "images" / "a.nii.gz").as_posix()
    assert case_id({"case_id": "p7"}, root) == "p7"


def test_split_ids_keep_a_case_listed_twice_and_name_patients_by_patient_id(tmp_path):
    entries = [{"image": str(tmp_path / "b.nii.gz"), "case_id": "c2", "patient_id": "P1"},
               {"image": str(tmp_path / "a.nii.gz"), "case_id": "c1", "patient_id": "P1"},
               {"image": str(tmp_path / "a.nii.gz"), "case_id": "c1", "patient_id": "P1"},
               {"image": str(tmp_path / "c.nii.gz"), "case_id": "c3"}]
    ids = split_ids(entries, tmp_path)
    assert ids["cases"] == ["a.nii.gz", "a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert ids["patients"] == ["P1", "c3"]
    assert ids["digest"] == _sha16("a.nii.gz\na.nii.gz\nb.nii.gz\nc.nii.gz")
    assert split_digest(["b", "a"]) == _sha16("a\nb") and len(split_digest(["x"])) == 16


def test_write_splits_leaves_out_empty_splits_and_returns_the_digests(tmp_path):
    datalist = tmp_path / "data" / "dl.json"
    datalist.parent.mkdir()
    train = [{"image": str(datalist.parent / "x.nii.gz"), "case_id": "x"}]
    digests = write_splits(tmp_path / "run", datalist, {"train": train, "holdout": [], "test": train})
    assert digests == {"train": _sha16("x.nii.gz"), "test": _sha16("x.nii.gz")}
    record = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert "holdout" not in record and record["train"]["cases"] == ["x.nii.gz"]
    assert record["datalist"] == str(datalist.resolve())


def _metrics(run: Path, value, **extra) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps({"metrics": {"auc": value}, **extra}))
    return run


def test_split_columns_by_hand(tmp_path):
    splits = {"test": {"cases": 12, "positive": [3, 0, 5]}, "train": {"cases": 40}}
    digests = {"train": "a" * 16, "holdout": "b" * 16, "test": "c" * 16}
    run = _metrics(tmp_path / "r", 0.75, splits=splits, split_digests=digests)
    assert split_columns(run, "auc", 0.75) == {
        "test_cases": "12", "test_positive": "3;0;5", "train_cases": "40",
        "train_digest": "a" * 16, "holdout_digest": "b" * 16, "test_digest": "c" * 16}
    # the metrics.json of an earlier run (another value): nothing is known of this one
    assert set(split_columns(run, "auc", 0.5).values()) == {""}


# --- versions ---------------------------------------------------------------------------------------------------------

def test_bundle_version_of_a_metadata_without_one_is_none(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps({"name": "x"}))
    assert bundle_version(tmp_path) is None
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.2"}))
    assert bundle_version(tmp_path) == "0.1.2"


CONFIG = {"bundle": "luna16_nodule_fpr", "methods": {"random": None}}


def _record(out: Path, versions=None, earlier=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {} if versions is None else {"versions": versions}
    if earlier is not None:
        record["earlier_versions"] = earlier
    (out / "experiment.json").write_text(json.dumps(record))


def test_without_rows_the_record_is_the_current_versions_only(tmp_path):
    _record(tmp_path, {"dira3d": "0.0.1", "bundles": {"luna16_nodule_fpr": "0.0.1"}}, earlier=[UNKNOWN])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        record = versions_record(CONFIG, tmp_path, rows=[])
    assert set(record) == {"versions"}


def test_resuming_rows_of_before_the_record_twice_says_so_once(tmp_path):
    _record(tmp_path, None, earlier=[UNKNOWN])  # a resume of rows that recorded no versions, seen before
    record = versions_record(CONFIG, tmp_path, rows=[{"method": "random"}])
    assert record["earlier_versions"] == [UNKNOWN]


def test_a_bundle_new_to_the_grid_is_no_version_change(tmp_path):
    now = versions_record(CONFIG, tmp_path, rows=[])["versions"]
    # the rows were made without the pretraining bundle; this call adds it (a method switched to {pretrain:})
    before = {"dira3d": now["dira3d"], "bundles": dict(now["bundles"])}
    _record(tmp_path, before)
    config = {"bundle": "luna16_nodule_fpr", "methods": {"random": None, "dira": {"pretrain": {}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        record = versions_record(config, tmp_path, rows=[{"method": "random"}])
    assert set(record["versions"]["bundles"]) == {"luna16_nodule_fpr", "dira_pretrain"}
    assert record["earlier_versions"] == [before]  # what the rows were made with differs: kept


def test_a_record_already_among_the_earlier_ones_is_not_listed_twice(tmp_path):
    old = {"dira3d": "0.0.1", "bundles": {"luna16_nodule_fpr": "0.0.1"}}
    _record(tmp_path, old, earlier=[old])  # the grid went 0.0.1 -> (another) -> 0.0.1 and is resumed now
    with pytest.warns(UserWarning, match="bundle version changed"):
        record = versions_record(CONFIG, tmp_path, rows=[{"method": "random"}])
    assert record["earlier_versions"] == [old]


def _row(method, fraction, seed, **columns):
    return {"method": method, "label_fraction": str(fraction), "seed": str(seed), **columns}


def test_the_old_rows_warning_counts_only_rows_of_the_grid_with_sizes_and_no_digest(tmp_path):
    grid = {("random", 0.5, 0), ("random", 0.5, 1), ("dira", 0.5, 0)}
    rows = [_row("random", 0.5, 0, test_cases="10"),                       # old: sizes, no digest
            _row("random", 0.5, 1, test_cases="10", train_digest="a" * 16),  # one digest: new
            _row("dira", 0.5, 0),                                            # no sizes either: nothing to pair
            _row("random", 0.25, 0, train_cases="4")]                        # not of this grid
    with pytest.warns(UserWarning, match=r"results.csv: 1 of its runs \(e.g. random labels=0.5 seed=0\)"):
        warn_rows_without_digests(rows, grid, False, tmp_path / "results.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warn_rows_without_digests(rows[1:], grid, False, tmp_path / "results.csv")


# --- label fractions refused before any run ---------------------------------------------------------------------------

def test_split_settings_reads_holdout_and_fold_with_tiny_and_the_overrides(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"holdout": 0.2, "fold": 3}))
    (tmp_path / "tiny.json").write_text(json.dumps({"holdout": 0.3}))
    assert split_settings(tmp_path, {}) == (0.2, 3)
    assert split_settings(tmp_path, {"tiny": True}) == (0.3, 3)
    assert split_settings(tmp_path, {"tiny": True, "fold": 1}) == (0.3, 1)


def _datalist(tmp_path: Path, patients: int, scans: int = 1, folds: bool = False) -> Path:
    training = [{"image": f"p{p}_{s}.nii.gz", "label": f"p{p}_{s}.nii.gz", "case_id": f"p{p}",
                 **({"fold": p % 2} if folds else {})} for p in range(patients) for s in range(scans)]
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": training}))
    return path


def _refusal(tmp_path, datalist, fractions, seeds=(0,), holdout=0.1, fold=None, **config) -> str:
    with pytest.raises(ValueError) as raised:
        check_fractions_trainable({"datalist": str(datalist), "label_fractions": list(fractions), "seeds": list(seeds),
                                   **config}, tmp_path / "experiment.yaml", holdout, fold)
    return str(raised.value)


def test_a_fraction_keeping_one_patient_of_several_scans_is_named_with_patients_not_scans(tmp_path):
    # 10 patients of 3 scans each: 10 % keeps 1 patient (3 entries), whose holdout is empty
    message = _refusal(tmp_path, _datalist(tmp_path, 10, scans=3), [0.5, 0.1])
    assert ": 0.1 keeps 1 of the 10 training patient(s)" in message
    assert "use a larger label fraction (at least 0.2) or leave 0.1 out" in message


def test_the_smallest_fraction_is_the_one_named(tmp_path):
    # 20 patients: 5 % and 1 % both keep one patient; the smallest is named first, as the config is read
    message = _refusal(tmp_path, _datalist(tmp_path, 20), [0.05, 0.5, 0.01])
    assert ": 0.01 keeps 1 of the 20" in message and "(at least 0.1)" in message


def test_two_patients_in_all_name_the_smallest_fraction_that_keeps_both(tmp_path):
    message = _refusal(tmp_path, _datalist(tmp_path, 2), [0.5])
    assert ": 0.5 keeps 1 of the 2 training patient(s)" in message and "(at least 1)" in message


def test_a_fold_that_is_tested_is_left_out_of_the_patients_counted(tmp_path):
    # folds 0 and 1 hold the even and odd patients: with fold 0 tested, 5 of the 10 patients train
    datalist = _datalist(tmp_path, 10, folds=True)
    message = _refusal(tmp_path, datalist, [0.1], fold=0)
    assert "1 of the 5 training patient(s)" in message and "(fold 0 tested)" in message
    message = _refusal(tmp_path, datalist, [0.1], folds=[1], fold=None)
    assert "(fold 1 tested)" in message


def test_holdout_0_is_refused_and_a_share_of_1_is_left_to_the_setting_check(tmp_path):
    datalist = _datalist(tmp_path, 1)
    assert "holdout=0 holds out no training patient" in _refusal(tmp_path, datalist, [1.0], holdout=0)
    check_fractions_trainable({"datalist": str(datalist), "label_fractions": [1.0], "seeds": [0]},
                              tmp_path / "e.yaml", 1.0, None)  # no label fraction helps: the runs refuse it


def _digest_runner(holdout_digest):
    """A runner writing metrics.json as run_finetune does, every split the same but the holdout's digest."""
    def run(bundle, overrides):
        out = Path(overrides["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        value = 0.7 + 0.01 * overrides["seed"]
        splits = {"train": {"cases": 43}, "test": {"cases": 20, "positive": 6}}
        digests = {"train": "a" * 16, "holdout": holdout_digest(out.name), "test": "0" * 16}
        (out / "metrics.json").write_text(json.dumps({"metrics": {"auc": value}, "splits": splits,
                                                      "split_digests": digests}))
        return {"auc": value}
    return run


def test_runs_whose_holdouts_differ_are_no_pair(tmp_path):
    """The early-stopping holdout picks the model that is tested: two methods' runs of one (fraction, seed) must
    have held out the same cases, as docs/finetuning.md's splits say (train, holdout and test digests)."""
    from test_experiment_walkthrough_grid import write_experiment_config

    from dira3d.evaluation.experiment import load_config, run_experiment

    run_experiment(load_config(write_experiment_config(tmp_path)), runner=_digest_runner(lambda name: "b" * 16),
                   log=lambda _: None)
    more = load_config(write_experiment_config(tmp_path, methods={"random": None, "dira": None, "dis": None}))
    other = _digest_runner(lambda name: "e" * 16 if name.startswith("dis_") else "b" * 16)
    with pytest.raises(ValueError, match=r"dis labels=1 seed=0 has holdout_digest e{16}, random labels=1 seed=0 b{16}"):
        run_experiment(more, runner=other, log=lambda _: None)


def test_rows_made_before_the_digests_pair_with_new_runs_on_their_sizes(tmp_path):
    """A row without digests (an older dira3d) and a new run with them: the digests are not known on one side, so
    not compared; the sizes agree, the run is added (with the one warning about the old rows)."""
    from test_experiment_walkthrough_grid import write_experiment_config

    from dira3d.evaluation.experiment import load_config, run_experiment

    def old_runner(bundle, overrides):
        out = Path(overrides["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        splits = {"train": {"cases": 43}, "test": {"cases": 20, "positive": 6}}
        (out / "metrics.json").write_text(json.dumps({"metrics": {"auc": 0.7}, "splits": splits}))
        return {"auc": 0.7}

    run_experiment(load_config(write_experiment_config(tmp_path)), runner=old_runner, log=lambda _: None)
    more = load_config(write_experiment_config(tmp_path, methods={"random": None, "dira": None, "dis": None}))
    with pytest.warns(UserWarning, match=r"4 of its runs .* were made before dira3d recorded which cases"):
        rows = run_experiment(more, runner=_digest_runner(lambda name: "b" * 16), log=lambda _: None)
    assert len(rows) == 6


def test_rows_outside_the_grid_are_not_paired(tmp_path):
    """Rows of a label fraction the config no longer lists are kept in results.csv but are no run of this grid:
    their splits are not compared (a fraction dropped from the config does not stop the grid)."""
    import csv

    from test_experiment_walkthrough_grid import write_experiment_config

    from dira3d.evaluation.experiment import load_config, run_experiment

    run_experiment(load_config(write_experiment_config(tmp_path, label_fractions=[0.5, 1.0])),
                   runner=_digest_runner(lambda name: "b" * 16), log=lambda _: None)
    path = tmp_path / "out" / "results.csv"
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows, fields = list(reader), list(reader.fieldnames or ())
    for row in rows:
        if row["method"] == "dira" and float(row["label_fraction"]) == 0.5:
            row["test_digest"] = "f" * 16
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    rows = run_experiment(load_config(write_experiment_config(tmp_path, label_fractions=[1.0])),
                          runner=_digest_runner(lambda name: "b" * 16), log=lambda _: None)
    assert sorted(float(r["label_fraction"]) for r in rows) == [0.5] * 4 + [1.0] * 4  # not refused; all rows kept


def test_a_fraction_refused_for_one_seed_only_by_its_holdout(tmp_path):
    """Whether a classification holdout holds both classes depends on the seed of its draw (found by a random search
    over small datalists): the check must draw it with the run's seed, as load_split does, to refuse what the run
    refuses. The reference is the run's own load_split."""
    from dira3d.evaluation.datalists import load_split

    labels = [0, 1, 0, 0, 0, 0, 0, 0, 0]
    patients = ["p0", "p1", "p1", "p3", "p2", "p5", "p6", "p3", "p8"]
    training = [{"image": f"c{i}.nii.gz", "label": label, "case_id": patient}
                for i, (label, patient) in enumerate(zip(labels, patients))]
    for entry in training:
        (tmp_path / entry["image"]).touch()
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"training": training}))

    def run_refuses(seed: int) -> bool:
        try:
            load_split(datalist, "holdout", label_fraction=0.25, seed=seed, holdout=0.1, fold=None)
        except ValueError:
            return True
        return False

    assert run_refuses(1) and not run_refuses(0)  # the case: seed 1's run is refused, seed 0's is not
    message = _refusal(tmp_path, datalist, [0.25], seeds=[1])
    assert "0.25 with seed 1 cannot be trained" in message
    check_fractions_trainable({"datalist": str(datalist), "label_fractions": [0.25], "seeds": [0]},
                              tmp_path / "experiment.yaml", 0.1, None)
