"""Aggregation and significance tests of multi-seed fine-tuning results, in the paper's style.

Each run is one row ``{"method", "label_fraction", "seed", <metric>: value}``. Per cell
(method × label fraction) we report mean ± sample standard deviation (``ddof=1``, as in the
paper's tables) over seeds, and an independent two-sample t-test of each method against the
baseline (Student's by default, Welch's with ``equal_var=False``) via ``scipy.stats.ttest_ind``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

__all__ = ["CellSummary", "aggregate", "compare_to_baseline", "markdown_table"]


@dataclass(frozen=True)
class CellSummary:
    """Mean, sample std and count of one metric over the seeds of one (method, label fraction) cell."""

    method: str
    label_fraction: float
    n: int
    mean: float
    std: float
    values: tuple[float, ...]
    p_value: float | None = None  # against the baseline at the same label fraction


def aggregate(rows: Iterable[Mapping], metric: str) -> list[CellSummary]:
    """Group ``rows`` by (method, label_fraction) and summarise ``metric``.

    Raises:
        ValueError: a row lacks ``metric`` — the message names the row's method and seed.
    """
    cells: dict[tuple[str, float], list[float]] = defaultdict(list)
    for row in rows:
        if metric not in row or row[metric] in (None, ""):
            raise ValueError(f"result row for method {row.get('method')!r}, seed {row.get('seed')!r} has no {metric!r}")
        cells[(str(row["method"]), float(row["label_fraction"]))].append(float(row[metric]))
    out = []
    for (method, fraction), values in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        arr = np.asarray(values, dtype=float)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")
        out.append(CellSummary(method, fraction, len(arr), float(arr.mean()), std, tuple(values)))
    return out


def compare_to_baseline(cells: Sequence[CellSummary], baseline: str, equal_var: bool = True) -> list[CellSummary]:
    """Add the p-value of an independent two-sample t-test against ``baseline`` to every other cell.

    ``equal_var=False`` gives Welch's test. Cells with fewer than two values on either side, cells where
    both sides hold one value each in every seed (no spread: the test is undefined), and the baseline
    itself get ``p_value=None``.

    Raises:
        ValueError: ``baseline`` is not one of the methods.
    """
    methods = {c.method for c in cells}
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods {sorted(methods)}; set 'baseline' to one of them")
    base = {c.label_fraction: c for c in cells if c.method == baseline}
    out = []
    for cell in cells:
        ref = base.get(cell.label_fraction)
        p = None
        spread = ref is not None and (len(set(cell.values)) > 1 or len(set(ref.values)) > 1)  # else t is 0/0 or x/0
        if cell.method != baseline and ref is not None and cell.n > 1 and ref.n > 1 and spread:
            result = stats.ttest_ind(cell.values, ref.values, equal_var=equal_var)
            p = float(result.pvalue) if not math.isnan(result.pvalue) else None
        out.append(CellSummary(cell.method, cell.label_fraction, cell.n, cell.mean, cell.std, cell.values, p))
    return out


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
    return text + (f" ({'; '.join(notes)})" if notes else "")


def markdown_table(cells: Sequence[CellSummary], metric: str, scale: float = 100.0, digits: int = 2,
                   method_order: Sequence[str] | None = None, full_n: int | None = None,
                   baseline: str | None = None) -> str:
    """A Markdown table: one row per method, one column per label fraction, ``mean ± std (p)``.

    Values are multiplied by ``scale`` (100 gives the paper's percentages). With ``full_n`` (the number
    of seeds of the grid), a cell of fewer values says ``n=…``; with ``baseline``, a cell compared with
    no p-value (the t-test undefined: fewer than two values on a side, or no spread on either) says ``p n/a``.
    """
    fractions = sorted({c.label_fraction for c in cells})
    methods = list(method_order) if method_order else list(dict.fromkeys(c.method for c in cells))
    index = {(c.method, c.label_fraction): c for c in cells}

    def text(method: str, fraction: float) -> str:
        cell = index.get((method, fraction))
        if cell is None:
            return "–"
        untested = baseline is not None and method != baseline and (baseline, fraction) in index
        return _fmt(cell, scale, digits, full_n, untested)

    header = "| method | " + " | ".join(f"{metric} @ {100 * f:g} % labels" for f in fractions) + " |"
    lines = [header, "|---|" + "---|" * len(fractions)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(text(method, f) for f in fractions) + " |")
    return "\n".join(lines)
