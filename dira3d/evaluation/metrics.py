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
scikit-learn's ``roc_auc_score``). Multi-label 2D classification (ChestX-ray14, CheXpert) reports the
**mean AUC** over the classes (:func:`mean_auc`, handler :class:`MeanAUC`): labels are binarised at
0.5 (soft CheXpert labels), and a class whose evaluation labels are all equal has no AUC and is left
out of the mean (it is named in ``MeanAUCMetric.per_class`` as NaN).

The ignite handlers (:class:`ForegroundDice`, :class:`ForegroundIoU`) wrap the same MONAI
metrics for the bundles' evaluators; they expect decollated ``(1, *spatial)`` binary masks, and count
the cases whose ground truth has foreground (``engine.state.foreground_cases``): a mean over empty masks
rewards predicting nothing (:mod:`dira3d.evaluation.split_checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import Cumulative, DiceMetric, MeanIoU, ROCAUCMetric

__all__ = ["roc_auc", "mean_auc", "per_class_auc", "foreground_dice", "foreground_iou", "ForegroundDice", "ForegroundIoU",
           "MeanAUCMetric", "MeanAUC"]


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
    # tensors on a GPU (a model's outputs) are read on the host: numpy refused them with a TypeError
    scores = torch.as_tensor(np.asarray(_on_host(probabilities), dtype=np.float64)).flatten()
    truth = torch.as_tensor(np.asarray(_on_host(labels), dtype=np.float64)).flatten()
    if scores.numel() != truth.numel():
        raise ValueError(f"roc_auc got {scores.numel()} probabilities for {truth.numel()} labels; give one per candidate")
    if len(torch.unique(truth)) < 2:
        raise ValueError("roc_auc needs both positive and negative candidates; the evaluation split holds one class only")
    metric = ROCAUCMetric()
    metric(scores, truth)
    return float(metric.aggregate())


def _on_host(values: Any) -> Any:
    return values.detach().cpu() if isinstance(values, torch.Tensor) else values


def per_class_auc(probabilities: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> list[float]:
    """AUC of every column of a multi-label ``(N, C)`` problem; NaN where a column holds one class only.

    Args:
        probabilities: ``(N, C)`` scores (or ``(N,)`` for one class).
        labels: ``(N, C)`` ground truth; values ≥ 0.5 count as positive (soft labels allowed).

    Returns:
        ``C`` AUC values in [0, 1] or NaN.

    Raises:
        ValueError: the shapes differ.
    """
    scores = np.asarray(torch.as_tensor(probabilities).detach().cpu(), dtype=np.float64)
    truth = np.asarray(torch.as_tensor(labels).detach().cpu(), dtype=np.float64)
    scores, truth = scores.reshape(len(scores), -1), truth.reshape(len(truth), -1)
    if scores.shape != truth.shape:
        raise ValueError(f"mean AUC got probabilities of shape {scores.shape} for labels of shape {truth.shape}; "
                         "give one score per class and sample")
    truth = (truth >= 0.5).astype(np.float64)
    values = []
    for column in range(truth.shape[1]):
        if len(np.unique(truth[:, column])) < 2:
            values.append(float("nan"))
        else:
            values.append(roc_auc(scores[:, column], truth[:, column]))
    return values


def mean_auc(probabilities: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, split: str | None = None) -> float:
    """Mean over classes of the per-class AUC (:func:`per_class_auc`), classes without an AUC left out.

    Args:
        probabilities / labels: as :func:`per_class_auc`.
        split: which split is scored, for the error (``"holdout"``: the early-stopping holdout of
            fine-tuning; ``"test"``, ...); None: not said.

    Raises:
        ValueError: shapes differ, or no class has both positive and negative samples (the message says
            in which split and what to do).
    """
    values = np.asarray(per_class_auc(probabilities, labels))
    if np.all(np.isnan(values)):
        raise ValueError(undefined_auc(split, len(torch.as_tensor(labels))))
    return float(np.nanmean(values))


def undefined_auc(split: str | None, samples: int) -> str:
    """The error for a mean AUC with no class that has both positive and negative samples in ``split``."""
    from dira3d.utils.setting_hints import label_fraction_setting

    what = "no class has both positive and negative samples"
    if split == "holdout":
        return (f"mean AUC is undefined on the early-stopping holdout ({samples} sample(s), the share `holdout` of the "
                f"training labels that the label fraction selects, by patient): {what} in it; use a larger label "
                f"fraction ({label_fraction_setting()}) or more training data, so that the holdout can hold both values "
                "of a class while training keeps every class (docs/finetuning.md)")
    if split:
        return (f"mean AUC is undefined on the {split} split ({samples} sample(s)): {what} in it; the datalist's "
                f"{split} entries must hold, for some class, both positive and negative images")
    return f"mean AUC is undefined: {what} in the evaluation split ({samples} sample(s))"


def _binary_masks(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, *spatial) float masks from binary arrays of shape (B, 1, *spatial) or (*spatial); probabilities
    are binarised as MONAI's ``AsDiscrete(threshold=0.5)`` in the bundles does it: ``>= 0.5`` is foreground."""
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred)
    g = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from label shape {tuple(g.shape)}; resample one to the other")
    if p.ndim in (2, 3):  # a single (*spatial) mask
        p, g = p[None, None], g[None, None]
    if p.ndim < 4 or p.shape[1] != 1:
        raise ValueError(f"masks must be (B, 1, *spatial) foreground masks, got shape {tuple(p.shape)}")
    return (p >= 0.5).float(), (g >= 0.5).float()


def foreground_dice(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> float:
    """Mean over cases of the foreground Dice 2|P∩G| / (|P| + |G|).

    Args:
        pred: binary prediction, ``(B, 1, *spatial)`` or a single ``(*spatial)`` mask (a probability map
            counts ``>= 0.5`` as foreground, as ``AsDiscrete(threshold=0.5)``).
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
        pred: binary prediction, ``(B, 1, *spatial)`` or a single ``(*spatial)`` mask (a probability map
            counts ``>= 0.5`` as foreground, as ``AsDiscrete(threshold=0.5)``).
        label: binary ground truth of the same shape.

    Returns:
        The IoU in [0, 1].

    Raises:
        ValueError: shapes differ or are not single-channel masks.
    """
    p, g = _binary_masks(pred, label)
    return float(MeanIoU(include_background=True, reduction="mean", ignore_empty=False)(p, g).mean())


class _CountsForeground(IgniteMetricHandler):
    """An ignite metric handler that also counts the cases it scores whose ground truth has foreground (any voxel
    above 0, as MONAI's metrics tell an empty mask), into ``engine.state.foreground_cases[name]`` as
    ``{"cases": N, "positive": K}`` when the metric is computed: a mean Dice over empty masks alone rewards
    predicting nothing (:mod:`dira3d.evaluation.split_checks`); the flag of each case, in the order of the per-case
    values, goes to ``engine.state.foreground_flags[name]`` (:mod:`dira3d.evaluation.case_metrics`). The masks are
    already in memory: no cost. The counts are gathered over the ranks of a distributed run, as MONAI gathers the
    metric's own buffer."""

    def __init__(self, metric_fn, output_transform: Callable, save_details: bool) -> None:
        self._foreground = Cumulative()  # before ignite's __init__, which calls reset()
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    def reset(self) -> None:
        super().reset()
        self._foreground.reset()

    def update(self, output) -> None:
        if len(output) == 2:
            truth = output[1]
            cases = truth if isinstance(truth, (list, tuple)) else list(truth)  # decollated or batch-first
            self._foreground.extend(torch.tensor([float(torch.as_tensor(t).sum() > 0) for t in cases]))
        super().update(output)

    def compute(self):
        result = super().compute()
        flags = self._foreground.get_buffer()
        if self._engine is not None and self._name is not None and flags is not None:
            if not isinstance(getattr(self._engine.state, "foreground_cases", None), dict):
                self._engine.state.foreground_cases = {}
            self._engine.state.foreground_cases[self._name] = {"cases": int(flags.numel()), "positive": int(flags.sum())}
            if not isinstance(getattr(self._engine.state, "foreground_flags", None), dict):
                self._engine.state.foreground_flags = {}
            self._engine.state.foreground_flags[self._name] = [bool(f) for f in flags.reshape(-1).tolist()]
        return result


class ForegroundDice(_CountsForeground):
    """Ignite handler: mean foreground Dice of single-channel binary masks (see module docstring).

    It also counts the scored cases whose ground truth has foreground, into ``engine.state.foreground_cases``
    (``{name: {"cases", "positive"}}``): ``dira3d finetune`` records them in ``metrics.json``.

    Args:
        output_transform: maps the engine output to ``(y_pred, y)`` lists of ``(1, *spatial)`` masks,
            e.g. ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: keep per-case values in ``engine.state.metric_details``.
    """

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        # one foreground channel: "include_background=True" means "score channel 0", which *is* the foreground
        metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
        super().__init__(metric, output_transform, save_details)


class ForegroundIoU(_CountsForeground):
    """Ignite handler: mean foreground IoU of single-channel binary masks (see module docstring); counts the cases
    with foreground as :class:`ForegroundDice` does.

    Args:
        output_transform: maps the engine output to ``(y_pred, y)`` lists of ``(1, *spatial)`` masks.
        save_details: keep per-case values in ``engine.state.metric_details``.
    """

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        metric = MeanIoU(include_background=True, reduction="mean", ignore_empty=False)
        super().__init__(metric, output_transform, save_details)


class MeanAUCMetric(ROCAUCMetric):
    """Cumulative MONAI metric: mean AUC over classes of ``(B, C)`` scores (see :func:`mean_auc`).

    ``per_class`` holds the last aggregate's per-class values (NaN for classes without an AUC).

    Args:
        split: the split it scores, named when the mean AUC is undefined (see :func:`mean_auc`).
    """

    def __init__(self, split: str | None = None) -> None:
        super().__init__(average="none")
        self.split = split
        self.per_class: list[float] = []

    def aggregate(self, average: str | None = None) -> float:  # type: ignore[override]
        y_pred, y = self.get_buffer()
        self.per_class = per_class_auc(y_pred, y)
        return mean_auc(y_pred, y, self.split)


class MeanAUC(IgniteMetricHandler):
    """Ignite handler of :class:`MeanAUCMetric` (multi-label mean AUC), e.g. for ChestX-ray14's 14 labels.

    Args:
        output_transform: maps the engine output to ``(y_pred, y)`` (probabilities and labels,
            ``(C,)`` per sample), e.g. ``monai.handlers.from_engine(["pred", "label"])``.
        split: the split the evaluator scores (the bundles: ``"holdout"`` in ``train.json``, ``@eval_split`` in
            ``evaluate.json``), named when the mean AUC is undefined.
    """

    def __init__(self, output_transform: Callable = lambda x: x, split: str | None = None) -> None:
        super().__init__(metric_fn=MeanAUCMetric(split), output_transform=output_transform, save_details=False)
