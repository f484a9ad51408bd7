"""Edge cases of ``dira3d experiment``'s statistics and messages (session 26).

An interval of 2 seeds (1 degree of freedom: mean ± 9.0 × std) ran far outside an AUC's range ([-31.5, 151.7]);
seeds that all gave one value printed a zero-width ``[x, x]``, read as certainty; ``table.md`` said "see
failures.json" while no run had failed and no such file was there; and a rerun with nothing to run warned of a
bundle upgrade (as did one whose new runs join none of the old rows)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from scipy import stats
from test_experiment_walkthrough_grid import write_experiment_config

from dira3d.evaluation.experiment import load_config, run_experiment
from dira3d.evaluation.stats import aggregate, cell_interval, markdown_ci_table

T_975_DF1 = 12.706204736174698  # the 97.5 % quantile of Student's t with 1 degree of freedom (tables: 12.706)


def _by_value(values: dict):
    """A runner whose AUC is ``values[(method, seed)]`` (``random`` is the null checkpoint)."""
    def run(bundle, overrides):
        return {"auc": values[("dira" if overrides["pretrained"] else "random", overrides["seed"])]}
    return run


# --- 1. two seeds, and intervals past the metric's range ---------------------------------------------------------

def test_two_seeds_are_marked_and_an_interval_past_the_range_is_cut_at_its_bounds():
    half = T_975_DF1 * math.sqrt(0.02) / math.sqrt(2)  # 0.50, 0.70: std 0.1414, half-width 1.27
    assert half == pytest.approx(1.2706, abs=1e-4)
    assert cell_interval([0.50, 0.70]) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half), "2 seeds")
    assert cell_interval([0.50, 0.70], (0.0, 1.0)) == (0.0, 1.0, "2 seeds; clipped")
    assert cell_interval([0.800, 0.801], (0.0, 1.0))[2] == "2 seeds"  # narrow: inside the range, not cut
    # three seeds near the top: only the upper end is cut
    low, high, note = cell_interval([0.99, 0.90, 0.99], (0.0, 1.0))
    reference = stats.ttest_1samp([0.99, 0.90, 0.99], 0.0).confidence_interval(0.95)
    assert (low, high, note) == (pytest.approx(reference.low), 1.0, "clipped") and reference.high > 1.0
    # aggregate cuts the bundles' metrics (auc, dice, iou) at [0, 1]; a metric of unknown range is not cut
    rows = [{"method": "m", "label_fraction": 1.0, "seed": s, "auc": v, "loss": v} for s, v in enumerate([0.5, 0.7])]
    (auc,) = aggregate(rows, "auc")
    assert (auc.ci_low, auc.ci_high, auc.ci_note) == (0.0, 1.0, "2 seeds; clipped")
    (loss,) = aggregate(rows, "loss")
    assert (loss.ci_low, loss.ci_high) == pytest.approx((0.6 - half, 0.6 + half)) and loss.ci_note == "2 seeds"
    assert markdown_ci_table([auc], "AUC").splitlines()[2] == "| m | [0.00, 100.00] (2 seeds; clipped) |"


def test_the_experiment_says_so_alike_in_table_md_and_summary_json(tmp_path):
    values = {("random", 0): 0.50, ("random", 1): 0.70, ("dira", 0): 0.800, ("dira", 1): 0.802}
    config = load_config(write_experiment_config(tmp_path, methods={"random": None, "dira": "ckpt.pt"}))
    run_experiment(config, runner=_by_value(values), log=lambda _: None)
    out = tmp_path / "out"
    table = (out / "table.md").read_text(encoding="utf-8")  # what `dira3d experiment` prints at the end
    half = T_975_DF1 * (0.002 / math.sqrt(2)) / math.sqrt(2)
    assert "| random | [0.00, 100.00] (2 seeds; clipped) |" in table
    assert f"| dira | [{100 * (0.801 - half):.2f}, {100 * (0.801 + half):.2f}] (2 seeds) |" in table
    assert ("2 seeds: one degree of freedom, t(0.975, 1) = 12.7, so the interval is mean ± 9.0 × std, wide by "
            "construction (3 seeds: ± 2.5 × std)") in table
    assert "clipped: the t interval ran past the range of auc ([0, 100]) and is cut at its bounds" in table
    summary = {c["method"]: c for c in json.loads((out / "summary.json").read_text())}
    assert (summary["random"]["ci_low"], summary["random"]["ci_high"]) == (0.0, 1.0)
    assert summary["random"]["ci_note"] == "2 seeds; clipped" and summary["dira"]["ci_note"] == "2 seeds"
    assert (summary["dira"]["ci_low"], summary["dira"]["ci_high"]) == pytest.approx((0.801 - half, 0.801 + half))


# --- 2. seeds that agree ---------------------------------------------------------------------------------------

def test_seeds_that_agree_have_no_zero_width_interval(tmp_path):
    assert cell_interval([0.9, 0.9, 0.9]) == (None, None, "seeds agree")
    # equal up to float rounding, as the t-tests' p n/a (0.75 - 0.65 vs 0.76 - 0.66)
    assert cell_interval([0.75 - 0.65, 0.76 - 0.66, 0.1]) == (None, None, "seeds agree")
    assert cell_interval([0.9, 0.9, 0.9001])[2] is None  # a real spread keeps its interval
    values = {("random", 0): 0.9, ("random", 1): 0.9, ("random", 2): 0.9,
              ("dira", 0): 0.80, ("dira", 1): 0.81, ("dira", 2): 0.82}
    config = load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2], methods={"random": None, "dira": "ckpt.pt"}))
    run_experiment(config, runner=_by_value(values), log=lambda _: None)
    table = (tmp_path / "out" / "table.md").read_text(encoding="utf-8")
    assert "| random | n/a (seeds agree) |" in table and "[90.00, 90.00]" not in table
    assert "n/a (seeds agree): every seed gave the same value (up to float rounding)" in table
    assert "2 seeds:" not in table and "clipped:" not in table  # marks that no cell carries are not explained
    summary = {c["method"]: c for c in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert summary["random"]["ci_low"] is None and summary["random"]["ci_high"] is None
    assert summary["random"]["ci_note"] == "seeds agree" and summary["dira"]["ci_note"] is None


# --- 3. failures.json named only where it is ---------------------------------------------------------------------

def test_the_table_names_failures_json_only_when_a_run_failed(tmp_path):
    config = load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2]))
    done = []

    def stopped_after_two(bundle, overrides):  # Ctrl-C at the third run: the table written after the second stays
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(overrides)
        return {"auc": 0.7 + 0.01 * overrides["seed"]}

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, runner=stopped_after_two, log=lambda _: None)
    out = tmp_path / "out"
    assert not (out / "failures.json").exists()
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "Left out (not run yet): random @ 100 % labels, seed 2; dira @ 100 % labels, seed 0;" in table
    assert "failures.json" not in table

    def one_fails(bundle, overrides):
        if overrides["seed"] == 2:
            raise RuntimeError("out of memory")
        return {"auc": 0.7 + 0.01 * overrides["seed"]}

    from dira3d.evaluation.experiment import ExperimentRunsFailed

    logged = []
    with pytest.raises(ExperimentRunsFailed):
        run_experiment(config, runner=one_fails, log=logged.append)
    assert (out / "failures.json").is_file()
    assert "Left out (not run yet, or failed: see failures.json): random @ 100 % labels, seed 2" \
           in (out / "table.md").read_text(encoding="utf-8")
    assert any(line.startswith("experiment: left out of the statistics (failed: see failures.json)") for line in logged)


# --- 4. the version warning only where new runs join old ones ----------------------------------------------------

def _pretend_made_by_an_older_bundle(tmp_path) -> dict:
    path = tmp_path / "out" / "experiment.json"
    before = {"dira3d": "0.0.9", "bundles": {"luna16_nodule_fpr": "0.0.1"}}
    path.write_text(json.dumps({**json.loads(path.read_text()), "versions": before}))
    return before


def test_the_version_warning_comes_only_when_new_runs_join_the_old_ones(tmp_path):
    run = lambda config: run_experiment(load_config(config), runner=_by_value(  # noqa: E731
        {(m, s): 0.7 + 0.01 * s for m in ("random", "dira") for s in range(5)}), log=lambda _: None)
    run(write_experiment_config(tmp_path))
    before = _pretend_made_by_an_older_bundle(tmp_path)
    with warnings.catch_warnings():  # every run done: nothing is added, nothing to warn of
        warnings.simplefilter("error")
        run(write_experiment_config(tmp_path, test="welch"))
    # the record still says what made the rows, so that a later call that adds runs warns then
    assert json.loads((tmp_path / "out" / "experiment.json").read_text())["versions"] == before
    with warnings.catch_warnings():  # other seeds only: the new runs join none of the old rows in the table
        warnings.simplefilter("error")
        run(write_experiment_config(tmp_path, seeds=[2, 3]))
    _pretend_made_by_an_older_bundle(tmp_path)
    with pytest.warns(UserWarning, match=r"bundle version changed since its 4 runs were made \(luna16_nodule_fpr 0\.0\.1"):
        run(write_experiment_config(tmp_path, seeds=[0, 1, 4]))  # seeds 0, 1 reused (4 rows), seed 4 added
