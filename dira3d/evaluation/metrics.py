"""The target tasks' metrics: candidate-level AUC, foreground Dice and foreground IoU.

Definitions (``docs/finetuning.md``), for a binary prediction P and ground truth G of one case,
on the **foreground class only**:

- Dice = 2|P∩G| / (|P| + |G|)
- IoU  = |P∩G| / |P∪G|

A case whose ground truth and prediction are both empty scores 1; an empty ground truth with a
non-empty prediction scores 0 (MONAI's ``ignore_empty=False``). The reported value is the mean over
cases. The old Keras metric of the reference code averaged a *two-class* IoU (background
included) over thresholds: background dominates a crop, so that number reads much higher and is
not comparable.

AUC is the area under the ROC curve of candidate probabilities (MONAI ``ROCAUCMetric``; equal to
scikit-learn's ``roc_auc_score``).

The ignite handlers (:class:`ForegroundDice`, :class:`ForegroundIoU`) wrap the same MONAI
metrics for the bundles' evaluators; they expect decollated ``(1, *spatial)`` binary masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import DiceMetric, MeanIoU, ROCAUCMetric

__all__ = ["roc_auc", "foreground_dice", "foreground_iou", "ForegroundDice", "ForegroundIoU"]


def roc_auc(probabilities: Sequence[float] | np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray | torch.Tensor) -> float:
    """Area under the ROC curve of binary candidate scores.

    Args:
        probabilities: one score per candidate (higher = more likely positive).
        labels: 0/1 ground truth per candidate.

    Returns:
        The AUC in [0, 1].

    Raises:
        ValueError: lengths differ, or ``labels`` hold a single class (AUC is undefined).
    """
    scores = torch.as_tensor(np.asarray(probabilities, dtype=np.float64)).flatten()
    truth = torch.as_tensor(np.asarray(labels, dtype=np.float64)).flatten()
    if scores.numel() != truth.numel():
        raise ValueError(f"roc_auc got {scores.numel()} probabilities for {truth.numel()} labels; give one per candidate")
    if len(torch.unique(truth)) < 2:
        raise ValueError("roc_auc needs both positive and negative candidates; the evaluation split holds one class only")
    metric = ROCAUCMetric()
    metric(scores, truth)
    return float(metric.aggregate())


def _binary_masks(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, *spatial) float masks from binary arrays of shape (B, 1, *spatial) or (*spatial)."""
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred)
    g = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from label shape {tuple(g.shape)}; resample one to the other")
    if p.ndim in (2, 3):  # a single (*spatial) mask
        p, g = p[None, None], g[None, None]
    if p.ndim < 4 or p.shape[1] != 1:
        raise ValueError(f"masks must be (B, 1, *spatial) foreground masks, got shape {tuple(p.shape)}")
    return (p > 0.5).float(), (g > 0.5).float()


def foreground_dice(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> float:
    """Mean over cases of the foreground Dice 2|P∩G| / (|P| + |G|).

    Args:
        pred: binary prediction, ``(B, 1, *spatial)`` or a single ``(*spatial)`` mask.
        label: binary ground truth of the same shape.

    Returns:
        The Dice in [0, 1] (both empty → 1).

    Raises:
        ValueError: shapes differ or are not single-channel masks.
    """
    p, g = _binary_masks(pred, label)
    return float(DiceMetric(include_background=True, reduction="mean", ignore_empty=False)(p, g).mean())


def foreground_iou(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> float:
    """Mean over cases of the foreground IoU |P∩G| / |P∪G| (both empty → 1).

    Args:
        pred: binary prediction, ``(B, 1, *spatial)`` or a single ``(*spatial)`` mask.
        label: binary ground truth of the same shape.

    Returns:
        The IoU in [0, 1].

    Raises:
        ValueError: shapes differ or are not single-channel masks.
    """
    p, g = _binary_masks(pred, label)
    return float(MeanIoU(include_background=True, reduction="mean", ignore_empty=False)(p, g).mean())


class ForegroundDice(IgniteMetricHandler):
    """Ignite handler: mean foreground Dice of single-channel binary masks (see module docstring).

    Args:
        output_transform: maps the engine output to ``(y_pred, y)`` lists of ``(1, *spatial)`` masks,
            e.g. ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: keep per-case values in ``engine.state.metric_details``.
    """

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        # one foreground channel: "include_background=True" means "score channel 0", which *is* the foreground
        metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)


class ForegroundIoU(IgniteMetricHandler):
    """Ignite handler: mean foreground IoU of single-channel binary masks (see module docstring).

    Args:
        output_transform: maps the engine output to ``(y_pred, y)`` lists of ``(1, *spatial)`` masks.
        save_details: keep per-case values in ``engine.state.metric_details``.
    """

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        metric = MeanIoU(include_background=True, reduction="mean", ignore_empty=False)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)
