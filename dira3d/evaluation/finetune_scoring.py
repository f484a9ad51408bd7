"""What a fine-tuning run scored, for :func:`dira3d.evaluation.finetune.run_finetune`'s records: the split
``evaluate.json`` scores (:func:`scored_split`), the datalist entries of each split (:func:`split_entries`) and their
summaries (:func:`split_summary`), and the scored split's metrics as TensorBoard scalars (:func:`log_split_metrics`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["scored_split", "split_entries", "split_summary", "log_split_metrics"]


def scored_split(configs: Path, overrides: dict[str, Any]) -> str:
    """The split ``evaluate.json`` scores: ``eval_split`` of the overrides, else of ``evaluate.json`` (``"test"``)."""
    if "eval_split" in overrides:
        return str(overrides["eval_split"])
    try:
        return str(json.loads((configs / "evaluate.json").read_text(encoding="utf-8")).get("eval_split", "test"))
    except (OSError, ValueError, AttributeError):  # a bundle of one's own without it: the workflow says why
        return "test"


def log_split_metrics(out: Path, metrics: dict[str, Any], epoch: int, split: str = "test") -> None:
    """The metrics of the scored ``split`` as TensorBoard scalars ``<split>/<name>`` (``test/auc``; ``holdout/auc``
    with eval_split=holdout) at the last epoch trained, beside the run's training and validation curves in ``out``;
    an undefined one (None in metrics.json) is left out."""
    from dira3d.engines.summary import LazySummaryWriter  # no event file when there is no value

    writer = LazySummaryWriter(log_dir=str(out))
    try:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{split}/{name}", value, epoch)
    finally:
        writer.close()


def split_entries(parser, key: str) -> list:
    """The datalist entries of a split (``validate#datalist``: what the engine scored; ``train#datalist``: what the
    network trained on, the label fraction's selection less the holdout); [] without such a list."""
    entries = parser.get_parsed_content(key) if key in parser else None
    return entries if isinstance(entries, list) else []


def split_summary(entries: list, engine) -> dict | None:
    """``{"cases", "patients", "positive"}`` of a split (:func:`dira3d.evaluation.split_checks.describe_split`), with
    the cases with foreground that ``engine``'s :class:`~dira3d.evaluation.ForegroundDice` counted; None when empty."""
    from dira3d.evaluation.split_checks import describe_split

    if not entries:
        return None
    state = getattr(engine, "state", None)
    counted = getattr(state, "foreground_cases", None) or {}
    scored = counted.get(getattr(state, "key_metric_name", None)) or next(iter(counted.values()), None)
    return describe_split(entries, scored)
