"""Reference tests for session 20's confidence intervals and tables (dira3d.evaluation.stats), written by a mutation
audit: the interval of each cell's mean against ``scipy.stats.t.interval`` (the independent reference: it takes the
confidence and the standard error, not a quantile), and the Markdown tables' exact text written by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dira3d.evaluation.stats import aggregate, compare_to_baseline, markdown_ci_table, markdown_table, mean_interval

SAMPLES = ([0.70, 0.74, 0.71], [0.5, 0.9], [0.81, 0.79, 0.86, 0.84, 0.80], [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("values", SAMPLES)
def test_mean_interval_is_scipy_s_t_interval_of_the_mean(values, confidence):
    arr = np.asarray(values, dtype=np.float64)
    sem = arr.std(ddof=1) / math.sqrt(len(arr))
    low, high = stats.t.interval(confidence, len(arr) - 1, loc=arr.mean(), scale=sem)
    assert mean_interval(values, confidence) == pytest.approx((low, high), rel=1e-12, abs=1e-12)
    assert mean_interval(values, confidence)[0] < arr.mean() < mean_interval(values, confidence)[1]


def test_one_value_has_no_interval_and_cells_keep_low_below_high():
    assert mean_interval([0.7]) is None and mean_interval([]) is None
    rows = [{"method": "m", "label_fraction": 0.5, "seed": s, "dice": v} for s, v in enumerate([0.70, 0.74, 0.71])]
    rows.append({"method": "one", "label_fraction": 0.5, "seed": 0, "dice": 0.6})
    cells = {c.method: c for c in aggregate(rows, "dice")}
    low, high = stats.t.interval(0.95, 2, loc=np.mean([0.70, 0.74, 0.71]), scale=stats.sem([0.70, 0.74, 0.71]))
    assert (cells["m"].ci_low, cells["m"].ci_high) == pytest.approx((low, high), rel=1e-12)
    assert cells["one"].ci_low is None and cells["one"].ci_high is None


def _rows() -> list[dict]:
    """Fractions listed out of order; 'b' has no cell at 10 %, 'c' one seed at 100 %."""
    values = {("b", 1.0): [0.80, 0.82, 0.84], ("a", 1.0): [0.60, 0.64, 0.62], ("a", 0.1): [0.40, 0.50, 0.45],
              ("c", 1.0): [0.7]}
    return [{"method": m, "label_fraction": f, "seed": s, "auc": v}
            for (m, f), vs in values.items() for s, v in enumerate(vs)]


def _interval(values: list[float], scale: float, digits: int) -> str:
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    return f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def test_the_interval_table_by_hand():
    cells = aggregate(_rows(), "auc")
    table = markdown_ci_table(cells, "auc", scale=10.0, digits=3, method_order=["c", "a", "b"])
    assert table.splitlines() == [
        "| method | auc 95 % CI @ 10 % labels | auc 95 % CI @ 100 % labels |",
        "|---|---|---|",
        "| c | – | n/a |",
        f"| a | {_interval([0.40, 0.50, 0.45], 10, 3)} | {_interval([0.60, 0.64, 0.62], 10, 3)} |",
        f"| b | – | {_interval([0.80, 0.82, 0.84], 10, 3)} |",
    ]
    # columns by label fraction whatever the order of the cells given (aggregate sorts them; a caller may not)
    assert markdown_ci_table(cells[::-1], "auc", scale=10.0, digits=3, method_order=["c", "a", "b"]) == table
    default = markdown_ci_table(cells, "auc").splitlines()
    assert [line.split(" |")[0] for line in default[2:]] == ["| a", "| b", "| c"]  # methods as the cells list them
    assert default[3] == f"| b | – | {_interval([0.80, 0.82, 0.84], 100, 2)} |"


def test_the_mean_table_says_p_n_a_only_where_the_baseline_has_a_cell():
    cells = compare_to_baseline(aggregate(_rows(), "auc"), "b")
    table = markdown_table(cells, "auc", method_order=["b", "a", "c"], baseline="b").splitlines()
    assert table[0] == "| method | auc @ 10 % labels | auc @ 100 % labels |"
    assert table[3] == "| a | 45.00 ± 5.00 | 62.00 ± 2.00 (p<0.001) |"  # no baseline cell at 10 %: no "p n/a"
    assert table[4] == "| c | – | 70.00 (p n/a) |"
