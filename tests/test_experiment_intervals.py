"""The 95 % confidence interval of each cell's mean over seeds, in ``summary.json`` and ``table.md``.

``dira3d experiment`` reported mean ± sample std and a p-value only; the std says how much the seeds scatter, not how
precisely they pin the mean. The interval is t-based (mean ± t(0.975, n−1) · std / √n), checked here against
hand-computed values and against scipy's one-sample t-test interval, an independent path to the same definition."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats
from test_experiment import fake_runner
from test_experiment_walkthrough_grid import write_experiment_config

from dira3d.evaluation.experiment import run_experiment
from dira3d.evaluation.experiment_config import load_config
from dira3d.evaluation.stats import aggregate, compare_to_baseline, markdown_ci_table, mean_interval

T_975_DF2 = 4.302652729749462  # the 97.5 % quantile of Student's t with 2 degrees of freedom (tables: 4.303)


def test_the_interval_of_three_values_by_hand_and_as_scipy_gives_it():
    low, high = mean_interval([0.75, 0.76, 0.77])
    half = T_975_DF2 * 0.01 / math.sqrt(3)  # sample std 0.01
    assert (low, high) == pytest.approx((0.76 - half, 0.76 + half), rel=1e-12)
    assert (low, high) == pytest.approx((0.7351586228824968, 0.7848413771175035), rel=1e-12)
    reference = stats.ttest_1samp([0.60, 0.70, 0.65, 0.90], 0.0).confidence_interval(0.95)
    assert mean_interval([0.60, 0.70, 0.65, 0.90]) == pytest.approx((reference.low, reference.high), rel=1e-12)
    assert mean_interval([0.8]) is None and mean_interval([]) is None
    assert mean_interval([0.8, 0.8, 0.8]) == (pytest.approx(0.8), pytest.approx(0.8))  # no spread: the mean itself


def test_cells_keep_their_interval_through_every_test():
    rows = [{"method": m, "label_fraction": 0.5, "seed": s, "auc": v + (0.1 if m == "dira" else 0.0)}
            for m in ("random", "dira") for s, v in enumerate([0.60, 0.70, 0.65])]
    rows.append({"method": "dira", "label_fraction": 1.0, "seed": 0, "auc": 0.9})
    for kwargs in ({}, {"equal_var": False}, {"paired": True}):
        cells = {(c.method, c.label_fraction): c for c in compare_to_baseline(aggregate(rows, "auc"), "random", **kwargs)}
        half = T_975_DF2 * 0.05 / math.sqrt(3)
        assert (cells[("dira", 0.5)].ci_low, cells[("dira", 0.5)].ci_high) == pytest.approx((0.75 - half, 0.75 + half))
        assert (cells[("random", 0.5)].ci_low, cells[("random", 0.5)].ci_high) == pytest.approx((0.65 - half, 0.65 + half))
        assert cells[("dira", 1.0)].ci_low is None and cells[("dira", 1.0)].ci_high is None, kwargs
    table = markdown_ci_table(list(cells.values()), "AUC", method_order=["random", "dira"])
    assert table.splitlines() == ["| method | AUC 95 % CI @ 50 % labels | AUC 95 % CI @ 100 % labels |", "|---|---|---|",
                                  f"| random | [{100 * (0.65 - half):.2f}, {100 * (0.65 + half):.2f}] | – |",
                                  f"| dira | [{100 * (0.75 - half):.2f}, {100 * (0.75 + half):.2f}] | n/a |"]


def test_the_experiment_reports_the_interval_in_summary_json_and_table_md(tmp_path):
    def one_dira_seed(bundle, overrides):  # dira at 100 % labels has one seed: its interval is undefined
        if overrides["pretrained"] and overrides["label_fraction"] == 1.0 and overrides["seed"] > 0:
            raise RuntimeError("out of memory")
        return fake_runner([])(bundle, overrides)

    from dira3d.evaluation.experiment import ExperimentRunsFailed

    with pytest.raises(ExperimentRunsFailed):
        config = load_config(write_experiment_config(tmp_path, seeds=[0, 1, 2], label_fractions=[0.5, 1.0],
                                                     methods={"random": None, "dira": "ckpt.pt"}))
        run_experiment(config, runner=one_dira_seed, log=lambda _: None)
    out = tmp_path / "out"
    summary = {(c["method"], c["label_fraction"]): c for c in json.loads((out / "summary.json").read_text())}
    half = T_975_DF2 * 0.01 / math.sqrt(3)  # dira @ 0.5: 0.75, 0.76, 0.77
    assert (summary[("dira", 0.5)]["ci_low"], summary[("dira", 0.5)]["ci_high"]) == pytest.approx((0.76 - half, 0.76 + half))
    assert summary[("dira", 1.0)]["ci_low"] is None and summary[("dira", 1.0)]["ci_high"] is None
    table = (out / "table.md").read_text()
    assert "| method | AUC 95 % CI @ 50 % labels | AUC 95 % CI @ 100 % labels |" in table
    assert f"| dira | [{100 * (0.76 - half):.2f}, {100 * (0.76 + half):.2f}] | n/a |" in table
    assert "95 % CI: t-based confidence interval of the mean over the seeds" in table and "n/a: one seed" in table
