"""Aggregation and significance tests of multi-seed fine-tuning results, in the paper's style.

Each run is one row ``{"method", "label_fraction", "seed", <metric>: value}``. Per cell
(method × label fraction) we report mean ± sample standard deviation (``ddof=1``, as in the
paper's tables) over seeds, the 95 % confidence interval of that mean (t-based: mean ± t(0.975, n−1) · std / √n,
``scipy.stats.t``; none for one seed or seeds that agree, cut at the bounds of a metric of known range,
:func:`cell_interval`), and a t-test of each method against the baseline: independent two-sample
as in the paper (Student's by default, Welch's with ``equal_var=False``) via ``scipy.stats.ttest_ind``,
or paired by seed (``paired=True``) via ``scipy.stats.ttest_rel`` over the seeds both cells have.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["TESTS", "CONFIDENCE", "CellSummary", "aggregate", "compare_to_baseline", "markdown_table", "markdown_ci_table",
           "mean_interval", "cell_interval", "ci_table_note", "METRIC_RANGES", "SEEDS_AGREE", "CLIPPED", "TWO_SEEDS"]

TESTS = ("student", "welch", "paired")  # the t-tests compare_to_baseline runs (equal_var, paired)
CONFIDENCE = 0.95  # of the interval of each cell's mean over seeds
# the range of the task bundles' test metrics (ROC AUC, foreground Dice and IoU): an interval is cut at these bounds
METRIC_RANGES: dict[str, tuple[float, float]] = {"auc": (0.0, 1.0), "dice": (0.0, 1.0), "iou": (0.0, 1.0)}
# ci_note of a cell (summary.json) and its mark in the interval table
SEEDS_AGREE = "seeds agree"  # every seed gave the same value (up to float rounding): no interval, as no p-value
TWO_SEEDS = "2 seeds"  # one degree of freedom: mean ± 9.0 × std, wide by construction
CLIPPED = "clipped"  # the t interval ran past the metric's range and is cut at its bounds


@dataclass(frozen=True)
class CellSummary:
    """Mean, sample std, count and the 95 % confidence interval of the mean (:func:`cell_interval`; None for one
    value or values that agree, ``ci_note`` says which and marks an interval of 2 seeds or cut at the metric's range)
    of one metric over the seeds of one (method, label fraction) cell."""

    method: str
    label_fraction: float
    n: int
    mean: float
    std: float
    values: tuple[float, ...]
    p_value: float | None = None  # against the baseline at the same label fraction
    seeds: tuple[int, ...] = ()  # the seed of each value, in the same order; empty when the rows name none
    pairs: int | None = None  # paired test only: the seeds this cell shares with the baseline's, which it is over
    ci_low: float | None = None  # the 95 % confidence interval of the mean over seeds; None for one seed
    ci_high: float | None = None
    ci_note: str | None = None  # SEEDS_AGREE (no interval), or TWO_SEEDS and/or CLIPPED ("2 seeds; clipped")


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The t-based confidence interval of the mean of ``values`` (independent draws, e.g. one per seed): mean ±
    ``scipy.stats.t.ppf((1 + confidence) / 2, n - 1)`` × sample std / √n; None for fewer than two values. Values all
    equal give the mean twice (no spread between seeds, not a certainty about the population; the report's
    :func:`cell_interval` says the seeds agree instead)."""
    arr = np.asarray(values, dtype=float)
    if len(arr) < 2:
        return None
    mean = float(arr.mean())
    from scipy import stats  # here: `dira3d experiment` refuses a bad config before scipy.stats loads (0.9 s)

    half = float(stats.t.ppf((1 + confidence) / 2, len(arr) - 1)) * float(arr.std(ddof=1)) / math.sqrt(len(arr))
    return mean - half, mean + half


def cell_interval(values: Sequence[float], bounds: tuple[float, float] | None = None,
                  confidence: float = CONFIDENCE) -> tuple[float | None, float | None, str | None]:
    """``(low, high, note)``: the interval a report gives for the mean of one cell's seeds.

    :func:`mean_interval`, except that values all equal up to float rounding (the tolerance of the t-tests' ``p n/a``)
    give no interval and the note :data:`SEEDS_AGREE` (a zero-width ``[x, x]`` read as certainty); two values give the
    note :data:`TWO_SEEDS` (one degree of freedom: t(0.975, 1) = 12.7, the interval is mean ± 9.0 × std); an interval
    past ``bounds`` (the metric's range) is cut at them, with the note :data:`CLIPPED` (an AUC's [-0.315, 1.517] of two
    seeds is [0, 1]: the true mean lies in the range, so the cut interval covers it as often). ``(None, None, None)`` for
    fewer than two values."""
    arr = np.asarray(values, dtype=float)
    if len(arr) < 2:
        return None, None, None
    if _same_values(arr, arr):
        return None, None, SEEDS_AGREE
    low, high = mean_interval(arr, confidence)
    notes = [TWO_SEEDS] if len(arr) == 2 else []
    if bounds is not None and (low < bounds[0] or high > bounds[1]):
        low, high = max(low, bounds[0]), min(high, bounds[1])
        notes.append(CLIPPED)
    return low, high, "; ".join(notes) or None


def aggregate(rows: Iterable[Mapping], metric: str, bounds: tuple[float, float] | None = None) -> list[CellSummary]:
    """Group ``rows`` by (method, label_fraction) and summarise ``metric``; each cell's interval is
    :func:`cell_interval`'s, cut at ``bounds`` (default: the metric's range in :data:`METRIC_RANGES`, if known).

    Raises:
        ValueError: a row lacks ``metric`` — the message names the row's method and seed.
    """
    cells: dict[tuple[str, float], list[float]] = defaultdict(list)
    seeds: dict[tuple[str, float], list] = defaultdict(list)
    for row in rows:
        if metric not in row or row[metric] in (None, ""):
            raise ValueError(f"result row for method {row.get('method')!r}, seed {row.get('seed')!r} has no {metric!r}")
        key = (str(row["method"]), float(row["label_fraction"]))
        cells[key].append(float(row[metric]))
        seeds[key].append(_seed_of(row))
    bounds = bounds if bounds is not None else METRIC_RANGES.get(metric.lower())
    out = []
    for (method, fraction), values in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        arr = np.asarray(values, dtype=float)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")
        named = tuple(seeds[(method, fraction)]) if None not in seeds[(method, fraction)] else ()
        low, high, note = cell_interval(arr, bounds)
        out.append(CellSummary(method, fraction, len(arr), float(arr.mean()), std, tuple(values), seeds=named,
                               ci_low=low, ci_high=high, ci_note=note))
    return out


def _seed_of(row: Mapping) -> int | None:
    try:
        return int(row["seed"])
    except (KeyError, TypeError, ValueError):
        return None  # no seed (or not a whole number): the cell has no seeds, and a paired test refuses it


def compare_to_baseline(cells: Sequence[CellSummary], baseline: str, equal_var: bool = True,
                        paired: bool = False) -> list[CellSummary]:
    """Add the p-value of a t-test against ``baseline`` (same label fraction) to every other cell.

    By default an independent two-sample test (``scipy.stats.ttest_ind``); ``equal_var=False`` gives
    Welch's test. With ``paired=True``, a paired test (``scipy.stats.ttest_rel``) over the seeds both
    cells have, value against value of the same seed; the cell's ``pairs`` says how many (seeds of one
    side only are not in it). Cells with fewer than two values (pairs) on either side, cells where both
    sides hold one value each in every seed (paired: the same difference in every pair; both up to float
    rounding; no spread: the test is undefined), and the baseline itself get ``p_value=None``.

    Raises:
        ValueError: ``baseline`` is not one of the methods; ``paired`` with ``equal_var=False`` (a paired
            test has no Welch variant), or a compared cell without one seed per value.
    """
    methods = {c.method for c in cells}
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods {sorted(methods)}; set 'baseline' to one of them")
    if paired and not equal_var:
        raise ValueError("a paired t-test has no Welch variant (it tests the differences of the pairs): ask for one of "
                         "paired=True or equal_var=False")
    base = {c.label_fraction: c for c in cells if c.method == baseline}
    out = []
    for cell in cells:
        ref = base.get(cell.label_fraction)
        if paired:
            p, pairs = _paired_p(cell, ref) if cell.method != baseline and ref is not None else (None, None)
            out.append(replace(cell, p_value=p, pairs=pairs))
            continue
        p = None
        spread = ref is not None and not _same_values(cell.values, ref.values)  # else t is 0/0 or x/0
        if cell.method != baseline and ref is not None and cell.n > 1 and ref.n > 1 and spread:
            with warnings.catch_warnings():  # one side of equal values (a run that predicts nothing, every seed):
                # its variance is exactly 0 and t is defined by the other side's; scipy warned "Results may be unreliable"
                warnings.filterwarnings("ignore", message="Precision loss occurred in moment calculation",
                                        category=RuntimeWarning)
                from scipy import stats

                result = stats.ttest_ind(cell.values, ref.values, equal_var=equal_var)
            p = float(result.pvalue) if not math.isnan(result.pvalue) else None
        out.append(replace(cell, p_value=p))
    return out


def _paired_p(cell: CellSummary, ref: CellSummary) -> tuple[float | None, int]:
    """``(p, pairs)`` of the paired t-test of ``cell`` against ``ref`` over the seeds both have; ``p`` is
    ``None`` below two pairs or when every pair differs by the same amount (t is x/0 or 0/0)."""
    mine, theirs = _by_seed(cell), _by_seed(ref)
    common = sorted(set(mine) & set(theirs))
    a, b = np.array([mine[s] for s in common]), np.array([theirs[s] for s in common])
    if len(common) < 2:
        return None, len(common)
    # a difference repeated up to float rounding (0.75 - 0.65 vs 0.76 - 0.66) is no spread: the test is undefined
    # there, not p ~ 0 from a t of 1e15
    scale = float(np.max(np.abs(np.concatenate([a, b])))) or 1.0
    if np.ptp(a - b) <= 64 * np.finfo(float).eps * scale:
        return None, len(common)
    from scipy import stats

    result = stats.ttest_rel(a, b)
    return (float(result.pvalue) if not math.isnan(result.pvalue) else None), len(common)


def _same_values(values: Sequence[float], other: Sequence[float]) -> bool:
    """Each side holds one value in every seed, up to float rounding: the independent t-test is undefined there.

    ``0.75`` in two seeds and ``0.75000000000000011`` in a third, against ``0.65`` in every seed, gave t ~ 1e15 and
    p ~ 1e-61 (the paired test already took such a difference as no spread)."""
    both = np.concatenate([np.asarray(values, dtype=float), np.asarray(other, dtype=float)])
    tolerance = 64 * np.finfo(float).eps * (float(np.max(np.abs(both))) or 1.0)
    return bool(np.ptp(values) <= tolerance and np.ptp(other) <= tolerance)


def _by_seed(cell: CellSummary) -> dict[int, float]:
    where = f"method {cell.method!r} at label fraction {cell.label_fraction:g}"
    if len(cell.seeds) != len(cell.values):
        raise ValueError(f"a paired t-test pairs values by seed, but the rows of {where} do not all give a seed")
    if len(set(cell.seeds)) < len(cell.seeds):
        twice = sorted({s for s in cell.seeds if cell.seeds.count(s) > 1})
        raise ValueError(f"a paired t-test needs one value per seed, but {where} has seed {twice[0]} more than once")
    return dict(zip(cell.seeds, cell.values))


def _fmt(cell: CellSummary, scale: float, digits: int, full_n: int | None = None, untested: bool = False) -> str:
    text = f"{cell.mean * scale:.{digits}f}"
    if not math.isnan(cell.std):
        text += f" ± {cell.std * scale:.{digits}f}"
    notes = []
    if cell.p_value is not None:
        notes.append("p<0.001" if cell.p_value < 0.001 else f"p={cell.p_value:.3f}")
    elif untested:
        notes.append("p n/a")
    if full_n is not None and cell.n < full_n:
        notes.append(f"n={cell.n}")
    if cell.pairs is not None and cell.pairs < cell.n:  # paired: some of its seeds have no baseline value
        notes.append(f"pairs={cell.pairs}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _grid_table(cells: Sequence[CellSummary], column: str, method_order: Sequence[str] | None,
                text: Callable[[CellSummary, dict, float], str]) -> str:
    """One row per method, one column per label fraction (``<column> @ <f> % labels``); each cell ``text(cell, index,
    fraction)``, ``–`` where a method has no cell at that fraction."""
    fractions = sorted({c.label_fraction for c in cells})
    methods = list(method_order) if method_order else list(dict.fromkeys(c.method for c in cells))
    index = {(c.method, c.label_fraction): c for c in cells}

    def shown(method: str, fraction: float) -> str:
        cell = index.get((method, fraction))
        return "–" if cell is None else text(cell, index, fraction)

    header = "| method | " + " | ".join(f"{column} @ {100 * f:g} % labels" for f in fractions) + " |"
    lines = [header, "|---|" + "---|" * len(fractions)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(shown(method, f) for f in fractions) + " |")
    return "\n".join(lines)


def markdown_table(cells: Sequence[CellSummary], metric: str, scale: float = 100.0, digits: int = 2,
                   method_order: Sequence[str] | None = None, full_n: int | None = None,
                   baseline: str | None = None) -> str:
    """A Markdown table: one row per method, one column per label fraction, ``mean ± std (p)``.

    Values are multiplied by ``scale`` (100 gives the paper's percentages). With ``full_n`` (the number
    of seeds of the grid), a cell of fewer values says ``n=…``; with ``baseline``, a cell compared with
    no p-value (the t-test undefined: fewer than two values on a side, or no spread on either) says ``p n/a``.
    A cell of a paired test over fewer pairs than it has values says ``pairs=…``.
    """
    def text(cell: CellSummary, index: dict, fraction: float) -> str:
        untested = baseline is not None and cell.method != baseline and (baseline, fraction) in index
        return _fmt(cell, scale, digits, full_n, untested)

    return _grid_table(cells, metric, method_order, text)


def markdown_ci_table(cells: Sequence[CellSummary], metric: str, scale: float = 100.0, digits: int = 2,
                      method_order: Sequence[str] | None = None) -> str:
    """A Markdown table laid out as :func:`markdown_table` whose cells are the 95 % confidence interval of the mean
    over seeds, ``[low, high]`` (× ``scale``) followed by its ``ci_note`` (``[0.00, 100.00] (2 seeds; clipped)``);
    ``n/a`` for a cell of one seed, ``n/a (seeds agree)`` for seeds that all gave one value."""
    def text(cell: CellSummary, index: dict, fraction: float) -> str:
        mark = f" ({cell.ci_note})" if cell.ci_note else ""
        if cell.ci_low is None or cell.ci_high is None:
            return "n/a" + mark
        return f"[{cell.ci_low * scale:.{digits}f}, {cell.ci_high * scale:.{digits}f}]" + mark

    return _grid_table(cells, f"{metric} 95 % CI", method_order, text)


def ci_table_note(cells: Sequence[CellSummary], metric: str, scale: float = 100.0) -> str:
    """The note under :func:`markdown_ci_table`: how the interval is computed, and what each mark its cells carry
    means (only those that occur; the metric's range from :data:`METRIC_RANGES`)."""
    marks = {mark for c in cells if c.ci_note for mark in c.ci_note.split("; ")}
    text = ("95 % CI: t-based confidence interval of the mean over the seeds (mean ± t(0.975, n−1) × std / √n, "
            f"×{scale:g}; it says how precisely the seeds pin the mean, not where one run falls); n/a: one seed")
    if SEEDS_AGREE in marks:
        text += ("; n/a (seeds agree): every seed gave the same value (up to float rounding), so there is no spread to "
                 "build an interval from (as the t-test's p n/a), not a certainty")
    if TWO_SEEDS in marks:
        from scipy import stats

        t1, t2 = (float(stats.t.ppf((1 + CONFIDENCE) / 2, df)) for df in (1, 2))
        text += (f"; 2 seeds: one degree of freedom, t(0.975, 1) = {t1:.1f}, so the interval is mean ± "
                 f"{t1 / math.sqrt(2):.1f} × std, wide by construction (3 seeds: ± {t2 / math.sqrt(3):.1f} × std)")
    if CLIPPED in marks:
        low, high = METRIC_RANGES.get(metric.lower(), (float("-inf"), float("inf")))
        text += (f"; clipped: the t interval ran past the range of {metric} ([{low * scale:g}, {high * scale:g}]) and is "
                 "cut at its bounds")
    return text + ".\n"
