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


# ---- paired t-test (test: paired) ------------------------------------------------------------------------
# a seed effect much larger than the method effect: the paired test sees the consistent +0.01..+0.04, the
# independent one drowns it in the seed-to-seed spread
BASE = {0: 0.60, 1: 0.70, 2: 0.80, 3: 0.65}
GAIN = {0: 0.03, 1: 0.02, 2: 0.04, 3: 0.01}
PAIRED_ROWS = ([{"method": "random", "label_fraction": 0.1, "seed": s, "auc": v} for s, v in BASE.items()]
               + [{"method": "dira", "label_fraction": 0.1, "seed": s, "auc": BASE[s] + GAIN[s]} for s in (2, 0, 3, 1)])


def _dira(cells):
    return next(c for c in cells if c.method == "dira")


def test_paired_t_by_hand_pairs_by_seed_not_by_position():
    from scipy.stats import t as student_t
    from scipy.stats import ttest_ind, ttest_rel

    cells = aggregate(PAIRED_ROWS, "auc")
    paired = _dira(compare_to_baseline(cells, "random", paired=True))
    # differences 0.03, 0.02, 0.04, 0.01: mean 0.025, sample sd sqrt(5e-4 / 3), t = 0.025 / (sd / 2) = 3.873, df 3
    t = 0.025 / (np.sqrt(5e-4 / 3) / 2)
    assert t == pytest.approx(3.872983, rel=1e-5)
    assert paired.p_value == pytest.approx(2 * student_t.sf(t, df=3), rel=1e-6)
    assert paired.p_value == pytest.approx(0.03047, rel=1e-3)
    seeds = sorted(BASE)
    assert paired.p_value == pytest.approx(ttest_rel([BASE[s] + GAIN[s] for s in seeds], [BASE[s] for s in seeds]).pvalue,
                                           rel=1e-9)
    assert paired.pairs == 4 and paired.seeds == (2, 0, 3, 1)
    # the rows of dira come in another seed order: pairing by position would test other differences
    by_position = ttest_rel([r["auc"] for r in PAIRED_ROWS[4:]], [r["auc"] for r in PAIRED_ROWS[:4]]).pvalue
    assert paired.p_value != pytest.approx(by_position, rel=0.05)
    student = _dira(compare_to_baseline(cells, "random"))
    assert student.pairs is None
    assert student.p_value == pytest.approx(ttest_ind(paired.values, [BASE[s] for s in (0, 1, 2, 3)]).pvalue, rel=1e-9)
    assert student.p_value > 0.5 > 0.05 > paired.p_value  # the same runs: not significant vs significant
    assert next(c for c in compare_to_baseline(cells, "random", paired=True) if c.method == "random").p_value is None


def test_paired_t_is_over_the_seeds_both_have_and_the_table_says_pairs():
    from scipy.stats import ttest_rel

    rows = [r for r in PAIRED_ROWS if not (r["method"] == "dira" and r["seed"] == 3)]  # dira lacks seed 3
    rows.append({"method": "dira", "label_fraction": 0.1, "seed": 4, "auc": 0.9})  # random lacks seed 4
    dira = _dira(compare_to_baseline(aggregate(rows, "auc"), "random", paired=True))
    assert dira.n == 4 and dira.pairs == 3
    assert dira.p_value == pytest.approx(ttest_rel([BASE[s] + GAIN[s] for s in (0, 1, 2)], [BASE[s] for s in (0, 1, 2)]).pvalue,
                                         rel=1e-9)
    table = markdown_table([dira], "AUC", full_n=4)
    assert "(p=" in table and "; pairs=3)" in table and "n=" not in table


