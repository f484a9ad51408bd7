"""Grad-CAM localisation on synthetic images whose object box is known."""

import numpy as np
import pytest
import torch
from torch import nn

from dira3d.evaluation.gradcam import box_iou, boxes_from_heatmap, gradcam_maps, localisation_accuracy, save_overlay


class ObjectLooker(nn.Module):
    """Fires on bright voxels: features = ReLU(x − 0.5), logit = mean of the features.

    Its Grad-CAM (gradients ∝ the positive linear weight) is exactly the bright object.
    """

    def __init__(self, spatial_dims: int, looks_at_corner: bool = False):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.features = conv(1, 2, kernel_size=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.features.bias.fill_(-0.5)
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()
        self.corner = looks_at_corner

    def forward(self, x):
        if self.corner:  # a classifier that ignores the object and looks at a fixed corner
            x = torch.zeros_like(x)
            x[(slice(None), slice(None)) + (slice(0, 4),) * (x.ndim - 2)] = 1.0
        return self.head(self.relu(self.features(x)).flatten(2).mean(-1))


def _images(spatial, rng, count=4):
    images, boxes = [], []
    for _ in range(count):
        img = rng.uniform(0, 0.3, spatial).astype(np.float32)
        lo = [int(rng.integers(2, s - 9)) for s in spatial]
        size = [int(rng.integers(4, 8)) for _ in spatial]
        img[tuple(slice(l, l + k) for l, k in zip(lo, size))] = 1.0
        images.append(img)
        boxes.append(tuple(lo) + tuple(l + k for l, k in zip(lo, size)))
    return torch.from_numpy(np.stack(images))[:, None], boxes


@pytest.mark.parametrize("spatial", [(32, 32), (24, 24, 16)])
def test_object_classifier_localises_perfectly(spatial, tmp_path):
    images, boxes = _images(spatial, np.random.default_rng(0))
    maps = gradcam_maps(ObjectLooker(len(spatial)), images, target_layer="relu")
    assert maps.shape == (len(boxes),) + spatial
    accuracy = localisation_accuracy(list(maps), boxes, threshold=0.5)
    assert accuracy[0.1] == 1.0 and accuracy[0.5] == 1.0
    png = save_overlay(images[0, 0].numpy(), maps[0], tmp_path / "overlay.png", gt_box=boxes[0])
    assert png.stat().st_size > 1000


def test_corner_classifier_fails_localisation():
    images, boxes = _images((32, 32), np.random.default_rng(1))
    maps = gradcam_maps(ObjectLooker(2, looks_at_corner=True), images, target_layer="relu")
    assert localisation_accuracy(list(maps), boxes)[0.1] == 0.0


def test_boxes_and_iou_by_hand():
    heat = np.zeros((10, 10))
    heat[1:3, 1:4] = 1.0
    heat[6:9, 6:8] = 0.8
    assert sorted(boxes_from_heatmap(heat, 0.5)) == [(1, 1, 3, 4), (6, 6, 9, 8)]
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 0, 2, 2, 2), (0, 0, 0, 2, 2, 2)) == 1.0
    with pytest.raises(ValueError, match="target layer 'nope'"):
        gradcam_maps(ObjectLooker(2), torch.zeros(1, 1, 8, 8), "nope")


def test_localisation_is_correct_at_iou_equal_to_delta():
    """'Correct at level delta when IoU >= delta': a box covering half of the ground truth counts at 0.5."""
    heat = np.zeros((10, 10))
    heat[2:6, 2:4] = 1.0  # box (2, 2, 6, 4): 8 pixels inside the 16-pixel ground truth below
    gt = (2, 2, 6, 6)
    assert box_iou(boxes_from_heatmap(heat)[0], gt) == 0.5
    accuracy = localisation_accuracy([heat, np.zeros((10, 10))], [gt, gt], deltas=(0.4, 0.5, 0.6))
    assert accuracy == {0.4: 0.5, 0.5: 0.5, 0.6: 0.0}  # the empty heatmap localises nothing
