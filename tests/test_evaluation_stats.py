import math

import numpy as np
import pytest

from dira3d.evaluation.stats import aggregate, compare_to_baseline, markdown_table

ROWS = (
    [{"method": "random", "label_fraction": 0.1, "seed": s, "auc": v} for s, v in enumerate([0.60, 0.70, 0.65])]
    + [{"method": "dira", "label_fraction": 0.1, "seed": s, "auc": v} for s, v in enumerate([0.80, 0.90, 0.85])]
    + [{"method": "dira", "label_fraction": 1.0, "seed": 0, "auc": 0.95}]
)


def test_mean_std_by_hand():
    cells = {(c.method, c.label_fraction): c for c in aggregate(ROWS, "auc")}
    rnd = cells[("random", 0.1)]
    assert rnd.n == 3 and rnd.mean == pytest.approx(0.65)
    # sample std of (0.60, 0.70, 0.65): sqrt(((-.05)^2 + .05^2 + 0) / 2) = 0.05
    assert rnd.std == pytest.approx(0.05)
    assert math.isnan(cells[("dira", 1.0)].std)


def test_student_t_by_hand():
    cells = compare_to_baseline(aggregate(ROWS, "auc"), baseline="random")
    dira = next(c for c in cells if c.method == "dira" and c.label_fraction == 0.1)
    # equal variances 0.0025 each: pooled sd 0.05, se = 0.05*sqrt(2/3); t = 0.2/se = 4.899, df 4
    t = 0.2 / (0.05 * np.sqrt(2 / 3))
    assert t == pytest.approx(4.898979, rel=1e-5)
    from scipy.stats import t as student

    assert dira.p_value == pytest.approx(2 * student.sf(t, df=4), rel=1e-6)
    assert dira.p_value == pytest.approx(0.008050, rel=1e-3)
    assert next(c for c in cells if c.method == "random").p_value is None
    assert next(c for c in cells if c.label_fraction == 1.0).p_value is None  # no baseline at 100 %


def test_welch_differs_with_unequal_variance():
    rows = [{"method": "a", "label_fraction": 1, "seed": i, "m": v} for i, v in enumerate([1.0, 1.1, 0.9, 1.0])]
    rows += [{"method": "b", "label_fraction": 1, "seed": i, "m": v} for i, v in enumerate([2.0, 0.0, 3.0])]
    student = compare_to_baseline(aggregate(rows, "m"), "a")[1].p_value
    welch = compare_to_baseline(aggregate(rows, "m"), "a", equal_var=False)[1].p_value
    assert student != pytest.approx(welch, rel=1e-3)


def test_table_and_errors():
    table = markdown_table(compare_to_baseline(aggregate(ROWS, "auc"), "random"), "AUC")
    assert "| random | 65.00 ± 5.00 | – |" in table
    assert "| dira | 85.00 ± 5.00 (p=0.008) | 95.00 |" in table
    with pytest.raises(ValueError, match="baseline 'scratch'"):
        compare_to_baseline(aggregate(ROWS, "auc"), "scratch")
    with pytest.raises(ValueError, match="no 'dice'"):
        aggregate(ROWS, "dice")


def test_no_p_value_without_spread_and_the_table_says_why():
    """Found by a user walkthrough: seeds that all scored the same (tiny synthetic runs: AUC 1.0 every time) against a
    baseline that did too gave p = 2e-60 from float rounding ("p<0.001", a significance never tested), or no p
    at all, which read like the baseline's own cell."""
    rows = [{"method": m, "label_fraction": f, "seed": s, "auc": v} for s in range(3)
            for m, f, v in (("random", 0.1, 0.9), ("dira", 0.1, 0.8), ("random", 1.0, 0.9), ("dira", 1.0, 0.9))]
    cells = compare_to_baseline(aggregate(rows, "auc"), "random")
    assert all(c.p_value is None for c in cells)
    table = markdown_table(cells, "AUC", baseline="random")
    assert "| dira | 80.00 ± 0.00 (p n/a) | 90.00 ± 0.00 (p n/a) |" in table
    assert "| random | 90.00 ± 0.00 | 90.00 ± 0.00 |" in table
    rows.append({"method": "dira", "label_fraction": 0.1, "seed": 3, "auc": 0.81})  # spread on one side: tested
    cells = compare_to_baseline(aggregate(rows, "auc"), "random")
    assert next(c for c in cells if c.method == "dira" and c.label_fraction == 0.1).p_value < 0.001
    assert "(p<0.001; n=4)" not in markdown_table(cells, "AUC", baseline="random", full_n=4)
    assert "90.00 ± 0.00 (p n/a; n=3)" in markdown_table(cells, "AUC", baseline="random", full_n=4)
