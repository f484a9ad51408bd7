"""Weakly supervised localisation with Grad-CAM, as in the DiRA paper (2D and 3D).

Protocol: a Grad-CAM heatmap of an image-level classifier (MONAI ``GradCAM``, target layer
configurable since the last 3D encoder level is only 8×8×4 for a 64×64×32 patch) is min-max
normalised to [0, 1], binarised at ``threshold``, and a box is drawn around each connected region
(``scipy.ndimage.label``). The localisation is correct at level δ when the best box's IoU with the
ground-truth box is ≥ δ; accuracy is reported for δ = 0.1 … 0.6.

Boxes are ``(lo_0, …, lo_{d-1}, hi_0, …, hi_{d-1})`` in voxel indices, ``hi`` exclusive.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DELTAS", "gradcam_maps", "boxes_from_heatmap", "box_iou", "box_on_image", "localisation_accuracy",
           "save_overlay"]

DELTAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def gradcam_maps(model: torch.nn.Module, images: torch.Tensor, target_layer: str,
                 class_idx: int | None = None) -> np.ndarray:
    """Grad-CAM heatmaps ``(B, *spatial)`` in [0, 1] (min-max per image), upsampled to the input size.

    Raises:
        ValueError: ``target_layer`` is not a module of ``model`` (the message lists a few names).
    """
    names = dict(model.named_modules())
    if target_layer not in names:
        sample = ", ".join(n for n in list(names)[1:12])
        raise ValueError(f"target layer {target_layer!r} is not in the model; layers include: {sample}, …")
    from monai.visualize import GradCAM  # here: `dira3d localise` refuses bad inputs before torch and MONAI load

    was_training = model.training
    model.eval()
    try:
        # MONAI's default post-processing rescales to [1, 0] (inverted, for its colour maps): keep the
        # raw map and min-max normalise it ourselves, hot = 1.
        cam = GradCAM(nn_module=model, target_layers=target_layer, postprocessing=lambda x: x)
        maps = cam(x=images, class_idx=class_idx)[:, 0].detach().cpu().numpy()  # (B, *spatial)
    finally:
        model.train(was_training)
    flat = maps.reshape(len(maps), -1)
    lo = flat.min(1).reshape((-1,) + (1,) * (maps.ndim - 1))
    span = (flat.max(1) - flat.min(1)).reshape(lo.shape)
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def boxes_from_heatmap(heatmap: np.ndarray, threshold: float = 0.5) -> list[tuple[int, ...]]:
    """Boxes around the connected regions of ``heatmap >= threshold`` (heatmap min-max normalised first)."""
    from scipy import ndimage

    lo, hi = float(heatmap.min()), float(heatmap.max())
    norm = (heatmap - lo) / (hi - lo) if hi > lo else np.zeros_like(heatmap)
    labels, _ = ndimage.label(norm >= threshold)
    boxes = []
    for region in ndimage.find_objects(labels):
        if region is not None:
            boxes.append(tuple(s.start for s in region) + tuple(s.stop for s in region))
    return boxes


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two n-D boxes ``(lo..., hi...)``."""
    d = len(a) // 2
    inter = np.prod([max(0, min(a[d + i], b[d + i]) - max(a[i], b[i])) for i in range(d)])
    vol = lambda box: np.prod([box[d + i] - box[i] for i in range(d)])  # noqa: E731
    union = vol(a) + vol(b) - inter
    return float(inter / union) if union > 0 else 0.0


def box_on_image(box: Sequence[int], grid_size: Sequence[int], image_size: Sequence[int]) -> list[float]:
    """A box ``(lo..., hi...)`` on the network's grid of ``grid_size`` as ``[x, y, ..., w, h, ...]`` in pixels of
    the image of ``image_size`` it was resized from (the frame of a box datalist's ``[x, y, w, h]``), to 0.01 pixel."""
    d = len(box) // 2
    scale = [image_size[i] / grid_size[i] for i in range(d)]
    return ([round(box[i] * scale[i], 2) for i in range(d)]
            + [round((box[d + i] - box[i]) * scale[i], 2) for i in range(d)])


def localisation_accuracy(heatmaps: Sequence[np.ndarray], gt_boxes: Sequence[Sequence[int]],
                          threshold: float = 0.5, deltas: Sequence[float] = DELTAS) -> dict[float, float]:
    """Fraction of images whose best heatmap box reaches IoU ≥ δ with the ground-truth box, per δ."""
    if len(heatmaps) != len(gt_boxes) or not heatmaps:
        raise ValueError(f"need one ground-truth box per heatmap, got {len(heatmaps)} heatmaps and {len(gt_boxes)} boxes")
    best = []
    for heatmap, gt in zip(heatmaps, gt_boxes):
        boxes = boxes_from_heatmap(heatmap, threshold)
        best.append(max((box_iou(box, gt) for box in boxes), default=0.0))
    best_arr = np.asarray(best)
    return {float(delta): float(np.mean(best_arr >= delta)) for delta in deltas}


def save_overlay(image: np.ndarray, heatmap: np.ndarray, path: str | Path, gt_box: Sequence[int] | None = None,
                 threshold: float = 0.5) -> Path:
    """Save a PNG of the image with the heatmap and boxes on top (3D: the slice through the heatmap's peak).

    A 2D ``image`` is ``(x, y)`` as MONAI loads a PNG: it is shown as the file is, row ``y = 0`` at the top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    boxes = boxes_from_heatmap(heatmap, threshold)
    # a 2D radiograph is (x, y) with y counted from the file's top row: row 0 at the top, as a viewer shows the PNG
    # (origin "lower" drew chest X-rays upside down); a volume's axial slice keeps its earlier display
    origin = "upper" if image.ndim == 2 else "lower"
    if image.ndim == 3:  # (x, y, z): show the axial slice through the hottest voxel
        z = int(np.unravel_index(np.argmax(heatmap), heatmap.shape)[2])
        image, heatmap = image[:, :, z], heatmap[:, :, z]
        boxes = [(b[0], b[1], b[3], b[4]) for b in boxes if b[2] <= z < b[5]]
        gt_box = (gt_box[0], gt_box[1], gt_box[3], gt_box[4]) if gt_box is not None else None
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image.T, cmap="gray", origin=origin)
    ax.imshow(heatmap.T, cmap="jet", alpha=0.4, origin=origin)
    for box, colour in [(b, "yellow") for b in boxes] + ([(gt_box, "lime")] if gt_box is not None else []):
        ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False,
                               edgecolor=colour, linewidth=1.5))
    ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