def test_paired_t_undefined_below_two_pairs_or_with_one_difference_says_p_na():
    one_pair = [r for r in PAIRED_ROWS if r["method"] == "random" or r["seed"] == 0]
    cells = compare_to_baseline(aggregate(one_pair, "auc"), "random", paired=True)
    assert _dira(cells).p_value is None and _dira(cells).pairs == 1
    assert "(p n/a; n=1)" in markdown_table(cells, "AUC", baseline="random", full_n=4)
    # the same gain in every seed, up to float rounding (0.60 + 0.07 - 0.60 != 0.70 + 0.07 - 0.70 in binary): ttest_rel
    # gives t ~ 2e15, p ~ 2e-46 from rounding alone
    same_gain = [{**r, "auc": BASE[r["seed"]] + (0.07 if r["method"] == "dira" else 0.0)} for r in PAIRED_ROWS]
    assert len({BASE[s] + 0.07 - BASE[s] for s in BASE}) > 1  # the rounding is really there
    cells = compare_to_baseline(aggregate(same_gain, "auc"), "random", paired=True)
    assert _dira(cells).p_value is None and _dira(cells).pairs == 4
    assert "(p n/a)" in markdown_table(cells, "AUC", baseline="random", full_n=4)


def test_paired_t_refuses_welch_and_values_without_their_seed():
    cells = aggregate(PAIRED_ROWS, "auc")
    with pytest.raises(ValueError, match="paired t-test has no Welch variant"):
        compare_to_baseline(cells, "random", equal_var=False, paired=True)
    no_seed = [{k: v for k, v in r.items() if k != "seed"} for r in PAIRED_ROWS]
    with pytest.raises(ValueError, match="method 'dira' at label fraction 0.1 do not all give a seed"):
        compare_to_baseline(aggregate(no_seed, "auc"), "random", paired=True)
    assert _dira(compare_to_baseline(aggregate(no_seed, "auc"), "random")).p_value is not None  # unpaired: no seeds needed
    twice = PAIRED_ROWS + [{"method": "dira", "label_fraction": 0.1, "seed": 1, "auc": 0.5}]
    with pytest.raises(ValueError, match="seed 1 more than once"):
        compare_to_baseline(aggregate(twice, "auc"), "random", paired=True)


def test_no_p_n_a_where_the_baseline_has_no_cell_to_compare_with():
    """A label fraction whose baseline runs all failed (or are not run yet) has nothing to test against: its cells show
    no p at all, not `p n/a` (which says the test against a baseline cell is undefined)."""
    rows = [{"method": m, "label_fraction": f, "seed": s, "auc": 0.5 + 0.1 * s + (m == "dira") * 0.05} for s in range(3)
            for m, f in (("random", 0.1), ("dira", 0.1), ("dira", 1.0))]
    cells = compare_to_baseline(aggregate(rows, "auc"), "random")
    table = markdown_table(cells, "AUC", baseline="random", method_order=["random", "dira"])
    assert "| dira | 65.00 ± 10.00 (p=0.573) | 65.00 ± 10.00 |" in table, table
    assert "| random | 60.00 ± 10.00 | – |" in table, table


@pytest.mark.parametrize("equal_var", [True, False])
def test_one_side_of_equal_values_is_tested_without_scipys_precision_warning(equal_var):
    """Found by a 2D walkthrough: a method whose every seed scored the same (a tiny segmenter predicting nothing:
    Dice 0.25 twice) against a baseline with spread printed scipy's "Precision loss occurred in moment calculation
    ... Results may be unreliable" in the middle of `dira3d experiment`'s table; its variance is exactly 0 and the
    t-test is defined by the other side (p by hand below)."""
    import warnings

    from scipy.stats import t as student

    rows = [{"method": "random", "label_fraction": 1.0, "seed": s, "dice": v} for s, v in enumerate([0.0914, 0.1809])]
    rows += [{"method": "dira", "label_fraction": 1.0, "seed": s, "dice": 0.25} for s in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cells = compare_to_baseline(aggregate(rows, "dice"), "random", equal_var=equal_var)
    cell = next(c for c in cells if c.method == "dira")
    # two seeds a side: pooled (0 + s^2) / 2 * (1/2 + 1/2) and Welch's 0/2 + s^2/2 give the same standard error
    se = np.sqrt(np.var([0.0914, 0.1809], ddof=1) / 2)
    t = (0.25 - np.mean([0.0914, 0.1809])) / se
    df = 2 if equal_var else 1  # Welch-Satterthwaite with one side of 0 variance: n - 1 of the other side
    assert cell.p_value == pytest.approx(2 * student.sf(t, df=df), rel=1e-6)
