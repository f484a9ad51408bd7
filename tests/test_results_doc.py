"""docs/results.md publishes the experiment's numbers: its two tables (mean ± std with Student's p, and the 95 %
confidence intervals) must be what dira3d's own statistics give on the raw runs beside it, docs/results/results.csv,
so an edit of either, or a change of the statistics, shows here."""

from __future__ import annotations

import re
from pathlib import Path

from dira3d.evaluation.results import read_rows
from dira3d.evaluation.stats import aggregate, compare_to_baseline, markdown_ci_table

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["random", "dis", "dis_res", "dira"]


def _cells():
    rows = read_rows(ROOT / "docs" / "results" / "results.csv")
    for row in rows:
        row["label_fraction"], row["seed"], row["auc"] = float(row["label_fraction"]), int(row["seed"]), float(row["value"])
    assert {r["metric"] for r in rows} == {"auc"} and len(rows) == 40
    return compare_to_baseline(aggregate(rows, "auc"), "random")


def _table_rows(text: str, header: str) -> dict[str, list[str]]:
    lines = text[text.index(header):].splitlines()
    out = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0].split(" (")[0]] = cells[1:]
    return out


def test_the_published_tables_are_the_statistics_of_the_published_runs():
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    cells = {(c.method, c.label_fraction): c for c in _cells()}
    means = _table_rows(text, "| method | AUC @ 10 % labels | AUC @ 100 % labels |")
    assert list(means) == ORDER
    for method in ORDER:
        for fraction, shown in zip((0.1, 1.0), means[method]):
            cell = cells[(method, fraction)]
            number = re.match(r"([\d.]+) ± ([\d.]+)(?: \(p=([\d.]+)\))?$", shown)
            assert number, shown
            assert float(number.group(1)) == round(100 * cell.mean, 2) and float(number.group(2)) == round(100 * cell.std, 2)
            if method != "random":
                assert float(number.group(3)) == round(cell.p_value, 3), (method, fraction)
    published = "\n".join(text[text.index("| method | AUC 95 % CI"):].splitlines()[:6])
    assert published == markdown_ci_table(list(cells.values()), "AUC", method_order=ORDER)
