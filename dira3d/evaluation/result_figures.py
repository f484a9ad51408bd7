"""The figures of ``dira3d experiment``'s report (:func:`dira3d.evaluation.results.write_report`):
``<metric>_vs_label_fraction.png`` (mean ± std per method over the label fractions) and ``ablation.png`` (a bar per
method at each fraction). Matplotlib is imported when a figure is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

from dira3d.evaluation.stats import CellSummary

__all__ = ["save_figures", "metric_figure", "ablation_figure"]


def save_figures(cells: list[CellSummary], metric: str, methods: list[str], out: Path) -> None:
    """Write both figures into ``out`` (100 dpi PNGs) and close them."""
    plt = _pyplot()
    for fig, name in ((metric_figure(cells, metric, methods), f"{metric}_vs_label_fraction.png"),
                      (ablation_figure(cells, metric, methods), "ablation.png")):
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


# what the bars are, on the plots themselves (a figure copied into a draft lost the table's note): std, not SEM or CI
_ERROR_BARS = "{metric} (mean ± sample std over seeds)"


def _percent(fraction: float) -> str:
    """A label fraction as the table writes it: ``0.1`` -> ``10 %``."""
    return f"{100 * fraction:g} %"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_figure(cells: list[CellSummary], metric: str, methods: list[str]):
    """``<metric>_vs_label_fraction.png``: mean ± std per method over the label fractions, on a log axis whose ticks
    are the grid's own fractions as percentages (matplotlib's log ticks read 5×10¹ … 10² on a grid of 50 % and 100 %)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in methods:
        mine = sorted((c for c in cells if c.method == method), key=lambda c: c.label_fraction)
        if mine:
            ax.errorbar([c.label_fraction * 100 for c in mine], [c.mean for c in mine],
                        yerr=[0 if math.isnan(c.std) else c.std for c in mine], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    fractions = sorted({c.label_fraction for c in cells})
    ax.set_xticks([100 * f for f in fractions], [_percent(f) for f in fractions])
    ax.set_xticks([], minor=True)  # the log axis's minor ticks are labelled too on a short range
    ax.set_xlabel("training labels (%)")
    ax.set_ylabel(_ERROR_BARS.format(metric=metric))
    if ax.get_legend_handles_labels()[0]:  # every run failed: no line to name (matplotlib warned)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ablation_figure(cells: list[CellSummary], metric: str, methods: list[str]):
    """``ablation.png``: a bar per method at each label fraction (labelled as a percentage)."""
    plt = _pyplot()
    fractions = sorted({c.label_fraction for c in cells})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        mine = {c.label_fraction: c for c in cells if c.method == method}
        xs = [j + i * width for j, f in enumerate(fractions) if f in mine]
        ys = [mine[f].mean for f in fractions if f in mine]
        errs = [0 if math.isnan(mine[f].std) else mine[f].std for f in fractions if f in mine]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=method)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(fractions))], [_percent(f) for f in fractions])
    ax.set_xlabel("training labels (%)")
    ax.set_ylabel(_ERROR_BARS.format(metric=metric))
    ax.set_title("ablation")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
